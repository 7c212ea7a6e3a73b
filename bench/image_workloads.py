"""The image workloads of compare.py (issue 26) and the ratios read off their rows.

Each workload is serving.py's flags. W4one is W4 sent one request at a time (images of its own,
the same sizes): each TTFT is then one request's fetch, preparation, encode and prefill with
nothing else computing, so the sum over W4's requests, plus the 63 decode steps W4's last
request needs at least, is the serial work a W4 run cannot avoid (`W4_over_serial_work_*`).
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]  # one JSON line of serving.py (or hf_generate.py)

# A request may wait behind several others' image encoding: minutes on a small CPU.
_W4 = ["--images", "1", "--image-size", "448x448,1024x768", "--num-prompts", "64",
       "--concurrency", "8", "--input-len", "40", "--output-len", "64",
       "--request-timeout", "3600"]  # fmt: skip
# Each image workload has images of its own (--image-offset), so none is an earlier one's hit.
IMAGE_FLAGS: dict[str, list[str]] = {
    "W4": [*_W4, "--seed", "5"],
    "W5": [*_W4, "--seed", "6", "--distinct-images", "8", "--image-offset", "100000"],
    "W6": ["--images", "3", "--interleave", "--image-size", "448x448", "--num-prompts", "32",
           "--concurrency", "4", "--input-len", "40", "--output-len", "64", "--seed", "7",
           "--image-offset", "200000", "--request-timeout", "3600"],
    "W4data": [*_W4, "--seed", "8", "--image-transport", "data", "--image-offset", "300000"],
    # 16 requests of a 10-second 640x360 video, 4 distinct (each sent 4 times: 4 cold, 12
    # repeats), concurrency 4.
    "W7": ["--videos", "1", "--video-seconds", "10", "--video-size", "640x360",
           "--distinct-videos", "4", "--num-prompts", "16", "--concurrency", "4",
           "--input-len", "40", "--output-len", "64", "--seed", "9", "--request-timeout", "3600"],
    "W4one": [*_W4, "--seed", "10", "--image-offset", "400000", "--concurrency", "1"],
}  # fmt: skip
# W2 on the VLM server, alone ("W2vlm") and then while W4 runs beside it ("W2+W4"): text
# latency under image load. W4's client starts first and is stopped once W2 is done.
BESIDE = "W2+W4"
IMAGE_WORKLOADS: dict[str, list[str]] = {**IMAGE_FLAGS, BESIDE: []}
IMAGE_ROWS = {*IMAGE_WORKLOADS, "W2vlm"}  # the rows of RESULTS.md's image section


def pick(rows: list[Row], system: str, mode: str, workload: str) -> Row | None:
    for r in rows:
        name = r.get("peer", r["system"])
        if name == system and r.get("mode") in (mode, "-") and r["workload"] == workload:
            return r
    return None


def requests_per_s(row: Row) -> float:
    """Completed requests over the run's duration, unrounded (serving.py rounds
    request_throughput to 3 decimals, too coarse for image runs of a few hundredths)."""
    return float(row["completed"]) / float(row["duration_s"])


def serial_work_s(w4: Row, one: Row) -> float:
    """Seconds of work W4's requests need with no overlap to lose: each one's TTFT alone
    (W4one's mean, same image sizes) and, after the last prefill, the output_len - 1 decode
    steps of the last request, at W4's own inter-token p50."""
    ttfts = float(one["ttft_ms"]["mean"]) * int(w4["completed"])
    decodes = (int(w4["output_len"]) - 1) * float(w4["itl_ms"]["p50"])
    return (ttfts + decodes) / 1000.0


def image_ratios(rows: list[Row], modes: list[str]) -> dict[str, Any]:
    """Fovea / vLLM on W4-W6 per mode; per system W5's TTFT over W4's, W2's TTFT beside W4
    over alone, and W4's duration over its serial work."""
    out: dict[str, Any] = {}
    for mode in modes:
        r: dict[str, float] = {}
        for w in ("W4", "W6", "W4data"):
            f, v = pick(rows, "fovea", mode, w), pick(rows, "vllm", mode, w)
            if f and v:
                r[f"{w}_req_s"] = requests_per_s(f) / requests_per_s(v)
                if w == "W4":
                    r["W4_ttft_p50"] = f["ttft_ms"]["p50"] / v["ttft_ms"]["p50"]
                    r["W4_memory"] = f["memory"]["peak_total_mb"] / v["memory"]["peak_total_mb"]
            hf = pick(rows, "hf", mode, w)
            if f and hf:
                r[f"{w}_req_s_over_hf"] = requests_per_s(f) / requests_per_s(hf)
        for system in ("fovea", "vllm"):
            w4, w5 = pick(rows, system, mode, "W4"), pick(rows, system, mode, "W5")
            if w4 and w5:
                r[f"W5_over_W4_ttft_{system}"] = w5["ttft_ms"]["p50"] / w4["ttft_ms"]["p50"]
            alone, beside = pick(rows, system, mode, "W2vlm"), pick(rows, system, mode, BESIDE)
            if alone and beside:
                r[f"W2_beside_W4_ttft_{system}"] = (
                    beside["ttft_ms"]["p50"] / alone["ttft_ms"]["p50"]
                )
            one = pick(rows, system, mode, "W4one")
            if w4 and one:
                r[f"W4_over_serial_work_{system}"] = float(w4["duration_s"]) / serial_work_s(
                    w4, one
                )
        out[mode] = {k: round(v, 3) for k, v in r.items()}
    return out
