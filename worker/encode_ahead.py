"""Images encoded ahead of their prompts' prefill, a slice of the vision tower per step.

A large image costs the vision tower far more than a decode step (a 1024x768 picture through
Qwen2.5-VL-3B's tower: ~50 s on 2 CPUs). Encoded inside its prompt's first step, it would hold
every running sequence's next token for that long. Instead the scheduler sends the images of
waiting prompts in `StepPlan.encode` and admits each prompt only once the workers report its
images in `StepResult.images_ready` (scheduler/encode_ahead.py); meanwhile every step runs the
tower for about `slice_patches` patch rows (whole blocks, at least one), then the step's
decodes and prefills as usual.

Invariants: the slice is counted in patch rows, not seconds, so every tensor-parallel rank
stops at the same block (their MLPs all-reduce); finished outputs go into the embedding cache
and are also held here until a prefill takes them, so a cache too small for them loses none.
"""

from __future__ import annotations

import collections
from collections.abc import Generator

import torch

from fovea.common.messages import ImageInput
from fovea.worker.mm_cache import EmbeddingCache
from fovea.worker.models.base import EncodesImages, EncodesInStages

# Finished outputs kept beside the cache for their prefill; older ones (their prompt was
# aborted) are dropped first.
KEEP_READY = 64

ImageStages = Generator[int, None, list[torch.Tensor]]


def _whole(encoder: EncodesImages, images: list[ImageInput]) -> ImageStages:
    """A tower that cannot stop between blocks: one stage."""
    yield from ()
    return encoder.encode_images(images)


def checked(img: ImageInput, emb: torch.Tensor) -> torch.Tensor:
    """emb, after checking it has one row per placeholder token of img."""
    if emb.shape[0] != img.num_tokens:
        raise RuntimeError(
            f"image encoder gave {emb.shape[0]} embeddings for {img.num_tokens} placeholder tokens"
        )
    return emb


class EncoderQueue:
    """Encoder jobs in arrival order, one image each: images become ready one by one, so a
    prompt waits only for the images sent before its own. (Batching the images of a plan
    into one tower call made every prompt wait for all of them, and on a CPU its larger
    activations ran no faster: W4 on 2 vCPUs took 380.8 s against 302.7 s unsliced.)"""

    def __init__(self, encoder: EncodesImages, cache: EmbeddingCache, slice_patches: int) -> None:
        self.encoder = encoder
        self.cache = cache
        self.slice_patches = slice_patches
        self.jobs: collections.deque[tuple[ImageInput, ImageStages]] = collections.deque()
        self.ready: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.encoded = 0  # images whose encoding finished here (vision-encoder runs)

    def add(self, images: list[ImageInput]) -> list[bytes]:
        """Queue the images not cached; returns the hashes of those already cached (ready
        now). The scheduler sends each hash once."""
        cached: list[bytes] = []
        for img in images:
            if self.cache.get(img.hash) is not None:
                cached.append(img.hash)
            elif isinstance(self.encoder, EncodesInStages):
                self.jobs.append((img, self.encoder.encode_stages([img])))
            else:
                self.jobs.append((img, _whole(self.encoder, [img])))
        return cached

    def advance(self) -> list[bytes]:
        """Run the oldest jobs for one slice: stages until `slice_patches` patch rows have
        been computed (at least one stage; a job's last stage counts all its rows). Returns
        the hashes whose outputs finished."""
        done: list[bytes] = []
        spent = 0
        while self.jobs and spent < self.slice_patches:
            img, stages = self.jobs[0]
            try:
                spent += max(1, next(stages))
                continue
            except StopIteration as finished:
                (emb,) = finished.value
                spent += int(img.pixel_values.shape[0])
            self.jobs.popleft()
            self.cache.put(img.hash, checked(img, emb))
            self.ready[img.hash] = emb
            done.append(img.hash)
            self.encoded += 1
            while len(self.ready) > KEEP_READY:
                self.ready.popitem(last=False)
        return done

    def take(self, image_hash: bytes) -> torch.Tensor | None:
        """A finished output no prefill has taken yet (None if there is none)."""
        return self.ready.pop(image_hash, None)
