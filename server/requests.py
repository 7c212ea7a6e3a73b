"""In-flight requests of the server (and of the offline Engine): send, collect, abort.

One task reads every message addressed to this process (server_in) and routes it to the
request it belongs to. A request's iterator ends after its n sequences finished; if it is
abandoned early (client gone, task cancelled), the scheduler is told to abort it at once so its
KV slots are freed. With --dp-size > 1, aborts and stats queries go to every replica's
scheduler (the tokenizer service alone knows where a request runs; a replica ignores an abort
of a request it does not hold).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import zmq

from fovea.common.ipc import Addresses, AsyncReceiver, Sender
from fovea.common.messages import (
    AbortRequest,
    DeltaBatch,
    GenerateRequest,
    RequestError,
    SchedulerStats,
    StatsRequest,
    TextDelta,
    ToServer,
)
from fovea.server.request_log import RequestRecord

log = logging.getLogger("fovea.server")


class RequestFailed(Exception):
    """The request was refused by a later stage (tokenizer or scheduler), or the server failed."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class _InFlight:
    __slots__ = ("queue", "remaining")

    def __init__(self, n: int) -> None:
        self.queue: asyncio.Queue[TextDelta | RequestError] = asyncio.Queue()
        self.remaining = n


class RequestManager:
    """Must be created and used inside one running event loop."""

    def __init__(self, addrs: Addresses, log_requests: bool = False) -> None:
        self.log_requests = log_requests
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._to_tokenizer = Sender(self._ctx, addrs.tokenizer_in, bind=False)
        self._to_schedulers = [Sender(self._ctx, a, bind=False) for a in addrs.schedulers]
        self._inbox: AsyncReceiver[ToServer] = AsyncReceiver(
            self._ctx, addrs.server_in, ToServer, bind=True
        )
        self._inflight: dict[str, _InFlight] = {}
        # Stats queries in flight: the answers so far (one per replica) and who waits for all.
        self._stats: dict[str, tuple[list[SchedulerStats], asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.failed: str | None = None  # set when the backend is gone: refuse new work
        self._routes = {
            DeltaBatch: self._on_deltas,
            RequestError: self._on_error,
            SchedulerStats: self._on_stats,
        }

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._route_forever())

    async def _route_forever(self) -> None:
        while True:
            msg = await self._inbox.recv()
            self._routes[type(msg)](msg)  # type: ignore[operator]

    def _on_deltas(self, batch: DeltaBatch) -> None:
        for d in batch.deltas:
            req = self._inflight.get(d.rid)
            if req is not None:
                req.queue.put_nowait(d)

    def _on_error(self, err: RequestError) -> None:
        req = self._inflight.get(err.rid)
        if req is not None:
            req.queue.put_nowait(err)

    def _on_stats(self, stats: SchedulerStats) -> None:
        query = self._stats.get(stats.query_id)
        if query is None:
            return
        answers, fut = query
        answers.append(stats)
        if len(answers) == self.dp_size and not fut.done():
            fut.set_result(None)

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    @property
    def dp_size(self) -> int:
        return len(self._to_schedulers)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TextDelta]:
        """Deltas of all the request's sequences, interleaved, until each has finished."""
        if self.failed:
            raise RequestFailed(self.failed, status=503)
        if req.rid in self._inflight:
            raise RequestFailed(f"request id {req.rid!r} is already in flight", status=400)
        state = _InFlight(req.sampling.n)
        self._inflight[req.rid] = state
        try:
            self._to_tokenizer.send(req)
        except BaseException:
            del self._inflight[req.rid]  # never in flight: nothing to abort
            raise
        record = RequestRecord(req, self.log_requests)
        reasons: list[str] = []
        done = False
        try:
            while state.remaining > 0:
                item = await state.queue.get()
                if isinstance(item, RequestError):
                    done = True
                    reasons.append("error")
                    raise RequestFailed(item.message, item.status, item.param)
                record.on_delta(item)
                if item.finish_reason is not None:
                    state.remaining -= 1
                    reasons.append(item.finish_reason)
                yield item
            done = True
        finally:
            del self._inflight[req.rid]
            if not done:
                log.info("rid=%s abandoned by the client: aborting", req.rid)
                for sender in self._to_schedulers:
                    sender.send(AbortRequest(req.rid, None, "client"))
                reasons.append("abort")
            record.finish(",".join(sorted(set(reasons))))

    def fail_all(self, message: str) -> None:
        """The backend died: every waiting request gets a 503 error."""
        self.failed = message
        for rid, req in self._inflight.items():
            req.queue.put_nowait(RequestError(rid=rid, message=message, status=503))

    async def replica_stats(
        self, timeout: float = 10.0, flush_cache: bool = False
    ) -> list[SchedulerStats]:
        """Each replica's scheduler state, by dp rank; with `flush_cache`, after each emptied
        its prefix cache (if nothing ran or waited there: `flushed` says whether it did)."""
        qid = uuid.uuid4().hex
        answers: list[SchedulerStats] = []
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stats[qid] = (answers, fut)
        for sender in self._to_schedulers:
            sender.send(StatsRequest(qid, flush_cache))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            # A scheduler answers state queries during a step, but a cache flush only between
            # steps, and a replica whose workers hang answers nothing: a 503 to retry.
            raise RequestFailed(
                f"the scheduler did not answer within {timeout:g} s; try again", status=503
            ) from None
        finally:
            self._stats.pop(qid, None)
        return sorted(answers, key=lambda a: a.dp_rank)

    async def stats(self, timeout: float = 10.0, flush_cache: bool = False) -> SchedulerStats:
        """The schedulers' state summed over the replicas (the one scheduler's without
        --dp-size); `flushed` only if every replica emptied its cache."""
        return merge_stats(await self.replica_stats(timeout, flush_cache))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for sender in (self._to_tokenizer, *self._to_schedulers):
            sender.close()
        self._inbox.close()
        self._ctx.term()


# The same for every replica (a shape, not a count), or a label.
_NOT_SUMMED = ("dp_rank", "sliding_window", "kv_bytes_per_token", "local_kv_bytes_per_token")


def merge_stats(replicas: list[SchedulerStats]) -> SchedulerStats:
    """The replicas' counts summed (so free + tree == total still holds when idle)."""
    if len(replicas) == 1:
        return replicas[0]
    fields = msgspec.structs.asdict(replicas[0])
    for name, value in fields.items():
        if isinstance(value, int) and not isinstance(value, bool) and name not in _NOT_SUMMED:
            fields[name] = sum(getattr(r, name) for r in replicas)
    fields["flushed"] = all(r.flushed for r in replicas)
    return SchedulerStats(**fields)
