"""Process overhead of a decode step: the inter-token latency B concurrent streams see from a
running server, against the bare model step (ModelRunner.step: forward + sampling) for the same
batch in this process. Same model, same batch, same prompt length; `--rounds` pairs measured
one right after the other in one run, the ratio the median of the pairs'. Prints one JSON line.

    python -m fovea.bench.step_overhead --model SmolLM2-135M-Instruct --batch 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import httpx
import torch

from fovea.bench.serving import Result, send_one
from fovea.worker.cpu_malloc import keep_freed_memory, worker_preload
from fovea.worker.cpu_threads import set_cpu_threads
from fovea.worker.model_runner import ModelRunner

_PRELOADED = "FOVEA_STEP_OVERHEAD_PRELOAD"  # what this bench added to LD_PRELOAD for itself


class BareSteps:
    """The model runner alone in this process: one prefill of `batch` prompts, then decode
    steps; each round drops the last round's sequences and starts afresh in the same slots."""

    def __init__(self, model_path: str, batch: int, prompt_len: int, steps: int) -> None:
        from fovea.common.config import ServerArgs
        from fovea.common.model_config import read_model_info

        total = batch * (prompt_len + steps + 16)
        self.runner = ModelRunner(
            ServerArgs(model_path=model_path, max_total_tokens=total), read_model_info(model_path)
        )
        self.batch, self.prompt_len, self.steps = batch, prompt_len, steps
        self.rounds = 0
        self.step = 0

    def median_step_s(self) -> float:
        """Median seconds of a decode step of the batch (the first 3 left out)."""
        from fovea.common.messages import NewSequence, ScheduledChunk, StepPlan
        from fovea.common.sampling import SamplingParams

        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.steps + 1)
        dropped = [f"r{self.rounds - 1}s{i}" for i in range(self.batch)] if self.rounds else []
        keys = [f"r{self.rounds}s{i}" for i in range(self.batch)]
        self.rounds += 1
        next_slot = self.runner.pool.page_size  # slots below are the scratch page

        def slots(n: int) -> list[int]:
            nonlocal next_slot
            next_slot += n
            return list(range(next_slot - n, next_slot))

        def run(plan_chunks: list[ScheduledChunk], **kw: Any) -> float:
            plan = StepPlan(self.step, chunks=plan_chunks, **kw)
            self.step += 1
            t0 = time.perf_counter()
            self.runner.step(plan)
            return time.perf_counter() - t0

        n = self.prompt_len
        new = [NewSequence(k, [100 + i] * n, n, greedy, []) for i, k in enumerate(keys)]
        run([ScheduledChunk(k, slots(n), True) for k in keys], new=new, dropped=dropped)
        times = [
            run([ScheduledChunk(k, slots(1), True) for k in keys], new=[], dropped=[])
            for _ in range(self.steps)
        ]
        return statistics.median(times[3:])


async def server_itl_s(base: str, batch: int, prompt_len: int, steps: int) -> float:
    """Median gap between tokens of `batch` concurrent streams (serving.py's client), the
    first 5 gaps of each left out."""
    url = base + "/v1/completions"

    async def one(session: aiohttp.ClientSession, i: int) -> Result:
        body = {"model": "m", "prompt": [100 + i] * prompt_len, "max_tokens": steps,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        return await send_one(session, url, body)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(batch)))
    if not all(r.ok for r in results):
        raise SystemExit(f"a stream failed: {next(r.error for r in results if not r.ok)}")
    return statistics.median(gap for r in results for gap in r.itl_s[5:])


def decode_forward_s(base: str) -> tuple[float, float]:
    """(sum, count) of the server's decode-step forwards so far (its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    got = {"_sum": 0.0, "_count": 0.0}
    text = httpx.get(base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            suffix = s.name.removeprefix("fovea:step_forward_seconds")
            if suffix in got and s.labels.get("kind") == "decode":
                got[suffix] += s.value  # summed over the replicas (dp_rank)
    return got["_sum"], got["_count"]


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
    p.add_argument("--rounds", type=int, default=5, help="bare/server pairs, interleaved")
    p.add_argument("--port", type=int, default=31400)
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="compute threads of both sides (the server's --cpu-threads; 0: its auto choice)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="serve with --enable-metrics and also report the mean decode forward inside the "
        "server (fovea:step_forward_seconds): the rest of the inter-token latency is spent "
        "between steps. Metrics cost a little per token, so the headline ratio is without.",
    )
    args = p.parse_args(argv)
    # The first 3 bare steps and 5 gaps of each stream are left out of the medians.
    least_of = (("cpu_threads", 0), ("batch", 1), ("prompt_len", 1), ("steps", 8), ("rounds", 1))
    for flag, least in least_of:
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    preload = worker_preload("auto", os.environ)
    if preload:
        # The bare step runs in this process: restart it with the allocator the launcher gives
        # the server's worker (the server itself is then started without it, as a user would).
        env = {**os.environ, "LD_PRELOAD": preload, _PRELOADED: preload}
        cmd = [sys.executable, "-m", "fovea.bench.step_overhead"]
        os.execve(sys.executable, [*cmd, *(sys.argv[1:] if argv is None else argv)], env)
    server_env = dict(os.environ)
    if _PRELOADED in server_env and server_env[_PRELOADED] == server_env.get("LD_PRELOAD"):
        del server_env[_PRELOADED], server_env["LD_PRELOAD"]
    from fovea.launcher.builtin_models import resolve_model_path

    path = resolve_model_path(args.model)
    keep_freed_memory()  # the rest of the worker's set-up: its glibc settings, its threads
    set_cpu_threads(args.cpu_threads)
    bare = BareSteps(path, args.batch, args.prompt_len, args.steps)
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", path, "--port",
         str(args.port), "--served-model-name", "m", "--max-total-tokens",
         str(args.batch * (args.prompt_len + args.steps + 16)),
         "--cpu-threads", str(args.cpu_threads),
         *(["--enable-metrics"] if args.breakdown else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env,
    )  # fmt: skip
    bare_ms: list[float] = []
    served_ms: list[float] = []
    forward = [0.0, 0.0]  # decode forwards in the server during the measured rounds: s, count
    try:
        deadline = time.monotonic() + 600
        while not _healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        asyncio.run(server_itl_s(base, args.batch, args.prompt_len, 8))  # warm-up
        # Pairs, one right after the other, so a drift in the machine's speed (shared,
        # noisy) moves both sides of a pair alike.
        for _ in range(args.rounds):
            bare_ms.append(bare.median_step_s() * 1e3)
            before = decode_forward_s(base) if args.breakdown else (0.0, 0.0)
            served = asyncio.run(server_itl_s(base, args.batch, args.prompt_len, args.steps))
            served_ms.append(served * 1e3)
            if args.breakdown:
                after = decode_forward_s(base)
                forward = [forward[i] + after[i] - before[i] for i in (0, 1)]
    finally:
        proc.terminate()
        proc.wait(60)
    ratios = [s / b for s, b in zip(served_ms, bare_ms, strict=True)]
    out: dict[str, Any] = {
        "bench": "step_overhead", "model": args.model, "batch": args.batch,
        "prompt_len": args.prompt_len, "rounds": args.rounds,
        "cpu_threads": torch.get_num_threads(),
        "bare_step_ms": round(statistics.median(bare_ms), 2),
        "server_itl_ms": round(statistics.median(served_ms), 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }  # fmt: skip
    if args.breakdown and forward[1]:
        out["server_forward_ms_mean"] = round(forward[0] / forward[1] * 1e3, 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
