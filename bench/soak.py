"""Soak test: N concurrent streaming chat requests (text, and a share with an image from a local
image server) for a fixed time against a running Fovea server. Checks that nothing is lost:
every response completes with a finish_reason, no request errors, the KV cache is all free or in
the prefix tree afterwards; samples the resident memory of the server's processes in six equal
windows. Prints one JSON line.

    launch_server --model-path M --chat-template T --allow-private-media-urls &
    python -m fovea.bench.soak --base-url http://127.0.0.1:30000 --model M \\
        --concurrency 256 --duration 60 --image-share 0.25 --server-pid $!
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fovea.bench.image_server import ImageServer

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@dataclass
class SoakResult:
    completed: int = 0
    incomplete: int = 0  # a stream ended without a finish_reason
    errors: list[str] = field(default_factory=list)
    rss_windows_mb: list[float] = field(default_factory=list)


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        p = int(entry.name)
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(p)
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[p] = int(line.split()[1])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total / 1024


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
        "max_tokens": rng.randint(4, args.max_tokens), "temperature": 0.7, "stream": True,
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
    images = ImageServer([(64, 64)], "png") if args.image_share > 0 else None
    end = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=args.request_timeout, limits=limits, trust_env=False
    ) as client:

        async def worker(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < end:
                url = None
                if images is not None and rng.random() < args.image_share:
                    url = images.url(rng.randrange(args.distinct_images))
                err = await one_request(client, args, rng, url)
                if err is None:
                    res.completed += 1
                elif err == "incomplete":
                    res.incomplete += 1
                else:
                    res.errors.append(err)

        async def sample_memory() -> None:
            window = args.duration / 6
            for _ in range(6):
                samples = []
                w_end = time.monotonic() + window
                while time.monotonic() < w_end:
                    samples.append(process_tree_rss_mb(args.server_pid))
                    await asyncio.sleep(min(1.0, window / 4))
                res.rss_windows_mb.append(round(max(samples), 1))

        tasks = [asyncio.create_task(worker(i)) for i in range(args.concurrency)]
        if args.server_pid:
            tasks.append(asyncio.create_task(sample_memory()))
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
    w = res.rss_windows_mb
    return {
        "bench": "soak",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "image_share": args.image_share,
        "completed": res.completed,
        "incomplete": res.incomplete,
        "errors": len(res.errors),
        "first_errors": res.errors[:5],
        "kv_leak_slots": s["total_slots"] - s["free_slots"] - s["tree_slots"],
        "idle": s["running"] == 0 and s["waiting"] == 0,
        "rss_windows_mb": w,
        "rss_growth_2nd_to_6th": round(w[5] / w[1] - 1, 4) if len(w) == 6 and w[1] else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--image-share", type=float, default=0.25, help="requests with an image")
    p.add_argument("--distinct-images", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--server-pid", type=int, default=0, help="launcher pid: sample its RSS")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    out = run(parse_args(argv))
    print(json.dumps(out), flush=True)
    ok = out["errors"] == 0 and out["incomplete"] == 0 and out["kv_leak_slots"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
