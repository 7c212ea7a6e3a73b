"""Typed ZeroMQ sockets and the address book of one server.

Topology (who binds what; arrows are PUSH->PULL unless marked):

    server        binds server_in      <- tokenizer (DeltaBatch, RequestError),
                                          scheduler (RequestError, SchedulerStats)
    tokenizer     binds tokenizer_in   <- server (GenerateRequest), scheduler (TokenBatch)
    scheduler     binds scheduler_in   <- tokenizer (TokenizedRequest),
                                          server and tokenizer (AbortRequest, StatsRequest)
    scheduler     binds worker_plan    -> every worker rank (PUB/SUB: StepPlan)
    scheduler     binds worker_result  <- worker rank 0 (StepResult), any rank (WorkerReady)
    launcher      binds launcher_in    <- every child (ProcessReady), scheduler (Heartbeat)

Data parallelism (--dp-size N): each replica d has its own scheduler_in, worker_plan and
worker_result (`replica(d)`); server_in, tokenizer_in and launcher_in are shared. The
tokenizer sends each request to one replica's scheduler_in (`schedulers[d]`); the server sends
aborts and stats queries to all of them; every scheduler also pushes ReplicaState (its prefix
tree's changes and its load) to tokenizer_in.

Multi-node (--nnodes > 1): the two worker edges are TCP on node 0 (`across_nodes`); every
other socket stays ipc:// on its own node.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any, Generic, TypeVar

import msgspec
import zmq

from fovea.common.codec import Decoder, Encoder

T = TypeVar("T")


class Addresses(msgspec.Struct, frozen=True, kw_only=True):
    server_in: str
    tokenizer_in: str
    scheduler_in: str
    worker_plan: str
    worker_result: str
    launcher_in: str
    # Every replica's scheduler_in, by dp rank (one entry without --dp-size).
    schedulers: list[str]
    # The replica these addresses are for: its scheduler and workers use scheduler_in,
    # worker_plan and worker_result above (the HTTP and tokenizer processes: replica 0's).
    dp_rank: int = 0

    @staticmethod
    def local(dp_size: int = 1) -> Addresses:
        """ipc:// endpoints in a fresh private directory (removed by the launcher)."""
        d = tempfile.mkdtemp(prefix=f"fovea-{os.getpid()}-")
        names = ("server_in", "tokenizer_in", "scheduler_in", "worker_plan", "worker_result")
        kw: dict[str, Any] = {n: f"ipc://{d}/{n}" for n in (*names, "launcher_in")}
        kw["schedulers"] = [f"ipc://{d}/scheduler_in{_suffix(r, dp_size)}" for r in range(dp_size)]
        kw["scheduler_in"] = kw["schedulers"][0]
        return Addresses(**kw)

    @property
    def dp_size(self) -> int:
        return len(self.schedulers)

    def replica(self, dp_rank: int) -> Addresses:
        """These addresses as replica `dp_rank`'s scheduler and workers use them."""
        suffix = _suffix(dp_rank, self.dp_size)

        def own(addr: str) -> str:
            return addr + suffix if addr.startswith("ipc://") else addr

        return msgspec.structs.replace(
            self,
            dp_rank=dp_rank,
            scheduler_in=self.schedulers[dp_rank],
            worker_plan=own(_base(self.worker_plan, self.dp_rank, self.dp_size)),
            worker_result=own(_base(self.worker_result, self.dp_rank, self.dp_size)),
        )

    def role(self, kind: str) -> str:
        """A process role of this replica: `kind` itself without data parallelism, else
        `kind-dp<rank>` (the launcher stops processes by the kind they start with)."""
        return kind + _suffix(self.dp_rank, self.dp_size).replace("_", "-")

    def across_nodes(self, host: str, port: int) -> Addresses:
        """These addresses with the scheduler-worker edge on TCP (node 0 listens on port + 1
        and port + 2), for workers on other nodes; the rest stays local."""
        return msgspec.structs.replace(
            self, worker_plan=f"tcp://{host}:{port + 1}", worker_result=f"tcp://{host}:{port + 2}"
        )

    @property
    def ipc_dir(self) -> str | None:
        prefix = "ipc://"
        if self.launcher_in.startswith(prefix):
            return os.path.dirname(self.launcher_in[len(prefix) :])
        return None


def _suffix(dp_rank: int, dp_size: int) -> str:
    return f"_dp{dp_rank}" if dp_size > 1 else ""


def _base(addr: str, dp_rank: int, dp_size: int) -> str:
    suffix = _suffix(dp_rank, dp_size)
    return addr[: len(addr) - len(suffix)] if suffix and addr.endswith(suffix) else addr


def _socket(ctx: zmq.Context[Any], kind: int, addr: str, bind: bool) -> zmq.Socket[Any]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    # No high-water-mark drops: a dropped message would be a lost request.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    return sock  # type: ignore[no-any-return]


class Sender:
    """PUSH or PUB end. `send` never blocks on a slow peer (no HWM)."""

    def __init__(self, ctx: zmq.Context[Any], addr: str, *, bind: bool, pub: bool = False):
        self.addr = addr
        self.sock = _socket(ctx, zmq.PUB if pub else zmq.PUSH, addr, bind)
        self._enc = Encoder()

    def send(self, msg: Any) -> None:
        self.sock.send_multipart(self._enc.encode(msg), copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class Receiver(Generic[T]):
    """PULL or SUB end that decodes exactly the union `types`."""

    def __init__(
        self, ctx: zmq.Context[Any], addr: str, types: Any, *, bind: bool, sub: bool = False
    ):
        self.addr = addr
        self.sock = _socket(ctx, zmq.SUB if sub else zmq.PULL, addr, bind)
        self._dec = Decoder(types)

    def recv(self, timeout_ms: int | None = None) -> T | None:
        """Block up to timeout_ms (None: forever); None if nothing came."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        frames = self.sock.recv_multipart(copy=False)
        return self._dec.decode([f.buffer for f in frames])  # type: ignore[no-any-return]

    def recv_all(self) -> list[T]:
        """Every message already queued, without blocking."""
        out: list[T] = []
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            out.append(self._dec.decode([f.buffer for f in frames]))

    def close(self) -> None:
        self.sock.close(linger=0)


class AsyncReceiver(Generic[T]):
    """PULL end for asyncio code (the HTTP server, the tokenizer service, the Engine).

    A plain socket, read without blocking; the event loop watches its FD only to wake a waiting
    `recv`. pyzmq's asyncio socket makes a Future, reads two socket options and registers
    callbacks for every message: in the HTTP process that was a third of the CPU a decode step
    of 16 streams spent routing their text. The FD signals new activity in the socket's
    mailbox, not "a message is queued", so `recv` always reads what is queued before it waits.
    One consumer at a time."""

    def __init__(self, ctx: zmq.Context[Any], addr: str, types: Any, *, bind: bool):
        self.addr = addr
        self.sock = _socket(ctx, zmq.PULL, addr, bind)
        self._dec = Decoder(types)
        self._fd = int(self.sock.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop watching the FD
        self._waiter: asyncio.Future[None] | None = None

    async def recv(self) -> T:
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._readable()
                continue
            return self._dec.decode([f.buffer for f in frames])  # type: ignore[no-any-return]

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._unwatch()
            loop.add_reader(self._fd, self._on_readable)
            self._loop = loop
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        else:  # no one waiting: take the signal (what is queued stays for the next recv)
            self.sock.getsockopt(zmq.EVENTS)

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None

    def close(self) -> None:
        self._unwatch()
        self.sock.close(linger=0)
