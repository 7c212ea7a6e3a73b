"""The fetched-URL cache (tokenizer_service/url_cache.py) through MediaLoader, against a local
HTTP server that counts its requests and answers conditional GETs; time is an injected clock."""

from __future__ import annotations

import asyncio
import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image

from fovea.common.messages import ImageRef
from fovea.tokenizer_service.media import MediaError, MediaLoader, MediaPolicy
from fovea.tokenizer_service.url_cache import Fetched, UrlCache, UrlCacheStats


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE = _png((255, 0, 0)), _png((0, 0, 255))
TTL = 10.0
PRIVATE = MediaPolicy(allow_private=True)


def _hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


@dataclass
class Resource:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Origin:
    """GET /<name> answers resources[name] (404 if none); a GET whose If-None-Match or
    If-Modified-Since matches the resource's ETag / Last-Modified gets a 304. `seen` is every
    request: (path, If-None-Match, If-Modified-Since)."""

    port: int = 0
    resources: dict[str, Resource] = field(default_factory=dict)
    seen: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def origin() -> Iterator[Origin]:
    state = Origin()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            etag, since = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
            state.seen.append((self.path, etag, since))
            res = state.resources.get(self.path.lstrip("/"))
            if res is None:
                self.send_error(404)
                return
            validators = {k: v for k, v in res.headers.items() if k in ("ETag", "Last-Modified")}
            if (etag is not None and etag == res.headers.get("ETag")) or (
                since is not None and since == res.headers.get("Last-Modified")
            ):
                self.send_response(304)
                for key, value in validators.items():
                    self.send_header(key, value)
                self.end_headers()
                return
            self.send_response(200)
            for key, value in {**res.headers, "Content-Length": str(len(res.body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(res.body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(
    steps: Any, policy: MediaPolicy = PRIVATE, client: httpx.AsyncClient | None = None
) -> tuple[Any, UrlCache]:
    """asyncio.run(steps(load, clock)) with one loader (and cache) for all its loads:
    load(url) is one request's image hash."""
    clock = Clock()
    cache = UrlCache(policy.url_ttl_s, policy.url_cache_bytes, clock)

    async def main() -> Any:
        loader = MediaLoader(policy, client=client, url_cache=cache)

        async def load(url: str) -> bytes:
            (image,) = await loader.load_all([ImageRef(url=url)])
            return image.hash

        try:
            return await steps(load, clock)
        finally:
            await loader.aclose()

    return asyncio.run(main()), cache


def test_repeated_url_within_the_ttl_makes_one_request(origin: Origin) -> None:
    origin.resources["a"] = Resource(RED)

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        out = [await load(origin.url("a"))]
        clock.now += TTL - 0.001
        out += [await load(origin.url("a")), await load(origin.url("a"))]
        return out

    hashes, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    assert hashes == [_hash(RED)] * 3
    assert origin.seen == [("/a", None, None)]
    assert cache.stats == UrlCacheStats(network=1, cache=2, revalidated=0)
    assert (len(cache), cache.used) == (1, len(RED))


@pytest.mark.parametrize(
    ("validator", "sent"),
    [("ETag", ('"v1"', None)), ("Last-Modified", (None, "Wed, 21 Oct 2015 07:28:00 GMT"))],
)
def test_after_the_ttl_a_304_reuses_the_bytes(
    origin: Origin, validator: str, sent: tuple[str | None, str | None]
) -> None:
    origin.resources["a"] = Resource(RED, {validator: next(v for v in sent if v)})

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        out = [await load(origin.url("a"))]
        clock.now += TTL
        out.append(await load(origin.url("a")))  # stale: revalidated, 304
        clock.now += TTL - 0.001
        out.append(await load(origin.url("a")))  # the 304 restarted the TTL
        return out

    hashes, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    assert hashes == [_hash(RED)] * 3
    assert origin.seen == [("/a", None, None), ("/a", *sent)]
    assert cache.stats == UrlCacheStats(network=1, cache=1, revalidated=1)


def test_changed_bytes_replace_the_cached_ones(origin: Origin) -> None:
    origin.resources["a"] = Resource(RED, {"ETag": '"red"'})

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        out = [await load(origin.url("a"))]
        origin.resources["a"] = Resource(BLUE, {"ETag": '"blue"'})
        out.append(await load(origin.url("a")))  # within the TTL: still red, no request
        clock.now += TTL
        out.append(await load(origin.url("a")))  # If-None-Match "red": 200 with blue
        out.append(await load(origin.url("a")))
        return out

    hashes, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    assert hashes == [_hash(RED), _hash(RED), _hash(BLUE), _hash(BLUE)]
    assert _hash(RED) != _hash(BLUE)
    assert origin.seen == [("/a", None, None), ("/a", '"red"', None)]
    assert cache.stats == UrlCacheStats(network=2, cache=2, revalidated=0)
    assert cache.used == len(BLUE)


def test_stale_entry_without_validators_is_fetched_again(origin: Origin) -> None:
    origin.resources["a"] = Resource(RED)

    async def steps(load: Any, clock: Clock) -> None:
        await load(origin.url("a"))
        clock.now += TTL
        await load(origin.url("a"))

    _, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    assert origin.seen == [("/a", None, None)] * 2
    assert cache.stats == UrlCacheStats(network=2, cache=0, revalidated=0)


def test_no_store_fetches_every_time_and_no_cache_revalidates(origin: Origin) -> None:
    origin.resources["store"] = Resource(RED, {"ETag": '"s"', "Cache-Control": "no-store"})
    origin.resources["cache"] = Resource(BLUE, {"ETag": '"c"', "Cache-Control": "No-Cache"})

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        return [await load(origin.url(name)) for name in ["store", "cache"] * 3]

    hashes, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    assert hashes == [_hash(RED), _hash(BLUE)] * 3
    assert origin.seen == [
        ("/store", None, None),
        ("/cache", None, None),
        ("/store", None, None),
        ("/cache", '"c"', None),
        ("/store", None, None),
        ("/cache", '"c"', None),
    ]
    assert cache.stats == UrlCacheStats(network=4, cache=0, revalidated=2)
    assert (len(cache), cache.used) == (1, len(BLUE))


def test_concurrent_requests_share_one_fetch(origin: Origin) -> None:
    origin.resources["a"] = Resource(RED)

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        return list(await asyncio.gather(load(origin.url("a")), load(origin.url("a"))))

    hashes, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    assert hashes == [_hash(RED)] * 2
    assert origin.seen == [("/a", None, None)]
    assert cache.stats == UrlCacheStats(network=1, cache=1, revalidated=0)


def test_a_failed_fetch_is_not_cached(origin: Origin) -> None:
    url = origin.url("a")

    async def steps(load: Any, clock: Clock) -> list[str | bytes]:
        out: list[str | bytes] = []
        for _ in range(2):
            with pytest.raises(MediaError) as info:
                await load(url)
            out.append(info.value.message)
        origin.resources["a"] = Resource(RED, {"ETag": '"r"'})
        out.append(await load(url))
        del origin.resources["a"]
        clock.now += TTL
        with pytest.raises(MediaError) as info:
            await load(url)  # the revalidation's 404 drops the entry
        out.append(info.value.message)
        return out

    results, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=TTL))
    refusal = f"fetching image {url} failed: HTTP 404"
    assert results == [refusal, refusal, _hash(RED), refusal]
    assert origin.seen == [("/a", None, None)] * 3 + [("/a", '"r"', None)]
    assert cache.stats == UrlCacheStats(network=1, cache=0, revalidated=0)
    assert (len(cache), cache.used) == (0, 0)


def test_ttl_zero_fetches_every_time(origin: Origin) -> None:
    origin.resources["a"] = Resource(RED, {"ETag": '"r"'})

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        first = [await load(origin.url("a")) for _ in range(3)]
        both = await asyncio.gather(load(origin.url("a")), load(origin.url("a")))
        return [*first, *both]

    hashes, cache = _run(steps, MediaPolicy(allow_private=True, url_ttl_s=0))
    assert hashes == [_hash(RED)] * 5
    assert origin.seen == [("/a", None, None)] * 5
    assert cache.stats == UrlCacheStats(network=5, cache=0, revalidated=0)
    assert len(cache) == 0


def test_data_uris_and_bytes_are_not_cached() -> None:
    import base64

    uri = "data:image/png;base64," + base64.b64encode(RED).decode()

    async def steps(load: Any, clock: Clock) -> list[bytes]:
        return [await load(uri), await load(uri)]

    hashes, cache = _run(steps)
    assert hashes == [_hash(RED)] * 2
    assert (cache.stats, len(cache)) == (UrlCacheStats(), 0)


def test_revalidation_is_checked_and_redirected_like_a_first_fetch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The conditional GET follows the redirect with its validators; when the host's name
    resolves to a private address by then, it is refused before any request and the entry goes."""
    dns = {"img.test": "93.184.215.14"}

    def getaddrinfo(host: str, *args: Any, **kw: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (dns[host], 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    seen: list[tuple[str, str | None]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("if-none-match")))
        if request.url.path == "/old":
            return httpx.Response(302, headers={"Location": "/new"})
        if request.headers.get("if-none-match") == '"n"':
            return httpx.Response(304)
        return httpx.Response(200, content=RED, headers={"ETag": '"n"'})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))

    async def steps(load: Any, clock: Clock) -> str:
        await load("http://img.test/old")
        clock.now += TTL
        await load("http://img.test/old")
        clock.now += TTL
        dns["img.test"] = "10.0.0.7"
        with pytest.raises(MediaError) as info:
            await load("http://img.test/old")
        return info.value.message

    message, cache = _run(steps, MediaPolicy(url_ttl_s=TTL), client)
    assert message.startswith("image URL host img.test resolves to a private or local address")
    assert seen == [
        ("http://img.test/old", None),
        ("http://img.test/new", None),
        ("http://img.test/old", '"n"'),
        ("http://img.test/new", '"n"'),
    ]
    assert cache.stats == UrlCacheStats(network=1, cache=0, revalidated=1)
    assert len(cache) == 0


# ---------------------------------------------------------------- UrlCache alone


def test_capacity_evicts_the_least_recently_used() -> None:
    bodies = {"a": b"a" * 40, "b": b"b" * 30, "c": b"c" * 30, "huge": b"h" * 101, "d": b"d" * 10}
    fetched: list[str] = []
    cache = UrlCache(TTL, 100, Clock())

    async def get(url: str) -> bytes:
        async def fetch(headers: dict[str, str]) -> Fetched:
            fetched.append(url)
            return Fetched(bodies[url])

        return await cache.get(url, fetch)

    async def main() -> list[tuple[int, int]]:
        sizes = []
        for url in ["a", "b", "c", "a", "huge", "b"]:
            assert await get(url) == bodies[url]
        # a, b, c fill the 100 bytes; huge is never kept; by last use: c, a, b.
        sizes.append((len(cache), cache.used))
        await get("d")  # evicts c
        for url in ["a", "b", "d"]:
            assert await get(url) == bodies[url]
        sizes.append((len(cache), cache.used))
        return sizes

    assert asyncio.run(main()) == [(3, 100), (3, 80)]
    assert fetched == ["a", "b", "c", "huge", "d"]
    assert cache.stats == UrlCacheStats(network=5, cache=5, revalidated=0)


def test_a_cancelled_waiter_leaves_the_fetch_to_the_others() -> None:
    cache = UrlCache(TTL, 1000, Clock())
    calls: list[str] = []

    async def main() -> tuple[bytes, bool, bool]:
        gate = asyncio.Event()

        def fetch_of(url: str) -> Any:
            async def fetch(headers: dict[str, str]) -> Fetched:
                calls.append(url)
                await gate.wait()
                return Fetched(url.encode())

            return fetch

        async def started(n: int) -> None:
            while len(calls) < n:
                await asyncio.sleep(0)

        first = asyncio.create_task(cache.get("u", fetch_of("u")))
        second = asyncio.create_task(cache.get("u", fetch_of("u")))
        await started(1)
        first.cancel()
        await asyncio.sleep(0)
        gate.set()
        body = await second
        # The last waiter cancelled: the fetch is cancelled too, and nothing is left running.
        gate.clear()
        third = asyncio.create_task(cache.get("v", fetch_of("v")))
        await started(2)
        third.cancel()
        await asyncio.gather(third, return_exceptions=True)
        left = asyncio.all_tasks() - {asyncio.current_task()}
        return body, first.cancelled() and third.cancelled(), not left

    assert asyncio.run(main()) == (b"u", True, True)
    assert calls == ["u", "v"]
    assert cache.stats == UrlCacheStats(network=1, cache=1, revalidated=0)
    assert len(cache) == 1
