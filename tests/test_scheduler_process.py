"""The scheduler process over real sockets: handshake with 2 fake ranks, readiness, one
request through plans and results, stats, and exit on WorkerFailed."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import zmq

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses, Receiver, Sender
from fovea.common.messages import (
    ProcessReady,
    ScheduledChunk,
    SchedulerStats,
    SeqOutput,
    StatsRequest,
    StepPlan,
    StepResult,
    SyncPing,
    TokenBatch,
    TokenizedRequest,
    ToLauncher,
    ToServer,
    ToTokenizer,
    ToWorker,
    WorkerFailed,
    WorkerReady,
)
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import SamplingParams
from fovea.scheduler.main import run_scheduler

TIMEOUT_MS = 10_000


def next_plan(sub: Receiver[ToWorker]) -> StepPlan:
    while True:
        msg = sub.recv(timeout_ms=TIMEOUT_MS)
        assert msg is not None, "no plan"
        if isinstance(msg, StepPlan):
            return msg


def no_plan_within(sub: Receiver[ToWorker], ms: int) -> bool:
    """No StepPlan arrives in `ms` (keep-alives are skipped)."""
    deadline = time.monotonic() + ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        msg = sub.recv(timeout_ms=max(1, int(left * 1000)))
        if isinstance(msg, StepPlan):
            return False
    return True


@dataclass
class Harness:
    ctx: zmq.Context[Any]
    launcher: Receiver[ToLauncher]
    tokenizer: Receiver[ToTokenizer]
    server: Receiver[ToServer]
    subs: list[Receiver[ToWorker]]
    results: Sender
    inbox: Sender
    proc: Any


@contextmanager
def scheduler_process(slots: tuple[int, ...] = (32,)) -> Iterator[Harness]:
    """A scheduler process whose len(slots) ranks are played by the test (rank r reports
    slots[r]), handshaken and ready."""
    addrs = Addresses.local()
    ctx: zmq.Context[Any] = zmq.Context()
    launcher: Receiver[ToLauncher] = Receiver(ctx, addrs.launcher_in, ToLauncher, bind=True)
    tokenizer: Receiver[ToTokenizer] = Receiver(ctx, addrs.tokenizer_in, ToTokenizer, bind=True)
    server: Receiver[ToServer] = Receiver(ctx, addrs.server_in, ToServer, bind=True)
    args = ServerArgs(model_path="unused", tp_size=len(slots), log_level="warning")
    model = ModelInfo(
        path="unused",
        architecture="LlamaForCausalLM",
        model_type="llama",
        context_length=64,
        vocab_size=512,
        eos_token_ids=[2],
    )
    proc = mp.get_context("spawn").Process(target=run_scheduler, args=(args, addrs, model))
    proc.start()
    try:
        subs: list[Receiver[ToWorker]] = [
            Receiver(ctx, addrs.worker_plan, ToWorker, bind=False, sub=True) for _ in slots
        ]
        results = Sender(ctx, addrs.worker_result, bind=False)
        for rank, sub in enumerate(subs):
            ping = sub.recv(timeout_ms=TIMEOUT_MS)
            assert isinstance(ping, SyncPing)
            results.send(
                WorkerReady(nonce=ping.nonce, rank=rank, num_slots=slots[rank], max_seqs=8)
            )
        inbox = Sender(ctx, addrs.scheduler_in, bind=False)
        yield Harness(ctx, launcher, tokenizer, server, subs, results, inbox, proc)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        ctx.destroy(linger=0)
        if addrs.ipc_dir:
            shutil.rmtree(addrs.ipc_dir, ignore_errors=True)


def test_scheduler_process_round_trip_and_worker_failure() -> None:
    # The pool is the smallest over the ranks.
    with scheduler_process(slots=(32, 24)) as h:
        ready = h.launcher.recv(timeout_ms=TIMEOUT_MS)
        assert isinstance(ready, ProcessReady)
        assert (ready.role, ready.info) == ("scheduler", {"total_slots": "24"})

        sampling = SamplingParams(max_new_tokens=2)
        h.inbox.send(TokenizedRequest(rid="r", index=0, input_ids=[5, 6], sampling=sampling))
        for token, chunk, finish in (
            (7, ScheduledChunk("r#0", [1, 2], True), None),
            (8, ScheduledChunk("r#0", [3], True), "length"),
        ):
            plan = next_plan(h.subs[0])
            assert plan.chunks == [chunk]
            h.results.send(StepResult(plan.step, ["r#0"], [token], [None], 0.001))
            batch = h.tokenizer.recv(timeout_ms=TIMEOUT_MS)
            assert batch == TokenBatch(
                [SeqOutput("r", 0, [token], None, finish, None, 2, 0, token - 6)]
            )
        h.inbox.send(StatsRequest("q1"))
        stats = h.server.recv(timeout_ms=TIMEOUT_MS)
        assert stats == SchedulerStats(
            query_id="q1",
            total_slots=24,
            free_slots=21,
            tree_slots=3,
            evictable_slots=3,
            running=0,
            waiting=0,
            steps=2,
            cache_hit_tokens=0,
            prompt_tokens=2,
            generated_tokens=2,
        )

        h.inbox.send(TokenizedRequest(rid="s", index=0, input_ids=[9], sampling=sampling))
        next_plan(h.subs[0])
        h.results.send(WorkerFailed(0, "RuntimeError: boom"))
        h.proc.join(timeout=TIMEOUT_MS / 1000)
        assert h.proc.exitcode == 1


def test_in_steady_decoding_the_next_plan_is_sent_before_the_result() -> None:
    with scheduler_process() as h:
        sampling = SamplingParams(max_new_tokens=4)
        h.inbox.send(TokenizedRequest(rid="r", index=0, input_ids=[5, 6], sampling=sampling))
        prefill = next_plan(h.subs[0])
        assert prefill.chunks == [ScheduledChunk("r#0", [1, 2], True)]
        # After a prefill the scheduler waits for its result ...
        assert no_plan_within(h.subs[0], 300)
        h.results.send(StepResult(prefill.step, ["r#0"], [7], [None], 0.001))
        # ... and after a decode step plans the next one at once, but never a third before
        # the first's result is back.
        plans = [next_plan(h.subs[0]), next_plan(h.subs[0])]
        assert [p.chunks for p in plans] == [
            [ScheduledChunk("r#0", [3], True)],
            [ScheduledChunk("r#0", [4], True)],
        ]
        assert no_plan_within(h.subs[0], 300)
        for plan, token in zip(plans, (8, 9), strict=True):
            h.results.send(StepResult(plan.step, ["r#0"], [token], [None], 0.001))
        plan = next_plan(h.subs[0])
        assert plan.chunks == [ScheduledChunk("r#0", [5], True)]
        # That plan's token is the request's last (max_new_tokens 4): nothing is planned past it.
        assert no_plan_within(h.subs[0], 300)
        h.results.send(StepResult(plan.step, ["r#0"], [10], [None], 0.001))
        outputs = [h.tokenizer.recv(timeout_ms=TIMEOUT_MS) for _ in range(4)]
        assert [o.outputs[0].new_token_ids for o in outputs] == [[7], [8], [9], [10]]
        assert outputs[-1].outputs[0].finish_reason == "length"
