"""Fetched image URLs' bytes, kept for `--media-url-ttl` seconds so a repeated URL is not
downloaded again. Contract:
- `get(url, fetch)` returns the URL's bytes. Only `fetch` (MediaLoader._fetch: address rule,
  redirects, limits) reaches the network; the cache never makes a request itself.
- Fresh entry (younger than the TTL, response without `Cache-Control: no-cache`): returned with
  no request. Stale entry with validators (ETag / Last-Modified): `fetch` gets If-None-Match /
  If-Modified-Since; a 304 (`Fetched.body is None`) keeps the bytes and restarts the TTL, a 200
  replaces them. Stale entry without validators: fetched again unconditionally.
- `no-store` responses are never kept; `no-cache` ones are kept only to be revalidated, so only
  with validators. Our TTL is the only lifetime: max-age and Expires are not read.
- One fetch per URL at a time: a get arriving while it runs awaits the same task, which is
  cancelled only with its last waiter. A failed fetch (every waiter gets its exception) stores
  nothing and drops the entry it was revalidating.
- At most `capacity_bytes` of bodies; least recently used evicted first; a larger body is not kept.
- ttl_s == 0: no entries and no sharing; every get calls fetch.

Counters (`stats`; fovea:image_url_fetches{result} when metrics are on), one per get:
network (a body came over the network), revalidated (a 304), cache (no request of its own: a
fresh entry, or a fetch already in flight for the URL).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fovea.common import metrics as fovea_metrics


@dataclass(frozen=True)
class Fetched:
    body: bytes | None  # a 200's body, or None for a 304 to a conditional request
    etag: str | None = None
    last_modified: str | None = None
    cache_control: str = ""


# Called with the conditional request headers ({} for a plain GET).
Fetch = Callable[[dict[str, str]], Awaitable[Fetched]]


@dataclass
class UrlCacheStats:
    network: int = 0
    cache: int = 0
    revalidated: int = 0


@dataclass
class _Entry:
    body: bytes
    fetched_at: float  # clock() when the body was fetched or last revalidated
    etag: str | None
    last_modified: str | None
    no_cache: bool  # revalidate on every get


@dataclass
class _Flight:
    task: asyncio.Task[bytes]
    waiters: int = 0


class UrlCache:
    def __init__(
        self, ttl_s: float, capacity_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity_bytes
        self.used = 0  # bytes of the bodies in _entries
        self.stats = UrlCacheStats()
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest use first
        self._inflight: dict[str, _Flight] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, url: str, fetch: Fetch) -> bytes:
        if self.ttl_s <= 0:
            fetched = await fetch({})
            assert fetched.body is not None  # no conditional request, so no 304
            self._count("network")
            return fetched.body
        flight = self._inflight.get(url)
        if flight is not None and flight.task.done():
            flight = None  # finished: its done callback has yet to run
        joined = flight is not None
        if flight is None:
            entry = self._entries.get(url)
            if entry is not None and not entry.no_cache:
                if self._clock() - entry.fetched_at < self.ttl_s:
                    self._entries.move_to_end(url)
                    self._count("cache")
                    return entry.body
            flight = self._start(url, entry, fetch)
        flight.waiters += 1
        try:
            # shield: one waiter's cancellation must not cancel the others' fetch.
            body = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                # Gone from _inflight first: a get arriving meanwhile starts a new fetch
                # rather than joining (and being cancelled with) this one.
                del self._inflight[url]
                flight.task.cancel()
                await asyncio.wait({flight.task})
                if not flight.task.cancelled():
                    flight.task.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            flight.waiters -= 1
        if joined:
            self._count("cache")
        return body

    def _start(self, url: str, stale: _Entry | None, fetch: Fetch) -> _Flight:
        flight = _Flight(asyncio.create_task(self._refresh(url, stale, fetch)))
        self._inflight[url] = flight

        def done(_: object) -> None:
            if self._inflight.get(url) is flight:  # not a newer flight for the URL
                del self._inflight[url]

        # Not a finally in _refresh: a task cancelled before its first step never runs it.
        flight.task.add_done_callback(done)
        return flight

    async def _refresh(self, url: str, stale: _Entry | None, fetch: Fetch) -> bytes:
        """The fetch task of `url`: a conditional GET when `stale` has validators."""
        headers: dict[str, str] = {}
        if stale is not None and stale.etag is not None:
            headers["If-None-Match"] = stale.etag
        if stale is not None and stale.last_modified is not None:
            headers["If-Modified-Since"] = stale.last_modified
        try:
            fetched = await fetch(headers)
        except Exception:  # not on cancellation: the stale entry is as good as before
            self._drop(url)
            raise
        cache_control = {
            d.split("=", 1)[0].strip().lower() for d in fetched.cache_control.split(",")
        }
        no_cache = "no-cache" in cache_control
        if fetched.body is None:
            assert stale is not None and headers, "a 304 answers only a conditional request"
            self._count("revalidated")
            # A 304 may update the validators and Cache-Control; what it omits stays.
            body = stale.body
            etag = fetched.etag or stale.etag
            last_modified = fetched.last_modified or stale.last_modified
            no_cache = no_cache if fetched.cache_control else stale.no_cache
        else:
            self._count("network")
            body, etag, last_modified = fetched.body, fetched.etag, fetched.last_modified
        self._drop(url)
        # A no-cache entry without validators could never be used: it needs a revalidation.
        usable = not no_cache or etag is not None or last_modified is not None
        if "no-store" not in cache_control and usable and len(body) <= self.capacity:
            while self.used + len(body) > self.capacity:
                _, old = self._entries.popitem(last=False)
                self.used -= len(old.body)
            self._entries[url] = _Entry(body, self._clock(), etag, last_modified, no_cache)
            self.used += len(body)
        return body

    def _drop(self, url: str) -> None:
        old = self._entries.pop(url, None)
        if old is not None:
            self.used -= len(old.body)

    def _count(self, result: str) -> None:
        setattr(self.stats, result, getattr(self.stats, result) + 1)
        metrics = fovea_metrics.get()
        if metrics is not None:
            metrics.image_url_fetches.labels(result).inc()
