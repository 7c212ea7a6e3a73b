"""Per-sequence state held by the scheduler.

A sequence is WAITING (holds no slots, no lock) or RUNNING (holds KV slots and possibly a
locked radix node). Invariant while RUNNING: `slots[i]` holds the KV of `token_ids[i]` for
`i < num_computed == len(slots)`; the first `prefix_len` slots belong to the radix tree (the
locked `node`'s path), the rest to the sequence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fovea.common.messages import seq_key
from fovea.common.sampling import SamplingParams
from fovea.scheduler.radix_cache import RadixNode


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
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    slots: list[int] = field(default_factory=list)
    prefix_len: int = 0
    node: RadixNode | None = None
    # Prefix-cache hit at the first admission (reported to the client); None until admitted.
    cached_tokens: int | None = None
    admitted_at: int = -1  # admission counter: the newest running sequences retract first
    retracted: bool = False  # waiting again after a retraction: admitted before the others
    sent: bool = False  # the workers hold it (a NewSequence went out since the last drop)
    finish_reason: str | None = None

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
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        return len(self.slots)

    @property
    def pending(self) -> int:
        """Known tokens whose KV is not computed yet (1 for a decoding sequence)."""
        return self.num_tokens - len(self.slots)
