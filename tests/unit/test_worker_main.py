"""The worker process over its real sockets: ready ping, a step, Shutdown, and a failing step
reported as WorkerFailed with a non-zero exit."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import zmq

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses, Receiver, Sender
from fovea.common.messages import (
    FromWorker,
    NewSequence,
    ProcessReady,
    ScheduledChunk,
    Shutdown,
    StepPlan,
    StepResult,
    SyncPing,
    WorkerFailed,
    WorkerReady,
)
from fovea.common.model_config import read_model_info
from fovea.common.sampling import SamplingParams
from fovea.worker.model_runner import cpu_has_native_bf16

# Each test spawns a worker process (torch import + model load).
pytestmark = pytest.mark.slow


def _start(path: Path, ctx: zmq.Context[Any]) -> tuple[Any, Sender, Receiver[Any], Receiver[Any]]:
    from fovea.worker.main import run_worker

    addrs = Addresses.local()
    plans = Sender(ctx, addrs.worker_plan, bind=True, pub=True)
    results: Receiver[Any] = Receiver(ctx, addrs.worker_result, FromWorker, bind=True)
    ready: Receiver[Any] = Receiver(ctx, addrs.launcher_in, ProcessReady, bind=True)
    args = ServerArgs(model_path=str(path), max_total_tokens=1000, max_running_requests=4)
    proc = mp.get_context("spawn").Process(
        target=run_worker, args=(args, addrs, read_model_info(str(path)), 0)
    )
    proc.start()
    # PUB drops messages sent before the subscriber joined: ping until answered.
    answer = None
    nonce = 0
    while answer is None and nonce < 600:
        nonce += 1
        plans.send(SyncPing(nonce))
        answer = results.recv(timeout_ms=200)
    # K and V of 2 layers x 2 KV heads x 32, in the dtype "auto" picks for this CPU.
    itemsize = 2 if cpu_has_native_bf16() else 4
    assert answer == WorkerReady(
        nonce=answer.nonce, rank=0, num_slots=1000, max_seqs=4, device="cpu", kv_kind="kv",
        kv_bytes_per_token=2 * 2 * 2 * 32 * itemsize, local_kv_bytes_per_token=0,
    )  # fmt: skip
    results.recv_all()  # later pings' answers
    return proc, plans, results, ready


def test_worker_steps_and_shuts_down(tiny_llama: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    proc, plans, results, _ = _start(tiny_llama, ctx)
    greedy = SamplingParams(temperature=0.0)
    new = NewSequence("r#0", [5, 17, 99], 3, greedy, [])
    plans.send(StepPlan(0, [new], [ScheduledChunk("r#0", [1, 2, 3], True)], []))
    res = results.recv(timeout_ms=30_000)
    assert isinstance(res, StepResult)
    assert (res.step, res.keys, len(res.token_ids), res.logprobs) == (0, ["r#0"], 1, [None])
    plans.send(Shutdown())
    proc.join(30)
    assert proc.exitcode == 0
    ctx.destroy(linger=0)


def test_failing_step_reports_and_exits_nonzero(tiny_llama: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    proc, plans, results, _ = _start(tiny_llama, ctx)
    plans.send(StepPlan(0, [], [ScheduledChunk("nobody#0", [1], True)], []))
    res = results.recv(timeout_ms=30_000)
    assert res == WorkerFailed(0, "KeyError: 'nobody#0'")
    proc.join(30)
    assert proc.exitcode == 1
    ctx.destroy(linger=0)


def test_worker_reports_ready_to_launcher(tiny_llama: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    proc, plans, _, ready = _start(tiny_llama, ctx)
    try:
        msg = ready.recv(timeout_ms=2000)  # sent before the worker answered SyncPing
        assert isinstance(msg, ProcessReady)
        assert (msg.role, msg.pid, msg.info) == (
            "worker0",
            proc.pid,
            {"slots": "1000", "device": "cpu"},
        )
    finally:
        plans.send(Shutdown())
        proc.join(30)
        ctx.destroy(linger=0)
