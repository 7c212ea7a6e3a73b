"""Which waiting prompts' images the workers encode ahead of their prefill (the workers' side:
worker/encode_ahead.py).

A prompt with an image whose encoder output is not known to be ready stays waiting; its images
go to the workers in the next plan (`StepPlan.encode`, each hash once) and the prompt is
admitted after the workers name them in `StepResult.images_ready`. Meanwhile other prompts are
admitted and running sequences keep decoding, since each step runs only a slice of the tower.

Invariants: at most MAX_IN_FLIGHT images are with the workers at a time (their pixels and
partial activations are held there); `ready` is a hint (the workers' embedding cache may have
evicted an entry since), and a prefill whose image is not cached encodes it in its own step.
"""

from __future__ import annotations

import collections

from fovea.common.messages import ImageInput
from fovea.scheduler.request import Sequence

MAX_IN_FLIGHT = 8  # images sent to encode and not yet reported ready
REMEMBER_READY = 4096  # hashes known ready, least recently used forgotten first


class EncodeAhead:
    def __init__(self) -> None:
        self.ready: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.in_flight: set[bytes] = set()
        self._outbox: list[ImageInput] = []

    @property
    def busy(self) -> bool:
        """The workers hold images not reported ready yet: steps must go on to finish them."""
        return bool(self.in_flight)

    def waits(self, seq: Sequence) -> bool:
        """True while one of `seq`'s images is not ready; asks the workers for those not
        asked for yet, while fewer than MAX_IN_FLIGHT are with them."""
        waiting = False
        for img in seq.images:
            if img.hash in self.ready:
                self.ready.move_to_end(img.hash)
                continue
            waiting = True
            if img.hash not in self.in_flight and len(self.in_flight) < MAX_IN_FLIGHT:
                self.in_flight.add(img.hash)
                self._outbox.append(img)
        return waiting

    def take_outbox(self) -> list[ImageInput]:
        out, self._outbox = self._outbox, []
        return out

    def done(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self.in_flight.discard(h)
            self.ready[h] = None
            self.ready.move_to_end(h)
        while len(self.ready) > REMEMBER_READY:
            self.ready.popitem(last=False)
