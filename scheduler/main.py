"""The scheduler process: handshake with the workers, then receive, step, send.

No torch here: only the scheduler core, msgspec and zmq.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, NamedTuple, NoReturn

import zmq

from fovea.common import metrics as fovea_metrics
from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses, Receiver, Sender
from fovea.common.messages import (
    FromWorker,
    Heartbeat,
    KeepAlive,
    StatsRequest,
    StepPlan,
    StepResult,
    SyncPing,
    TokenBatch,
    ToScheduler,
    WorkerAlive,
    WorkerFailed,
    WorkerReady,
)
from fovea.common.model_config import ModelInfo
from fovea.common.process import report_ready, setup_process
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.scheduler.stats import ReplicaPublisher

PING_INTERVAL_S = 0.1
IDLE_POLL_MS = 1000  # an idle scheduler blocks on its inbox this long per wait
HEARTBEAT_S = 1.0  # at most one Heartbeat (and one metrics update) per this many seconds
# A rank that left this many KeepAlives unanswered is gone. KeepAlives go out only between
# steps, so a long step never makes a live rank look silent.
MAX_UNANSWERED = 5


def run_scheduler(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    role = addrs.role("scheduler")
    log = setup_process(role, args.log_level, args.log_format)
    ctx: zmq.Context[Any] = zmq.Context()
    inbox: Receiver[ToScheduler] = Receiver(ctx, addrs.scheduler_in, ToScheduler, bind=True)
    plans = Sender(ctx, addrs.worker_plan, bind=True, pub=True)
    results: Receiver[FromWorker] = Receiver(ctx, addrs.worker_result, FromWorker, bind=True)
    to_tokenizer = Sender(ctx, addrs.tokenizer_in, bind=False)
    to_server = Sender(ctx, addrs.server_in, bind=False)
    limits = handshake(plans, results, args.tp_size, log)
    config = SchedulerConfig.from_args(
        args, model, limits.max_seqs, limits.device, limits.cross_image_slots,
        limits.sliding_window, addrs.dp_rank, kv_kind=limits.kv_kind,
        kv_bytes_per_token=limits.kv_bytes_per_token,
        local_kv_bytes_per_token=limits.local_kv_bytes_per_token,
        encode_ahead=limits.encode_ahead,
    )  # fmt: skip
    core = Scheduler(config, limits.num_slots, num_local_slots=limits.num_local_slots)
    log.info(
        "role=%s pid=%d slots=%d local_slots=%d window=%d page_size=%d max_running=%d "
        "prefill_batch=%d image_slots=%d sockets: in=%s plan=%s result=%s tokenizer=%s "
        "server=%s",
        role, os.getpid(), core.total_slots, limits.num_local_slots, limits.sliding_window,
        args.page_size, config.max_running_requests, config.batch_target,
        limits.cross_image_slots,
        addrs.scheduler_in, addrs.worker_plan, addrs.worker_result, addrs.tokenizer_in,
        addrs.server_in,
    )  # fmt: skip
    report_ready(ctx, addrs, role, total_slots=str(core.total_slots))
    to_launcher = Sender(ctx, addrs.launcher_in, bind=False)
    publish = MetricsPublisher(core, addrs.dp_rank) if fovea_metrics.enabled() else None
    # With several replicas the router (tokenizer service) mirrors this one's tree and load.
    replica = ReplicaPublisher(core, addrs.dp_rank) if addrs.dp_size > 1 else None
    last_beat = 0.0
    ranks = RankWatch(args.tp_size, log)

    def flush() -> None:
        # The router's view first: a finished request's prefix is in it before the client
        # hears the request is done (and may send the next turn).
        if replica is not None and (state := replica.take()) is not None:
            to_tokenizer.send(state)
        if core.outputs:
            to_tokenizer.send(TokenBatch(core.outputs))
            core.outputs = []
        for out in core.to_server:
            to_server.send(out)
        core.to_server = []

    step_inbox = StepInbox(inbox, results, core, to_server)
    while True:
        msgs = [*step_inbox.take_deferred(), *inbox.recv_all()]
        if not msgs and not core.has_work:
            flush()
            msg = inbox.recv(timeout_ms=IDLE_POLL_MS)  # idle: block instead of spinning
            msgs = [msg] if msg is not None else []
        for msg in msgs:
            core.handle(msg)
        plan = core.schedule()
        if plan is not None:
            plans.send(plan)
        # The last step's tokens go out only now: the detokenizer and HTTP processes they
        # wake compete for the CPUs, and the worker should have its next plan first.
        flush()
        if plan is not None:
            result = wait_result(results, plan, log, ranks, step_inbox)
            core.process_result(result)
            if publish is not None:
                publish.step(plan, result.forward_s)
        if (now := time.monotonic()) - last_beat >= HEARTBEAT_S:
            last_beat = now
            to_launcher.send(Heartbeat(role))
            for answer in results.recv_all():
                ranks.take(answer)
            plans.send(KeepAlive(ranks.next_seq()))
            if publish is not None:
                publish()


class MetricsPublisher:
    """Copies the scheduler's counters and gauges into Prometheus (counters by their
    increase since the last call)."""

    def __init__(self, core: Scheduler, dp_rank: int = 0) -> None:
        m = fovea_metrics.get()
        assert m is not None
        self.m, self.core, self.dp = m, core, str(dp_rank)
        self.seen: dict[str, int] = {}
        self.counters = {
            "prompt_tokens": m.prompt_tokens,
            "generated_tokens": m.generation_tokens,
            "cache_hit_tokens": m.cached_tokens,
            "images_received": m.images,
            "images_encoded": m.images_encoded,
        }

    def step(self, plan: StepPlan, forward_s: float) -> None:
        decode = not plan.new and all(len(c.new_slots) == 1 and c.sample for c in plan.chunks)
        self.m.step_forward.labels("decode" if decode else "prefill", self.dp).observe(forward_s)

    def __call__(self) -> None:
        core, m, dp = self.core, self.m, self.dp
        for attr, counter in self.counters.items():
            value = getattr(core, attr)
            counter.labels(dp).inc(value - self.seen.get(attr, 0))
            self.seen[attr] = value
        m.num_running_reqs.labels(dp).set(len(core.running))
        m.num_queue_reqs.labels(dp).set(len(core.waiting))
        held = core.total_slots - core.allocator.available - core.cache.evictable_size
        m.token_usage.labels(dp).set(held / core.total_slots)
        m.cache_hit_rate.labels(dp).set(core.cache_hit_tokens / max(1, core.prompt_tokens))
        m.image_cache_hit_rate.labels(dp).set(
            1 - core.images_encoded / max(1, core.images_received)
        )
        m.image_cache_bytes.labels(dp).set(core.image_cache_bytes)


class RankLimits(NamedTuple):
    """What every rank can hold (the smallest over the ranks) and computes on."""

    num_slots: int
    max_seqs: int
    cross_image_slots: int
    device: str  # torch device type, the same on every rank
    kv_kind: str  # what the pools hold per token, the same on every rank
    kv_bytes_per_token: int  # rank 0's, global pool
    local_kv_bytes_per_token: int  # rank 0's, local pool (0: one pool)
    num_local_slots: int = 0  # the sliding-window layers' pool; 0: one pool
    sliding_window: int = 0
    encode_ahead: bool = False  # every rank takes StepPlan.encode


def handshake(
    plans: Sender, results: Receiver[FromWorker], tp_size: int, log: logging.Logger
) -> RankLimits:
    """Ping until every rank answered (PUB/SUB drops what is sent before a subscriber joins)."""
    nonce = int.from_bytes(os.urandom(4), "little")
    ready: dict[int, WorkerReady] = {}
    while len(ready) < tp_size:
        plans.send(SyncPing(nonce))
        deadline = time.monotonic() + PING_INTERVAL_S
        while (left := deadline - time.monotonic()) > 0:
            msg = results.recv(timeout_ms=max(1, int(left * 1000)))
            if isinstance(msg, WorkerFailed):
                fail(msg, log)
            if isinstance(msg, WorkerReady) and msg.nonce == nonce:
                ready[msg.rank] = msg
    return RankLimits(
        min(r.num_slots for r in ready.values()),
        min(r.max_seqs for r in ready.values()),
        min(r.cross_image_slots for r in ready.values()),
        ready[0].device,
        ready[0].kv_kind,
        ready[0].kv_bytes_per_token,
        ready[0].local_kv_bytes_per_token,
        min(r.num_local_slots for r in ready.values()),
        ready[0].sliding_window,
        all(r.encode_ahead for r in ready.values()),
    )


class RankWatch:
    """Which ranks answer KeepAlives; exits the scheduler (and so the server) when one has
    left MAX_UNANSWERED of them unanswered: a worker on another node that died, or its node."""

    def __init__(self, tp_size: int, log: logging.Logger) -> None:
        self.seq = 0
        self.answered = dict.fromkeys(range(tp_size), 0)
        self.log = log

    def next_seq(self) -> int:
        for rank, seq in self.answered.items():
            if self.seq - seq >= MAX_UNANSWERED:
                self.log.error(
                    "worker rank %d answered none of the last %d keep-alives: it is gone; "
                    "the scheduler exits", rank, self.seq - seq,
                )  # fmt: skip
                sys.exit(1)
        self.seq += 1
        return self.seq

    def take(self, msg: FromWorker) -> None:
        """Note an answer; a WorkerFailed ends the process; other messages are stale."""
        if isinstance(msg, WorkerAlive):
            self.answered[msg.rank] = max(self.answered[msg.rank], msg.seq)
        elif isinstance(msg, WorkerFailed):
            fail(msg, self.log)


class StepInbox:
    """The scheduler's inbox while the workers compute a step (an image's encode can take
    a minute on a CPU, longer than the HTTP server waits for /get_server_info): state queries
    are answered at once, from the state as planned (the step changes nothing until its
    result comes back; requests that arrived during the step are not in it yet); everything
    else (new requests, aborts, cache flushes) waits in `deferred` for the step's end, in
    arrival order."""

    def __init__(
        self,
        inbox: Receiver[ToScheduler],
        results: Receiver[FromWorker],
        core: Scheduler,
        to_server: Sender,
    ) -> None:
        self.inbox, self.core, self.to_server = inbox, core, to_server
        self.deferred: list[ToScheduler] = []
        self.poller = zmq.Poller()  # both sockets, made once: wait_result polls it every step
        self.poller.register(results.sock, zmq.POLLIN)
        self.poller.register(inbox.sock, zmq.POLLIN)

    def take_deferred(self) -> list[ToScheduler]:
        out, self.deferred = self.deferred, []
        return out

    def take(self) -> None:
        for msg in self.inbox.recv_all():
            if isinstance(msg, StatsRequest) and not msg.flush_cache:
                self.core.stats(msg)
            else:
                self.deferred.append(msg)
        for out in self.core.to_server:
            self.to_server.send(out)
        self.core.to_server = []


def wait_result(
    results: Receiver[FromWorker],
    plan: StepPlan,
    log: logging.Logger,
    ranks: RankWatch,
    step_inbox: StepInbox,
) -> StepResult:
    """Block until rank 0 returns this plan's result, answering `step_inbox`'s state queries
    meanwhile. Late WorkerReady answers to extra pings are skipped, keep-alive answers noted;
    a WorkerFailed ends the process."""
    while True:
        ready = dict(step_inbox.poller.poll())
        if step_inbox.inbox.sock in ready:
            step_inbox.take()
        if results.sock not in ready:
            continue
        msg = results.recv()
        assert msg is not None  # no timeout
        ranks.take(msg)
        if isinstance(msg, StepResult):
            if msg.step != plan.step:
                log.error("worker returned step %d while step %d ran", msg.step, plan.step)
                sys.exit(1)
            return msg


def fail(msg: WorkerFailed, log: logging.Logger) -> NoReturn:
    log.error("worker rank %d failed: %s; the scheduler exits", msg.rank, msg.message)
    sys.exit(1)
