"""Image state of models that read images through cross-attention (Mllama), as the scheduler
sees it: the workers' image slots, shared by image content hash, and the radix-key salt such
models need.

Slots: a slot holds one image's cross-attention K/V (worker/cross_attention.py). The scheduler
hands out slot ids and the workers write where the plan says (`NewSequence.image_slots`), as
with KV slots. An admitted sequence holds one reference per image of its prompt, from
admission until it is released (finish, abort, retraction); every sequence whose prompt has
the same image (same content hash) references the same slot, so N requests with one image
take one slot and the workers compute its K/V once. A slot is free when its last reference
goes. A free slot keeps its K/V (the workers overwrite a slot only when it is given to
another image), so `take` gives an image back the free slot that still holds it before any
other: a re-admission after a retraction, or a later request with the image, then finds its
K/V computed. Fresh slots go lowest id first, then the longest-free one (deterministic).
Admission waits while the slots are short; a request with more distinct images than the pool
holds at all is refused on arrival.

The prefix tree never references an image slot: a cached prefix holds token KV only (already
computed from the images), and a sequence that hits it takes its own reference to its images'
slots at admission like any other, the K/V recomputed only when no slot still holds them.

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
    """Reference-counted image slots keyed by image content hash.

    Invariants: `free` + the slots with users == capacity; `_slot_of[h]` is the slot whose K/V
    is image h's, for slots in use and free ones not yet given to another image; a slot in
    use has exactly one image (the one its users reference)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cross-attention image slots must be >= 1, got {capacity}")
        self.capacity = capacity
        # Free slots, the next fresh one first: never used (lowest id first), then longest free.
        self._free: dict[int, None] = dict.fromkeys(range(capacity))
        self._users: dict[int, int] = {}  # slot in use -> references by running sequences
        self._slot_of: dict[bytes, int] = {}  # image hash -> slot holding its K/V
        self._image_of: dict[int, bytes] = {}  # the inverse of _slot_of

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def users(self) -> int:
        """References held by running sequences (> used when images are shared)."""
        return sum(self._users.values())

    @property
    def shared(self) -> int:
        """Slots in use by two or more references."""
        return sum(1 for n in self._users.values() if n > 1)

    def refusal(self, rid: str, images: list[ImageInput]) -> str | None:
        """Why a request with these images can never run, or None."""
        distinct = len({img.hash for img in images})
        if distinct <= self.capacity:
            return None
        return (
            f"request {rid} has {distinct} different images but the model's cross-attention "
            f"state holds at most {self.capacity} at once; send fewer images"
        )

    def slots_needed(self, seq: Sequence) -> int:
        """Free slots that admitting `seq` takes: its images no running sequence holds."""
        return sum(
            1 for h in {img.hash for img in seq.images} if self._slot_of.get(h) not in self._users
        )

    def fits(self, seq: Sequence) -> bool:
        return self.slots_needed(seq) <= self.free

    def take(self, seq: Sequence) -> None:
        """One reference per image of `seq` (its `image_slots`, in image order)."""
        assert self.fits(seq), "admitted past the image slots"
        seq.image_slots = [self._reference(img.hash) for img in seq.images]

    def release(self, seq: Sequence) -> None:
        for slot in seq.image_slots:
            self._users[slot] -= 1
            if self._users[slot] == 0:  # the last user: free, its K/V kept until reused
                del self._users[slot]
                self._free[slot] = None
        seq.image_slots = []

    def _reference(self, digest: bytes) -> int:
        slot = self._slot_of.get(digest)
        if slot is None:  # a fresh slot: whatever image it held is forgotten
            slot = next(iter(self._free))
            old = self._image_of.pop(slot, None)
            if old is not None:
                del self._slot_of[old]
            self._slot_of[digest], self._image_of[slot] = slot, digest
        if slot in self._free:
            del self._free[slot]
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot
