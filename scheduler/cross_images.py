"""Image state of models that read images through cross-attention (Mllama), as the scheduler
sees it: a count of the workers' image slots, and the radix-key salt such models need.

Slots: each admitted sequence holds one slot per image of its prompt (its cross-attention
K/V, worker/cross_attention.py) from admission until it is released (finish, abort,
retraction), exactly when the workers take and free them. Admission waits while the slots
are short; a request with more images than the pool holds at all is refused on arrival.

Salt: in transformers' Mllama, a token before the first image attends to every image of the
request (its cross-attention mask row is empty, and an empty row attends to all keys), so
every token's KV depends on ALL of the request's images, even those later in the prompt.
The hash values at image positions (request.image_key_values) cannot express that: the
radix key of a sequence with images starts with a value derived from all its images' hashes
instead of its first token. Prefix hits then happen only between sequences with the same
images in the same order (the same image and a different question, a second turn without a
new image, a re-admission after retraction), never across different images nor between an
image request and a text-only one.
"""

from __future__ import annotations

import hashlib

from fovea.common.messages import ImageInput
from fovea.scheduler.request import Sequence

# Below every image_key_values value (>= -2**62) and every token id: never equal to either.
_SALT_BASE = -(1 << 62) - 1
_SALT_MASK = (1 << 62) - 1


def image_set_salt(images: list[ImageInput]) -> int:
    """A radix-key value from the hashes of all images, in order."""
    digest = hashlib.blake2b(b"".join(img.hash for img in images), digest_size=8).digest()
    return _SALT_BASE - (int.from_bytes(digest, "little") & _SALT_MASK)


def salted_key(key: list[int], images: list[ImageInput]) -> list[int]:
    """`key` with its first value replaced by the images' salt (unchanged without images)."""
    if not images or not key:
        return key
    return [image_set_salt(images), *key[1:]]


class CrossImageSlots:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cross-attention image slots must be >= 1, got {capacity}")
        self.capacity = capacity
        self.used = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def refusal(self, rid: str, num_images: int) -> str | None:
        """Why a request with `num_images` images can never run, or None."""
        if num_images <= self.capacity:
            return None
        return (
            f"request {rid} has {num_images} images but the model's cross-attention state "
            f"holds at most {self.capacity} at once; send fewer images"
        )

    def fits(self, seq: Sequence) -> bool:
        return len(seq.images) <= self.free

    def take(self, seq: Sequence) -> None:
        assert self.fits(seq), "admitted past the image slots"
        self.used += len(seq.images)

    def release(self, seq: Sequence) -> None:
        self.used -= len(seq.images)
        assert self.used >= 0, "image slots released twice"
