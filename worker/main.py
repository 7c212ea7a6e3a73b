"""The worker process: one per tensor-parallel rank. Receives StepPlans (SUB), runs them,
and rank 0 sends StepResults (PUSH)."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import zmq

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses, Receiver, Sender
from fovea.common.messages import (
    KeepAlive,
    Shutdown,
    StepPlan,
    SyncPing,
    ToWorker,
    WorkerAlive,
    WorkerFailed,
    WorkerReady,
)
from fovea.common.model_config import ModelInfo
from fovea.common.process import report_ready, setup_process
from fovea.worker.cpu_malloc import allocator_name, keep_freed_memory
from fovea.worker.cpu_threads import numa_nodes, replica_cpus, set_cpu_threads
from fovea.worker.distributed import destroy_distributed, init_distributed
from fovea.worker.kv_pool import CPU_DEFAULT_FRACTION, CUDA_DEFAULT_FRACTION
from fovea.worker.model_runner import ModelRunner, pick_device

SILENCE_S = 30


def dist_init_method(args: ServerArgs, addrs: Addresses) -> str:
    """Node 0's --dist-init-addr across nodes; on one node a rendezvous file beside the
    server's ipc sockets (every rank of one server derives the same path)."""
    if args.nnodes > 1:
        return f"tcp://{args.dist_init_addr}"
    base = addrs.ipc_dir or tempfile.gettempdir()
    return f"file://{os.path.join(base, addrs.role('torch_dist_init'))}"  # one per replica


def run_worker(args: ServerArgs, addrs: Addresses, model: ModelInfo, rank: int) -> None:
    role = addrs.role(f"worker{rank}")
    log = setup_process(role, args.log_level, args.log_format)
    device = pick_device(args.device)
    if device.type == "cuda":  # replica d's ranks take devices d*tp .. d*tp + tp-1
        count = torch.cuda.device_count()
        device = torch.device("cuda", (addrs.dp_rank * args.tp_size + rank) % count)
        torch.cuda.set_device(device)
        # More replicas' ranks than devices: those sharing a device share its memory.
        sharing = -(-addrs.dp_size * args.tp_size // count)
        if addrs.dp_size > 1 and sharing > 1:
            fraction = args.mem_fraction_static or CUDA_DEFAULT_FRACTION
            args = dataclasses.replace(args, mem_fraction_static=fraction / sharing)
    elif addrs.dp_size > 1:
        # Replicas on CPU: each on its own CPUs (its threads: their share of them), each
        # sizing its caches on its share of the memory.
        if hasattr(os, "sched_setaffinity"):
            usable = sorted(os.sched_getaffinity(0))
            cpus = replica_cpus(usable, numa_nodes(), addrs.dp_rank, addrs.dp_size)
            os.sched_setaffinity(0, cpus)
        fraction = args.mem_fraction_static or CPU_DEFAULT_FRACTION
        args = dataclasses.replace(args, mem_fraction_static=fraction / addrs.dp_size)
    local_ranks = max(1, args.tp_size // args.nnodes)
    threads = set_cpu_threads(args.cpu_threads, local_ranks) if device.type == "cpu" else 0
    if device.type == "cpu":
        keep_freed_memory()
    init_distributed(args.tp_size, rank, dist_init_method(args, addrs), device)
    runner = ModelRunner(args, model, rank)
    ctx: zmq.Context[Any] = zmq.Context()
    plans: Receiver[ToWorker] = Receiver(ctx, addrs.worker_plan, ToWorker, bind=False, sub=True)
    results = Sender(ctx, addrs.worker_result, bind=False)
    log.info(
        "role=%s rank=%d pid=%d device=%s dtype=%s threads=%s malloc=%s kv_pool=%d slots "
        "local_pool=%d slots (window %d) (%.0f MiB, %.0f resident) sockets: sub %s, push %s",
        role, rank, os.getpid(), runner.device, str(runner.dtype).removeprefix("torch."),
        threads or "-", allocator_name(), runner.num_slots, runner.num_local_slots,
        runner.sliding_window, runner.pool.nbytes() / 2**20,
        runner.pool.committed_bytes() / 2**20, addrs.worker_plan,
        addrs.worker_result,
    )  # fmt: skip
    report_ready(
        ctx, addrs, role, slots=str(runner.num_slots), device=runner.device.type
    )

    def on_ping(msg: SyncPing) -> bool:
        ready = WorkerReady(
            nonce=msg.nonce,
            rank=rank,
            num_slots=runner.num_slots,
            max_seqs=runner.max_seqs,
            device=runner.device.type,
            cross_image_slots=runner.cross_image_slots,
            kv_kind=runner.pool.kind,
            kv_bytes_per_token=runner.pool.bytes_per_token(),
            local_kv_bytes_per_token=runner.pool.bytes_per_token(local=True),
            num_local_slots=runner.num_local_slots,
            sliding_window=runner.sliding_window if runner.num_local_slots else 0,
            encode_ahead=runner.ahead is not None,
        )
        results.send(ready)
        return True

    def on_keepalive(msg: KeepAlive) -> bool:
        results.send(WorkerAlive(rank, msg.seq))
        return True

    def on_plan(plan: StepPlan) -> bool:
        result = runner.step(plan)
        if rank == 0:
            results.send(result)
        return True

    handlers: dict[type, Callable[[Any], bool]] = {
        SyncPing: on_ping,
        StepPlan: on_plan,
        KeepAlive: on_keepalive,
        Shutdown: lambda _: False,
    }
    # A worker on another node has no parent to die with when node 0 goes: it leaves once
    # the scheduler, heard from before, has been silent this long (it sends KeepAlive 1/s).
    silence_ms = SILENCE_S * 1000 if args.node_rank > 0 else None
    heard = False
    try:
        while True:
            msg = plans.recv(timeout_ms=silence_ms if heard else None)
            if msg is None:
                log.error("no word from the scheduler at %s for %d s: exiting",
                          addrs.worker_plan, SILENCE_S)  # fmt: skip
                sys.exit(1)
            heard = True
            if not handlers[type(msg)](msg):
                break
    except Exception as e:
        log.error("step failed:\n%s", traceback.format_exc())
        results.send(WorkerFailed(rank, f"{type(e).__name__}: {e}"))
        results.sock.setsockopt(zmq.LINGER, 5000)
        results.close()
        sys.exit(1)
    finally:
        destroy_distributed()
    log.info("worker%d shut down", rank)
    plans.close()
    results.close()
    ctx.term()
