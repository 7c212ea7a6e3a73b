"""The scheduler process over real sockets: handshake with 2 fake ranks, readiness, one
request through plans and results, stats (also while a step computes), and exit on
WorkerFailed."""

from __future__ import annotations

import multiprocessing as mp
import shutil
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


def test_scheduler_process_round_trip_and_worker_failure() -> None:
    addrs = Addresses.local()
    ctx: zmq.Context[Any] = zmq.Context()
    launcher: Receiver[ToLauncher] = Receiver(ctx, addrs.launcher_in, ToLauncher, bind=True)
    tokenizer: Receiver[ToTokenizer] = Receiver(ctx, addrs.tokenizer_in, ToTokenizer, bind=True)
    server: Receiver[ToServer] = Receiver(ctx, addrs.server_in, ToServer, bind=True)
    args = ServerArgs(model_path="unused", tp_size=2, log_level="warning")
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
            Receiver(ctx, addrs.worker_plan, ToWorker, bind=False, sub=True) for _ in range(2)
        ]
        results = Sender(ctx, addrs.worker_result, bind=False)
        for rank, sub in enumerate(subs):
            ping = sub.recv(timeout_ms=TIMEOUT_MS)
            assert isinstance(ping, SyncPing)
            # The pool is the smallest over the ranks.
            slots = 24 if rank == 1 else 32
            ready_msg = WorkerReady(
                nonce=ping.nonce, rank=rank, num_slots=slots, max_seqs=8, device="cpu",
                kv_kind="mla_latent", kv_bytes_per_token=480,
            )  # fmt: skip
            results.send(ready_msg)
        ready = launcher.recv(timeout_ms=TIMEOUT_MS)
        assert isinstance(ready, ProcessReady)
        assert (ready.role, ready.info) == ("scheduler", {"total_slots": "24"})

        inbox = Sender(ctx, addrs.scheduler_in, bind=False)
        sampling = SamplingParams(max_new_tokens=2)
        inbox.send(TokenizedRequest(rid="r", index=0, input_ids=[5, 6], sampling=sampling))
        for token, chunk, finish in (
            (7, ScheduledChunk("r#0", [1, 2], True), None),
            (8, ScheduledChunk("r#0", [3], True), "length"),
        ):
            plan = next_plan(subs[0])
            assert plan.chunks == [chunk]
            results.send(StepResult(plan.step, ["r#0"], [token], [None], 0.001))
            batch = tokenizer.recv(timeout_ms=TIMEOUT_MS)
            assert batch == TokenBatch(
                [SeqOutput("r", 0, [token], None, finish, None, 2, 0, token - 6)]
            )
        inbox.send(StatsRequest("q1"))
        stats = server.recv(timeout_ms=TIMEOUT_MS)
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
            kv_kind="mla_latent",
            kv_bytes_per_token=480,
        )

        inbox.send(TokenizedRequest(rid="s", index=0, input_ids=[9], sampling=sampling))
        next_plan(subs[0])
        # While the step computes (no result yet), a state query is answered at once, from the
        # state as planned; a request that arrives meanwhile waits for the step's end.
        inbox.send(TokenizedRequest(rid="t", index=0, input_ids=[10], sampling=sampling))
        inbox.send(StatsRequest("q2"))
        during = server.recv(timeout_ms=TIMEOUT_MS)
        assert isinstance(during, SchedulerStats)
        got = (during.query_id, during.running, during.waiting, during.prompt_tokens, during.steps)
        assert got == ("q2", 1, 0, 3, 3)
        results.send(WorkerFailed(0, "RuntimeError: boom"))
        proc.join(timeout=TIMEOUT_MS / 1000)
        assert proc.exitcode == 1
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        ctx.destroy(linger=0)
        if addrs.ipc_dir:
            shutil.rmtree(addrs.ipc_dir, ignore_errors=True)
