"""Process overhead of a decode step: the inter-token latency B concurrent streams see from a
running server, against the bare model step (ModelRunner.step: forward + sampling) for the same
batch in this process. Same model, same batch, same prompt length, measured one after the other
in one run. Prints one JSON line.

    python -m fovea.bench.step_overhead --model SmolLM2-135M-Instruct --batch 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from fovea.worker.model_runner import ModelRunner


def bare_step_s(model_path: str, batch: int, prompt_len: int, steps: int) -> float:
    """Median seconds of one decode step of `batch` sequences, model runner only."""
    from fovea.common.config import ServerArgs
    from fovea.common.messages import NewSequence, ScheduledChunk, StepPlan
    from fovea.common.model_config import read_model_info
    from fovea.common.sampling import SamplingParams

    args = ServerArgs(model_path=model_path, max_total_tokens=batch * (prompt_len + steps + 16))
    runner = ModelRunner(args, read_model_info(model_path))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=steps + 1)
    keys = [f"s{i}" for i in range(batch)]
    next_slot = runner.pool.page_size  # slots below are the scratch page

    def slots(n: int) -> list[int]:
        nonlocal next_slot
        next_slot += n
        return list(range(next_slot - n, next_slot))

    new = [
        NewSequence(k, [100 + i] * prompt_len, prompt_len, greedy, []) for i, k in enumerate(keys)
    ]
    runner.step(StepPlan(0, new, [ScheduledChunk(k, slots(prompt_len), True) for k in keys], []))
    times = []
    for step in range(1, steps + 1):
        plan = StepPlan(step, [], [ScheduledChunk(k, slots(1), True) for k in keys], [])
        t0 = time.perf_counter()
        runner.step(plan)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


async def server_itl_s(base: str, batch: int, prompt_len: int, steps: int) -> float:
    """Median gap between tokens of `batch` concurrent streams, their first 5 tokens left out."""
    gaps: list[float] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "m", "prompt": [100 + i] * prompt_len, "max_tokens": steps,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        last, n = None, 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                n += 1
                if last is not None and n > 5:
                    gaps.append(now - last)
                last = now

    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        await asyncio.gather(*(one(client, i) for i in range(batch)))
    return statistics.median(gaps)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--port", type=int, default=31400)
    args = p.parse_args(argv)
    from fovea.server.builtin_models import resolve_model_path

    path = resolve_model_path(args.model)
    bare = bare_step_s(path, args.batch, args.prompt_len, args.steps)
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", path, "--port",
         str(args.port), "--served-model-name", "m", "--max-total-tokens",
         str(args.batch * (args.prompt_len + args.steps + 16))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not _healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        served = asyncio.run(server_itl_s(base, args.batch, args.prompt_len, args.steps))
    finally:
        proc.terminate()
        proc.wait(60)
    out: dict[str, Any] = {
        "bench": "step_overhead", "model": args.model, "batch": args.batch,
        "prompt_len": args.prompt_len, "bare_step_ms": round(bare * 1e3, 2),
        "server_itl_ms": round(served * 1e3, 2), "ratio": round(served / bare, 3),
    }  # fmt: skip
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
