"""Soak test: N concurrent streaming chat requests (text, and a share with an image from a local
image server) for a fixed time against a running Fovea server. Checks that nothing is lost:
every response completes with a finish_reason, no request errors, the KV cache is all free or in
the prefix tree afterwards; samples the resident memory of each of the server's processes in
equal windows (`--windows`) and reports each one's growth from the first window to the last,
also net of the worker's vision-encoder output cache (read from /get_server_info at each
window's end), which fills up to --mm-cache-mb with new images by design.
Prints one JSON line.

    launch_server --model-path M --chat-template T --allow-private-media-urls &
    python -m fovea.bench.soak --base-url http://127.0.0.1:30000 --model M \\
        --concurrency 256 --duration 60 --image-share 0.25 --server-pid $!

W4 in a loop (issue 26's memory check: every request one new JPEG, 448x448 or 1024x768, 64
tokens out), ten one-minute windows:

    python -m fovea.bench.soak --model M --server-pid $! --concurrency 8 --duration 600 \\
        --windows 10 --image-share 1 --distinct-images 0 --image-size 448x448,1024x768 \\
        --image-format jpeg --max-tokens 64 --exact-tokens --request-timeout 3600
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from fovea.bench.image_server import FORMATS, ImageServer, parse_sizes
from fovea.bench.procmem import label, rss_bytes, tree_pids

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@dataclass
class SoakResult:
    completed: int = 0
    incomplete: int = 0  # a stream ended without a finish_reason
    errors: list[str] = field(default_factory=list)
    memory: MemoryWindows | None = None


class MemoryWindows:
    """Resident memory of each process under the launcher, as the largest RSS each process
    reached in each of `n` equal time windows (a process is named by procmem.label + pid)."""

    def __init__(self, root: int, n: int) -> None:
        self.root, self.n = root, n
        self.by_process: dict[str, list[float]] = {}
        self.total: list[float] = []
        # The worker's vision-encoder output cache (MB) at each window's end: bounded by
        # --mm-cache-mb, it grows with every new image until full, which is not a leak.
        self.image_cache: list[float] = []

    def add_window(self, samples: list[dict[str, int]]) -> None:
        k = len(self.total)
        self.total.append(round(max(sum(s.values()) for s in samples) / 2**20, 1))
        for name in {n for s in samples for n in s}:
            row = self.by_process.setdefault(name, [0.0] * k)
            row.extend([0.0] * (k - len(row)))
            row.append(round(max(s.get(name, 0) for s in samples) / 2**20, 1))

    def sample(self) -> dict[str, int]:
        return {f"{label(p)} [{p}]": rss_bytes(p) for p in tree_pids(self.root)}


def growth(windows: list[float], cache: list[float] | None = None) -> float | None:
    """Growth of the last window's peak over the first window's (the warm-up minute); with
    `cache`, of what the process holds besides the encoder cache."""
    if cache:
        windows = [w - c for w, c in zip(windows, cache, strict=True)]
    if len(windows) < 2 or not windows[0]:
        return None
    return round(windows[-1] / windows[0] - 1, 4)


async def one_request(
    client: httpx.AsyncClient, args: argparse.Namespace, rng: random.Random, image_url: str | None
) -> str | None:
    """None if the request completed with a finish_reason, else what went wrong."""
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
    content: Any = text
    if image_url:
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": text},
        ]
    body = {
        "model": args.model, "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens if args.exact_tokens else rng.randint(4, args.max_tokens),
        "temperature": 0.7, "stream": True, "ignore_eos": args.exact_tokens,
    }  # fmt: skip
    finish = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:]).get("choices", []):
                        finish = c.get("finish_reason") or finish
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a malformed SSE event
        return f"{type(e).__name__}: {e}"
    return None if finish else "incomplete"


async def soak(args: argparse.Namespace) -> SoakResult:
    res = SoakResult()
    images = ImageServer(args.image_sizes, args.image_format) if args.image_share > 0 else None
    fresh = itertools.count(10**6)  # --distinct-images 0: every image request a new image
    end = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency)
    # The load holds all `concurrency` connections of its client; the window reads have a
    # client of their own, or each would wait for a request to finish and the windows drift.
    async with (
        httpx.AsyncClient(
            base_url=args.base_url, timeout=args.request_timeout, limits=limits, trust_env=False
        ) as client,
        httpx.AsyncClient(base_url=args.base_url, timeout=30.0, trust_env=False) as info_client,
    ):

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < end:
                url = None
                if images is not None and rng.random() < args.image_share:
                    n = rng.randrange(args.distinct_images) if args.distinct_images else next(fresh)
                    url = images.url(n)
                err = await one_request(client, args, rng, url)
                if err is None:
                    res.completed += 1
                elif err == "incomplete":
                    res.incomplete += 1
                else:
                    res.errors.append(err)

        async def sample_memory(mem: MemoryWindows) -> None:
            window = args.duration / mem.n
            for _ in range(mem.n):
                samples = []
                w_end = time.monotonic() + window
                while time.monotonic() < w_end:
                    samples.append(mem.sample())
                    await asyncio.sleep(min(1.0, window / 4))
                mem.add_window(samples)
                info = (await info_client.get("/get_server_info")).json()["scheduler"]
                mem.image_cache.append(round(info.get("image_cache_bytes", 0) / 2**20, 3))

        tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        if args.server_pid:
            res.memory = MemoryWindows(args.server_pid, args.windows)
            tasks.append(asyncio.create_task(sample_memory(res.memory)))
        await asyncio.gather(*tasks)
    if images is not None:
        images.close()
    return res


def idle_stats(base_url: str, timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        s: dict[str, int] = httpx.get(base_url + "/get_server_info", timeout=10).json()["scheduler"]
        if (s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    res = asyncio.run(soak(args))
    s = idle_stats(args.base_url)
    mem = res.memory or MemoryWindows(0, 0)
    procs: list[dict[str, Any]] = [
        {"name": name, "rss_windows_mb": w, "growth_after_first_window": growth(w)}
        for name, w in sorted(mem.by_process.items(), key=lambda kv: -max(kv[1]))
    ]
    growths = [p["growth_after_first_window"] for p in procs]
    workers = [p for p in procs if "worker" in str(p["name"])]
    if len(workers) == 1 and mem.image_cache:  # the cache lives in the one worker
        workers[0]["growth_net_of_image_cache"] = growth(
            workers[0]["rss_windows_mb"], mem.image_cache
        )
    return {
        "bench": "soak",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "image_share": args.image_share,
        "image_sizes": args.image_size,
        "completed": res.completed,
        "incomplete": res.incomplete,
        "errors": len(res.errors),
        "first_errors": res.errors[:5],
        "kv_leak_slots": s["total_slots"] - s["free_slots"] - s["tree_slots"],
        "idle": s["running"] == 0 and s["waiting"] == 0,
        "rss_windows_mb": mem.total,
        "rss_growth_after_first_window": growth(mem.total),
        "image_cache_mb_windows": mem.image_cache,
        "rss_growth_net_of_image_cache": growth(mem.total, mem.image_cache),
        "max_process_growth": max((g for g in growths if g is not None), default=None),
        "processes": procs,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--image-share", type=float, default=0.25, help="requests with an image")
    p.add_argument(
        "--distinct-images", type=int, default=16, help="0: every image request a new image"
    )
    p.add_argument("--image-size", default="64x64", help="WxH[,WxH...]: image i has size i mod n")
    p.add_argument("--image-format", choices=sorted(FORMATS), default="png")
    p.add_argument(
        "--exact-tokens", action="store_true", help="every request --max-tokens, ignore_eos"
    )
    p.add_argument("--windows", type=int, default=6, help="memory sampling windows")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--server-pid", type=int, default=0, help="launcher pid: sample its RSS")
    args = p.parse_args(argv)
    try:
        args.image_sizes = parse_sizes(args.image_size)
    except ValueError:
        p.error(f"--image-size must be WxH[,WxH...], got {args.image_size!r}")
    if args.windows < 2:
        p.error("--windows must be at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    out = run(parse_args(argv))
    print(json.dumps(out), flush=True)
    ok = out["errors"] == 0 and out["incomplete"] == 0 and out["kv_leak_slots"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
