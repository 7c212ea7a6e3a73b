"""Builds each step's StepPlan as a diff against what the workers hold.

A sequence is sent in full (`NewSequence`) with its first chunk after each admission, and
again only after it was dropped (retraction); later chunks carry only the new slots. Drops
(finished, aborted, retracted sequences) accumulate until the next plan goes out, and the
workers apply them before that plan's new sequences, so a re-admitted key can reuse its name.
"""

from __future__ import annotations

from fovea.common.messages import ImageInput, NewSequence, ScheduledChunk, StepPlan
from fovea.scheduler.request import Sequence


class PlanBuilder:
    def __init__(self) -> None:
        self.step = 0  # the number the next plan gets
        self._new: list[NewSequence] = []
        self._chunks: list[ScheduledChunk] = []
        self._dropped: list[str] = []

    @property
    def pending_drops(self) -> list[str]:
        return list(self._dropped)

    def drop(self, seq: Sequence) -> None:
        """The workers must forget `seq` (a no-op if they were never told of it)."""
        if seq.sent:
            self._dropped.append(seq.key)
            seq.sent = False

    def add_chunk(
        self, seq: Sequence, new_slots: list[int], sample: bool, new_local: list[int] | None = None
    ) -> None:
        """Schedule `len(new_slots)` more tokens of `seq` (its slots already include them);
        `new_local`: their local-pool slots, with a sliding-window pool."""
        if not seq.sent:
            self._new.append(
                NewSequence(
                    key=seq.key,
                    input_ids=seq.token_ids,
                    num_prompt_tokens=len(seq.prompt_ids),
                    sampling=seq.worker_sampling,
                    prefix_slots=seq.slots[: seq.prefix_len],
                    images=seq.images,
                    image_slots=seq.image_slots,
                    prefix_local_slots=seq.local_slots[: seq.prefix_len],
                )
            )
            seq.sent = True
        self._chunks.append(ScheduledChunk(seq.key, new_slots, sample, new_local or []))

    def build(
        self, encode: list[ImageInput] | None = None, encoding: bool = False
    ) -> StepPlan | None:
        """The plan of everything added since the last one, with images to encode ahead;
        None when there is nothing to compute (no chunks, no images, and `encoding` False:
        the workers hold no unfinished images), and pending drops then wait for the next."""
        if not (self._chunks or encode or encoding):
            return None
        plan = StepPlan(self.step, self._new, self._chunks, self._dropped, encode or [])
        self.step += 1
        self._new, self._chunks, self._dropped = [], [], []
        return plan
