"""The scheduler's cross-attention image slots (scheduler/cross_images.py), without workers:
shared by image hash with exact slot ids, freed with the last user, a free slot given back to
the image it still holds before any other, fresh slots never-used first then longest-free,
refusal by distinct images; and the real Scheduler's plans and stats through admission,
abort and retraction."""

from __future__ import annotations

import numpy as np

from fovea.common.messages import (
    AbortRequest,
    ImageInput,
    SchedulerStats,
    StatsRequest,
    StepResult,
    TokenizedRequest,
)
from fovea.common.sampling import SamplingParams
from fovea.scheduler.cross_images import CrossImageSlots
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.request import Sequence
from fovea.scheduler.scheduler import Scheduler

PIXELS = np.zeros((1, 3, 2, 2), dtype=np.float32)
SP = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)


def image(name: str, offset: int = 1) -> ImageInput:
    return ImageInput(name.encode().ljust(32, b"."), offset, 1, PIXELS, [1, 1])


def seq(rid: str, *names: str) -> Sequence:
    images = [image(n, 1 + k) for k, n in enumerate(names)]
    return Sequence(rid, 0, [3, *[400] * len(names), 9], SP, 0, images=images)


def state(slots: CrossImageSlots) -> tuple[int, int, int, int]:
    return slots.used, slots.free, slots.users, slots.shared


def test_shared_slots_and_exact_ids() -> None:
    pool = CrossImageSlots(3)
    s1, s2, s3 = seq("1", "A"), seq("2", "A"), seq("3", "B", "C")
    for s in (s1, s2, s3):
        pool.take(s)
    assert (s1.image_slots, s2.image_slots, s3.image_slots) == ([0], [0], [1, 2])
    assert state(pool) == (3, 0, 4, 1)
    assert pool.fits(seq("4", "A", "C")) and not pool.fits(seq("5", "D"))
    pool.release(s1)
    assert state(pool) == (3, 0, 3, 0) and s1.image_slots == []
    pool.release(s2)  # A's last user: slot 0 free
    assert state(pool) == (2, 1, 2, 0) and pool.fits(seq("5", "D"))
    pool.release(s3)  # free, longest first: 0, then 1, 2
    assert state(pool) == (0, 3, 0, 0)
    c, d = seq("6", "C"), seq("7", "D")
    pool.take(c)  # C still in slot 2: no other slot, its K/V kept
    pool.take(d)  # fresh: the longest-free slot 0, A forgotten
    assert (c.image_slots, d.image_slots) == ([2], [0])
    a = seq("8", "A", "A")  # A twice in one prompt: one slot, two references
    pool.take(a)
    assert a.image_slots == [1, 1] and state(pool) == (3, 0, 4, 1)
    for s in (a, c, d):
        pool.release(s)
    assert state(pool) == (0, 3, 0, 0)


def test_refusal_counts_distinct_images() -> None:
    pool = CrossImageSlots(2)
    assert pool.refusal("r", [image("A"), image("A"), image("A")]) is None
    assert pool.refusal("r", [image("A"), image("B"), image("C")]) == (
        "request r has 3 different images but the model's cross-attention state holds at most "
        "2 at once; send fewer images"
    )


def request(rid: str, names: list[str], max_new: int = 4) -> TokenizedRequest:
    images = [image(n, 1 + k) for k, n in enumerate(names)]
    ids = [3, *[400] * len(names), 9, 10, 11]
    sp = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    return TokenizedRequest(rid=rid, index=0, input_ids=ids, sampling=sp, images=images)


def stats(s: Scheduler) -> tuple[int, int, int, int]:
    s.stats(StatsRequest("q"))
    out = s.to_server.pop()
    assert isinstance(out, SchedulerStats)
    return out.image_slots, out.free_image_slots, out.image_slot_users, out.shared_image_slots


def run_step(s: Scheduler, kv_computed: int = 0) -> list[list[int]]:
    """One step with token 7 for every sampled chunk; the new sequences' image slots."""
    plan = s.schedule()
    assert plan is not None
    keys = [c.key for c in plan.chunks if c.sample]
    s.process_result(
        StepResult(plan.step, keys, [7] * len(keys), [None] * len(keys), 0.0,
                   cross_kv_computed=kv_computed)
    )  # fmt: skip
    return [n.image_slots for n in plan.new]


def test_scheduler_shares_slots_through_abort_and_retraction() -> None:
    """Three requests with image A (one also with B) in a pool of 2 image slots all run at
    once; an abort and a retraction leave A's slot to the others; the counts come back to
    the start. KV memory: 23 slots (24 less the scratch one); y and z need 17 + 12."""
    cfg = SchedulerConfig(context_length=64, cross_image_slots=2)
    s = Scheduler(cfg, 24)
    for rid, names, n in (("x", ["A"], 8), ("y", ["A", "B"], 12), ("z", ["A"], 8)):
        s.handle(request(rid, names, max_new=n))
    assert run_step(s, kv_computed=2) == [[0], [0, 1], [0]]
    assert stats(s) == (2, 0, 4, 1) and s.cross_kv_computed == 2
    s.handle(AbortRequest("x"))
    assert stats(s) == (2, 0, 3, 1)
    while not s.num_retractions:  # z, the newest, gives way
        run_step(s)
    assert [q.key for q in s.waiting] == ["z#0"] and stats(s) == (2, 0, 2, 0)
    readmitted = []
    while s.has_work:
        readmitted += run_step(s)
    assert readmitted == [[0]]  # A's slot, still held by y or kept free with its K/V
    assert stats(s) == (2, 2, 0, 0)
    assert s.cross_images is not None and s.cross_images.free == 2
