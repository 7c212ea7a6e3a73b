"""Data-parallel replicas in one server: Fovea at `--dp-size 2 --cpu-threads 1` against
`--dp-size 1` on the same machine and model, W1 and W3 (bench/compare.py's workloads) through
bench/serving.py, plus the router's decision time per request.

    python -m fovea.bench.dp --model SmolLM2-135M-Instruct            # W1, W3; dp1 then dp2
    python -m fovea.bench.dp --workloads W3 --num-prompts 8           # a quick, small run

On a machine with few CPUs the replicas split the same cores: what this shows there is the
routing overhead and the cache affinity (W3's shared prefix cached once per replica, every
later request a hit), not scaling. Each variant's server runs alone, started and stopped in
turn (`--mode tuned`: pinned to `--cpus` with tcmalloc, as compare.py's tuned mode).

Per variant and workload one JSON line: serving.py's figures, plus per replica the prompt and
cached tokens the workload added (from /get_server_info) and the router's decisions (from
/metrics: `fovea:dp_route_seconds`, `fovea:dp_routed_requests_total` by reason). Then one
line with the router timed in-process (`Router.route` on W3-shaped keys: a 1,000-token shared
prefix and 50 tokens of its own, each request's key inserted into its replica's tree as a
finished request's would be), and one line of ratios (the last variant over the first).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from fovea.bench import peers
from fovea.bench.compare import WORKLOADS, resolve_dtype

Row = dict[str, Any]
DEFAULT_VARIANTS = "dp1=--dp-size 1;dp2=--dp-size 2 --cpu-threads 1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="local dir or built-in alias")
    p.add_argument("--workloads", default="W1,W3")
    p.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help="NAME=launch_server flags, ';'-separated"
    )
    p.add_argument("--num-prompts", type=int, default=0, help="per workload (0: its own count)")
    p.add_argument("--mode", choices=["default", "tuned"], default="tuned")
    p.add_argument("--cpus", default="", help="tuned mode pinning (default: every CPU)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--port", type=int, default=31600)
    p.add_argument("--log-dir", default="/tmp/fovea-bench-dp")
    p.add_argument("--route-requests", type=int, default=2000, help="in-process timing")
    args = p.parse_args(argv)
    try:
        args.variants = [
            (name.strip(), shlex.split(flags))
            for name, _, flags in (v.partition("=") for v in args.variants.split(";"))
        ]
    except ValueError as e:
        p.error(f"--variants: {e}")
    if not all(name for name, _ in args.variants):
        p.error("--variants: NAME=FLAGS;NAME=FLAGS")
    return args


def replica_counts(base: str) -> list[dict[str, int]]:
    info = httpx.get(base + "/get_server_info", timeout=30, trust_env=False).json()
    return [
        {k: s[k] for k in ("prompt_tokens", "cache_hit_tokens")} for s in info["internal_states"]
    ]


def route_counts(base: str) -> dict[str, float]:
    """The router's cumulative figures from /metrics (zero without --dp-size > 1)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"decisions": 0.0, "seconds": 0.0}
    text = httpx.get(base + "/metrics", timeout=30, trust_env=False).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "fovea:dp_route_seconds_count":
                out["decisions"] += s.value
            elif s.name == "fovea:dp_route_seconds_sum":
                out["seconds"] += s.value
            elif s.name == "fovea:dp_routed_requests_total":
                key = f"{s.labels['reason']}@dp{s.labels['dp_rank']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def serve_workload(base: str, model_dir: str, label: str, workload: str, n: int) -> Row:
    flags = [*WORKLOADS[workload], *(["--num-prompts", str(n)] if n else [])]
    cmd = [sys.executable, "-m", "fovea.bench.serving", "--base-url", base, "--model", "m",
           "--tokenizer", model_dir, "--system", label, *flags]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row: Row = json.loads(out.stdout.strip().splitlines()[-1])
    return row


def run_variant(args: argparse.Namespace, name: str, flags: list[str], model_dir: str) -> list[Row]:
    rows: list[Row] = []
    run = peers.start("fovea", args.mode, model_dir, args.port, cpus=args.cpus, dtype=args.dtype,
                      vllm_venv="", log_dir=args.log_dir, extra=[*flags, "--enable-metrics"])  # fmt: skip
    try:
        peers.wait_ready(run)
        for w in args.workloads.split(","):
            counts0, route0 = replica_counts(run.base_url), route_counts(run.base_url)
            row = serve_workload(run.base_url, model_dir, f"fovea-{name}", w, args.num_prompts)
            time.sleep(1.5)  # the schedulers publish their counters once a second
            counts1, route1 = replica_counts(run.base_url), route_counts(run.base_url)
            route = {k: v - route0.get(k, 0.0) for k, v in route1.items()}
            n = route.pop("decisions")
            row |= {
                "variant": name, "flags": " ".join(flags), "workload": w,
                "startup_s": round(run.startup_s, 1),
                "replicas": [
                    {k: after[k] - before[k] for k in after}
                    for before, after in zip(counts0, counts1, strict=True)
                ],
                "route_mean_us": round(route.pop("seconds") / n * 1e6, 2) if n else None,
                "routed": {k: int(v) for k, v in sorted(route.items()) if v},
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        peers.stop(run)
    return rows


def time_router(n: int, dp_size: int = 2) -> Row:
    """Router.route in this process on W3-shaped requests, each key then inserted into its
    replica's tree (as the replica would report it once the request finished)."""
    from fovea.common.messages import ReplicaState, TokenizedRequest, TreeEvent
    from fovea.common.sampling import SamplingParams
    from fovea.tokenizer_service.router import Router, RoutingPolicy

    router = Router(dp_size, 1, RoutingPolicy())
    prefix = list(range(1000, 2000))
    sampling = SamplingParams(max_new_tokens=16)
    times: list[float] = []
    for i in range(n):
        ids = prefix + [(i * 50 + j) % 30000 for j in range(50)]
        req = TokenizedRequest(rid=str(i), index=0, input_ids=ids, sampling=sampling)
        t0 = time.perf_counter()
        d = router.route([req])
        times.append(time.perf_counter() - t0)
        replica = router.replicas[d]
        router.apply(ReplicaState(d, [TreeEvent(ids)], replica.sent, 0))
    times.sort()
    return {
        "router_in_process": {
            "requests": n, "dp_size": dp_size, "key_tokens": 1050,
            "p50_us": round(statistics.median(times) * 1e6, 2),
            "p99_us": round(times[int(0.99 * (n - 1))] * 1e6, 2),
            "max_us": round(times[-1] * 1e6, 2),
        }
    }  # fmt: skip


def ratios(rows: list[Row], variants: list[str]) -> Row:
    first, last = variants[0], variants[-1]
    out: Row = {}
    for w in sorted({r["workload"] for r in rows}):
        a = next((r for r in rows if (r["variant"], r["workload"]) == (first, w)), None)
        b = next((r for r in rows if (r["variant"], r["workload"]) == (last, w)), None)
        if a and b and a["output_tokens_per_s"] and a["ttft_ms"]["p50"]:
            out[f"{w}_tok_s_{last}_over_{first}"] = round(
                b["output_tokens_per_s"] / a["output_tokens_per_s"], 3
            )
            out[f"{w}_ttft_p50_{last}_over_{first}"] = round(
                b["ttft_ms"]["p50"] / a["ttft_ms"]["p50"], 3
            )
        for r in (a, b):
            if r:
                hit = sum(x["cache_hit_tokens"] for x in r["replicas"])
                prompt = sum(x["prompt_tokens"] for x in r["replicas"])
                out[f"{w}_cache_hit_{r['variant']}"] = round(hit / max(1, prompt), 3)
    return {"ratios": out}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from fovea.bench.prompts import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    args.dtype = resolve_dtype(args.dtype)
    if not args.cpus:
        import os

        args.cpus = f"0-{(os.cpu_count() or 1) - 1}"
    rows: list[Row] = []
    for name, flags in args.variants:
        rows += run_variant(args, name, flags, model_dir)
    print(json.dumps(time_router(args.route_requests)), flush=True)
    print(json.dumps(ratios(rows, [name for name, _ in args.variants])), flush=True)


if __name__ == "__main__":
    main()
