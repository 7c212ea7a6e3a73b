"""A fake worker for scheduler tests: applies StepPlans the way the real workers do and checks
them strictly, returning deterministic tokens.

Checks: a NewSequence only for a key it does not hold; chunks only for held keys, never past
the known tokens, `sample` exactly when a chunk reaches the end; slot ids never in the scratch
page nor past the pool; a write never lands on a slot another live sequence reads; prefix
slots hold the KV of exactly the same token prefix (so a cache hit is a correct hit), where
an image placeholder counts as (image hash, index in the image), not as its token id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fovea.common.messages import (
    ImageInput,
    SeqOutput,
    StepPlan,
    StepResult,
    TokenizedRequest,
)
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler


@dataclass
class FakeSeq:
    tokens: list[int]
    slots: list[int] = field(default_factory=list)
    # What each token's KV depends on: its id, or (hash, j) for an image placeholder.
    content: list[Any] = field(default_factory=list)


def token_content(ids: list[int], images: list[ImageInput]) -> list[Any]:
    out: list[Any] = list(ids)
    for img in images:
        for j in range(img.num_tokens):
            out[img.offset + j] = (img.hash, j)
    return out


class FakeWorker:
    def __init__(
        self, total_slots: int, page_size: int = 1, script: dict[str, list[int]] | None = None
    ) -> None:
        self.max_slot = total_slots + page_size - 1
        self.page_size = page_size
        self.seqs: dict[str, FakeSeq] = {}
        # slot -> the token prefix whose last token's KV it holds
        self.kv: dict[int, tuple[int, ...]] = {}
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.plans: list[StepPlan] = []

    def next_token(self, key: str, seq: FakeSeq) -> int:
        if self.script.get(key):
            return self.script[key].pop(0)
        return (seq.tokens[-1] + 1) % 512

    def step(self, plan: StepPlan) -> StepResult:
        self.plans.append(plan)
        for key in plan.dropped:
            del self.seqs[key]
        for new in plan.new:
            assert new.key not in self.seqs, f"{new.key} sent twice"
            content = token_content(new.input_ids, new.images)
            for i, slot in enumerate(new.prefix_slots):
                assert self.kv[slot] == tuple(content[: i + 1]), f"bad prefix hit {new.key}"
            self.seqs[new.key] = FakeSeq(list(new.input_ids), list(new.prefix_slots), content)
        keys: list[str] = []
        tokens: list[int] = []
        for chunk in plan.chunks:
            seq = self.seqs[chunk.key]
            start = len(seq.slots)
            end = start + len(chunk.new_slots)
            assert end <= len(seq.tokens), f"{chunk.key}: chunk past the known tokens"
            assert chunk.sample == (end == len(seq.tokens)), f"{chunk.key}: wrong sample flag"
            for pos, slot in enumerate(chunk.new_slots, start):
                assert self.page_size <= slot <= self.max_slot, f"slot {slot} out of the pool"
                for other_key, other in self.seqs.items():
                    assert other_key == chunk.key or slot not in other.slots, (
                        f"{chunk.key} overwrites slot {slot} of {other_key}"
                    )
                self.kv[slot] = tuple(seq.content[: pos + 1])
            seq.slots.extend(chunk.new_slots)
            if chunk.sample:
                token = self.next_token(chunk.key, seq)
                seq.tokens.append(token)
                seq.content.append(token)
                keys.append(chunk.key)
                tokens.append(token)
        return StepResult(plan.step, keys, tokens, [None] * len(keys), 0.0)


def run_to_idle(sched: Scheduler, worker: FakeWorker, max_steps: int = 500) -> int:
    """Step until nothing is waiting or running; returns the number of plans."""
    steps = 0
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None, "work left but nothing scheduled: deadlock"
        sched.process_result(worker.step(plan))
        steps += 1
        assert steps <= max_steps, "no progress"
    return steps


def assert_idle_invariant(sched: Scheduler) -> None:
    """Nothing running: every slot is free or in the tree, and evicting the tree frees all."""
    assert not sched.running and not sched.waiting
    total = sched.total_slots
    assert sched.cache.protected_size == 0
    assert sched.allocator.available + sched.cache.total_size == total
    sched.allocator.free(sched.cache.evict(total))
    assert sched.allocator.available == total
    assert sched.cache.total_size == 0


def make(
    num_slots: int = 64, script: dict[str, list[int]] | None = None, **kw: Any
) -> tuple[Scheduler, FakeWorker]:
    kw.setdefault("context_length", 64)
    cfg = SchedulerConfig(eos_token_ids=(2,), **kw)
    sched = Scheduler(cfg, num_slots)
    return sched, FakeWorker(sched.total_slots, cfg.page_size, script)


def req(rid: str, ids: list[int], max_new: int = 3, index: int = 0, **sp: Any) -> TokenizedRequest:
    return TokenizedRequest(
        rid=rid, index=index, input_ids=ids, sampling=SamplingParams(max_new_tokens=max_new, **sp)
    )


def outputs_of(sched: Scheduler, rid: str) -> list[SeqOutput]:
    return [o for o in sched.outputs if o.rid == rid]


def tokens_of(sched: Scheduler, rid: str, index: int = 0) -> list[int]:
    return [t for o in sched.outputs if (o.rid, o.index) == (rid, index) for t in o.new_token_ids]
