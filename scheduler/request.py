"""Per-sequence state held by the scheduler.

A sequence is WAITING (holds no slots, no lock) or RUNNING (holds KV slots and possibly a
locked radix node). Invariant while RUNNING: `slots[i]` holds the KV of `token_ids[i]` for
`i < num_computed == len(slots)`; the first `prefix_len` slots belong to the radix tree (the
locked `node`'s path), the rest to the sequence. With a local (sliding-window) pool the same
holds of `local_slots`, whose entries are 0 where the sequence freed them.

The radix key of a sequence is its token ids with each image's placeholder tokens replaced by
values derived from the image's content hash (`image_key_values`): the same image gives the
same key, so a prefix hit can cover it; a different image with the same text cannot.

Prompt logprobs (SamplingParams.prompt_logprobs): until its first output token, a sequence
collects `prompt_logprobs` (entry i for prompt token i, entry 0 None) chunk by chunk from the
workers. Invariant while RUNNING, once a step's result is in: len(prompt_logprobs) ==
min(num_computed + 1, len(prompt_ids)). A prefix hit skips the logits of its positions, so it
may cover only positions whose entries are known (`match_key`): none at the first admission;
after a retraction, up to what was collected (the rest is cut off and recomputed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from fovea.common.messages import ImageInput, SeqOutput, TokenLogprobs, seq_key
from fovea.common.sampling import SamplingParams
from fovea.scheduler.radix_cache import RadixNode

_KEY_MASK = (1 << 62) - 1


def image_key_values(digest: bytes, n: int) -> list[int]:
    """Radix-key values of an image's n placeholder tokens. All negative, so never equal to a
    real token id. Position j takes the (j mod 4)-th 64-bit word of the 256-bit digest, mixed
    with j: two images share a key prefix of k >= 4 positions only if all 256 bits agree (and
    a shorter one only if 64k bits do), where SGLang's single 30-bit value per image collides
    once in ~2^15 images."""
    if len(digest) < 32:
        raise ValueError(f"image digest of {len(digest)} bytes; 32 expected")
    words = [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(4)]
    return [-1 - ((words[j % 4] ^ (j * 0x9E3779B97F4A7C15)) & _KEY_MASK) for j in range(n)]


def radix_key(token_ids: list[int], images: list[ImageInput]) -> list[int]:
    """`token_ids` with each image's placeholder span replaced by its hash-derived values."""
    if not images:
        return token_ids
    key = list(token_ids)
    for img in images:
        key[img.offset : img.offset + img.num_tokens] = image_key_values(img.hash, img.num_tokens)
    return key


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    rid: str
    index: int
    prompt_ids: list[int]  # the original prompt: never changes
    sampling: SamplingParams
    arrival: int  # order of arrival at the scheduler (FCFS key)
    images: list[ImageInput] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    slots: list[int] = field(default_factory=list)
    # While RUNNING, with cross-attention images (Mllama): each image's slot (cross_images.py).
    image_slots: list[int] = field(default_factory=list)
    # With a local (sliding-window) pool: one local slot per token of `slots`, 0 once freed
    # (scheduler/window_slots.py); positions below `local_cursor` were considered for freeing.
    local_slots: list[int] = field(default_factory=list)
    local_cursor: int = 0
    prefix_len: int = 0
    node: RadixNode | None = None
    # Prefix-cache hit at the first admission (reported to the client); None until admitted.
    cached_tokens: int | None = None
    admitted_at: int = -1  # admission counter: the newest running sequences retract first
    retracted: bool = False  # waiting again after a retraction: admitted before the others
    sent: bool = False  # the workers hold it (a NewSequence went out since the last drop)
    finish_reason: str | None = None
    # Collected while `computing_prompt_logprobs`; handed to the first output, then emptied.
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list, repr=False)
    prompt_key: list[int] = field(init=False, repr=False)  # radix key of prompt_ids

    def __post_init__(self) -> None:
        self.prompt_key = radix_key(self.prompt_ids, self.images)

    @property
    def key(self) -> str:
        return seq_key(self.rid, self.index)

    @property
    def max_new_tokens(self) -> int:
        assert self.sampling.max_new_tokens is not None
        return self.sampling.max_new_tokens

    @property
    def token_ids(self) -> list[int]:
        """Every known token: prompt, then outputs (the last output has no KV yet)."""
        return self.prompt_ids + self.output_ids

    @property
    def cache_key(self) -> list[int]:
        """The radix key of `token_ids` (image placeholders replaced by hash values)."""
        return self.prompt_key + self.output_ids

    @property
    def computing_prompt_logprobs(self) -> bool:
        """Prompt logprobs are wanted and not yet delivered (no output token yet)."""
        return self.sampling.prompt_logprobs and not self.output_ids

    @property
    def match_key(self) -> list[int]:
        """What a prefix hit may cover: all but the last known token (whose logits give the
        next one); while computing prompt logprobs, only positions whose entries are known."""
        if self.computing_prompt_logprobs:
            return self.cache_key[: max(0, len(self.prompt_logprobs) - 1)]
        return self.cache_key[:-1]

    def take_prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        """For the first output: the collected prompt logprobs (None when not computing them);
        the sequence keeps none."""
        entries = self.prompt_logprobs if self.computing_prompt_logprobs else None
        self.prompt_logprobs = []
        return entries

    @property
    def worker_sampling(self) -> SamplingParams:
        """The params the workers get: prompt_logprobs off once they were delivered (a
        re-admission after a retraction must not compute them again)."""
        if self.sampling.prompt_logprobs and not self.computing_prompt_logprobs:
            return msgspec.structs.replace(self.sampling, prompt_logprobs=False)
        return self.sampling

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        return len(self.slots)

    @property
    def pending(self) -> int:
        """Known tokens whose KV is not computed yet (1 for a decoding sequence)."""
        return self.num_tokens - len(self.slots)


def seq_output(
    seq: Sequence,
    tokens: list[int],
    lp: TokenLogprobs | None,
    reason: str | None,
    matched: int | None,
    prompt_lps: list[TokenLogprobs | None] | None = None,
) -> SeqOutput:
    """One step's output of `seq` (its token counts as of now)."""
    return SeqOutput(
        seq.rid,
        seq.index,
        tokens,
        [lp] if lp is not None else None,
        reason,
        matched,
        len(seq.prompt_ids),
        seq.cached_tokens or 0,
        len(seq.output_ids),
        prompt_lps,
    )
