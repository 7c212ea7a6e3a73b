"""Closed-loop serving benchmark for any OpenAI-compatible server (Fovea, vLLM, SGLang, ...).

`--concurrency` workers each send one streaming request at a time until `--num-prompts` are
done. Per request: TTFT (first chunk with text), inter-token latencies (gaps between chunks with
text: a server that packs several tokens into one chunk reports fewer, longer gaps) and
end-to-end latency. Output tokens come from the final usage chunk, else the chunk count.
Prints one JSON line on stdout; progress and errors go to stderr. The client is aiohttp (C
HTTP parser), as in vLLM's and SGLang's serving benchmarks: it shares the CPUs with the server
it measures, and httpx took 2.5 times its CPU a streamed token (1.5 against 0.6 ms a step of
16 streams on 2 cores).

    python -m fovea.bench.serving --base-url http://127.0.0.1:30000 \
        --model SmolLM2-135M-Instruct --tokenizer SmolLM2-135M-Instruct

With `--images N` each request is a chat request with N images before its text (`--interleave`:
between pieces of it), fetched by the server from a local image server the bench starts (start
Fovea with --allow-private-media-urls), or sent inline with `--image-transport data`.
Image i has size i mod the list `--image-size` (e.g. `448x448,1024x768`: half and half).
`--distinct-images K` cycles K different images (1: every request repeats the same image, so
all but the first are prefix hits; default: a new image per request, all cold). The line
reports how many image GETs the image server answered (`image_fetches`).

With `--videos 1` (W7) each request is a chat request with one synthetic `--video-seconds`
video of `--video-size` at `--video-fps` (bench/video_source.py), sent as a data: URI, before its
text; `--distinct-videos K` cycles K videos. The line adds TTFT of the requests that sent a video
for the first time (`ttft_cold_ms`) and again (`ttft_repeat_ms`), TTFT p50 per second of video,
and Fovea's own probe + decode time per second of video, timed in the bench process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from fovea.bench.image_server import FORMATS, ImageServer, data_uri, parse_sizes
from fovea.bench.prompts import Prompt, build_prompts, load_tokenizer
from fovea.bench.video_source import decode_ms_per_video_second, video_uri


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    first_video: bool = False  # its video was sent for the first time (W7)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--tokenizer", required=True, help="local HF tokenizer dir (or built-in alias)")
    p.add_argument("--system", default="", help="label for the JSON line (default: --base-url)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--shared-prefix-len", type=int, default=0, help="W3: common prefix tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=1800.0, help="seconds for the whole run")
    p.add_argument("--images", type=int, default=0, help="images per request (chat endpoint)")
    p.add_argument("--image-size", default="448x448", help="WxH[,WxH...]: image i has size i mod n")
    p.add_argument("--image-format", choices=sorted(FORMATS), default="jpeg")
    p.add_argument(
        "--image-transport", choices=["url", "data"], default="url", help="http URLs or data: URIs"
    )
    p.add_argument("--image-offset", type=int, default=0, help="first image id (distinct sets)")
    p.add_argument("--interleave", action="store_true", help="images between pieces of the text")
    p.add_argument(
        "--distinct-images", type=int, default=0, help="different images in all (0: one each)"
    )
    p.add_argument("--videos", type=int, choices=[0, 1], default=0, help="a video per request")
    p.add_argument("--video-seconds", type=float, default=10.0)
    p.add_argument("--video-size", default="640x360", help="WxH")
    p.add_argument("--video-fps", type=int, default=30, help="the source's frame rate")
    p.add_argument("--distinct-videos", type=int, default=0, help="different videos (0: one each)")
    p.add_argument(
        "--json-schema",
        default=None,
        help="a JSON schema file: every request asks for output under it (response_format)",
    )
    args = p.parse_args(argv)
    args.schema = None
    if args.json_schema:
        with open(args.json_schema) as f:
            args.schema = json.load(f)
    try:
        args.image_sizes = parse_sizes(args.image_size)
    except ValueError:
        p.error(f"--image-size must be WxH[,WxH...], got {args.image_size!r}")
    try:
        args.video_wh = tuple(int(v) for v in args.video_size.lower().split("x", 1))
    except ValueError:
        p.error(f"--video-size must be WxH, got {args.video_size!r}")
    if args.images or args.videos:
        args.endpoint = "chat"
    return args


def request_body(
    args: argparse.Namespace,
    prompt: Prompt,
    max_tokens: int,
    image_urls: Sequence[str] = (),
    video_url: str = "",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if getattr(args, "schema", None) is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": args.schema},
        }
    if video_url:
        video = {"type": "video_url", "video_url": {"url": video_url}}
        body["messages"] = [
            {"role": "user", "content": [video, {"type": "text", "text": prompt.text}]}
        ]
    elif image_urls:
        images = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
        pieces = len(images) + 1 if args.interleave else 1
        texts = [{"type": "text", "text": t} for t in text_pieces(prompt.text, pieces)]
        # Interleaved: text, image, text, ..., image, text; else the images, then the text.
        parts: list[dict[str, Any]] = (
            [p for pair in zip(texts, images, strict=False) for p in pair] + texts[-1:]
            if args.interleave
            else [*images, *texts]
        )
        body["messages"] = [{"role": "user", "content": parts}]
    elif args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


def text_pieces(text: str, n: int) -> list[str]:
    """`text` cut into n pieces that join back to it: at spaces where it has enough words, else
    at characters (random-vocabulary prompts may have few spaces). Fewer than n characters:
    ValueError."""
    if n <= 1:
        return [text]
    words = text.split(" ")
    units, sep = (words, " ") if len(words) >= n else (list(text), "")
    if len(units) < n:
        raise ValueError(f"a text of {len(text)} characters cannot be cut into {n} pieces")
    cuts = [round(k * len(units) / n) for k in range(n + 1)]
    pieces = itertools.pairwise(cuts)
    return [sep.join(units[a:b]) + (sep if b < len(units) else "") for a, b in pieces]


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text += (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
    return text


async def send_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Result:
    res = Result()
    chunks = 0
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                detail = (await resp.read()).decode(errors="replace")[:200]
                res.error = f"HTTP {resp.status}: {detail}"
                return res
            async for line in resp.content:  # split at b"\n" only, as SSE is
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return res
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if chunks == 0:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    chunks += 1
                usage = chunk.get("usage")
                if usage:
                    res.input_tokens = int(usage.get("prompt_tokens") or 0)
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e_s = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0
    if not res.ok:
        res.error = "stream ended without any text"
    return res


def summarize_ms(values_s: list[float]) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation, like numpy's default) and mean, in milliseconds."""
    if not values_s:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    xs = sorted(v * 1000.0 for v in values_s)

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    out = {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "mean": sum(xs) / len(xs)}
    return {k: round(v, 3) for k, v in out.items()}


def report(
    args: argparse.Namespace, system: str, results: list[Result], duration_s: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens or args.input_len for r in ok)
    dur = max(duration_s, 1e-9)
    return {
        "system": system,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "concurrency": args.concurrency,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "shared_prefix_len": args.shared_prefix_len,
        "images_per_request": getattr(args, "images", 0),
        "image_size": getattr(args, "image_size", None) if getattr(args, "images", 0) else None,
        "image_transport": getattr(args, "image_transport", None),
        "interleave": getattr(args, "interleave", False),
        "distinct_images": getattr(args, "distinct_images", 0),
        "image_fetches": getattr(args, "image_fetches", None),
        "json_schema": getattr(args, "json_schema", None),
        "completed": len(ok),
        "total_output_tokens": out_tokens,
        "duration_s": round(duration_s, 3),
        "request_throughput": round(len(ok) / dur, 3),
        "output_tokens_per_s": round(out_tokens / dur, 3),
        "total_tokens_per_s": round((in_tokens + out_tokens) / dur, 3),
        "ttft_ms": summarize_ms([r.ttft_s for r in ok]),
        "itl_ms": summarize_ms([x for r in ok for x in r.itl_s]),
        "e2e_ms": summarize_ms([r.e2e_s for r in ok]),
        "errors": args.num_prompts - len(ok),
        **(video_report(args, ok) if getattr(args, "videos", 0) else {}),
    }


def video_report(args: argparse.Namespace, ok: list[Result]) -> dict[str, Any]:
    cold = summarize_ms([r.ttft_s for r in ok if r.first_video])
    repeat = summarize_ms([r.ttft_s for r in ok if not r.first_video])
    width, height = args.video_wh
    return {
        "video": f"{args.video_seconds:g}s {width}x{height} @{args.video_fps}",
        "distinct_videos": args.distinct_videos,
        "ttft_cold_ms": cold,
        "ttft_repeat_ms": repeat,
        "repeat_over_cold_ttft_p50": round(repeat["p50"] / cold["p50"], 3) if cold["p50"] else None,
        "ttft_p50_ms_per_video_second": round(
            summarize_ms([r.ttft_s for r in ok])["p50"] / args.video_seconds, 3
        ),
        "decode_ms_per_video_second": decode_ms_per_video_second(
            args.video_seconds, width, height, args.video_fps
        ),
    }


def video_of(args: argparse.Namespace, i: int) -> tuple[str, int]:
    """(the data: URI of request i's video, its id); "" without --videos. Warm-up requests
    (i < 0) use videos of their own."""
    if not args.videos:
        return "", -1
    n = i % args.distinct_videos if args.distinct_videos and i >= 0 else i
    width, height = args.video_wh
    return video_uri(n, args.video_seconds, width, height, args.video_fps), n


def image_ids(args: argparse.Namespace, i: int) -> list[int]:
    """The image server's ids of request i's images (bench/hf_generate.py sends the same)."""
    k = i * args.images
    distinct = args.distinct_images
    ids = [(k + j) % distinct if distinct and i >= 0 else k + j for j in range(args.images)]
    return [n + args.image_offset + 10**6 * (i < 0) for n in ids]


def images_of(args: argparse.Namespace, server: ImageServer | None, i: int) -> list[str]:
    """Image URLs (or data: URIs) of request i (warm-up requests are i < 0 and use images of
    their own)."""
    ids = image_ids(args, i)
    if server is None:
        return [data_uri(n, args.image_sizes, args.image_format) for n in ids]
    return [server.url(n) for n in ids]


async def run(args: argparse.Namespace, prompts: list[Prompt]) -> tuple[list[Result], float]:
    images = None
    if args.images and args.image_transport == "url":
        images = ImageServer(args.image_sizes, args.image_format)
    try:
        return await _run(args, prompts, images)
    finally:
        if images is not None:
            args.image_fetches = images.requests()
            images.close()


async def _run(
    args: argparse.Namespace, prompts: list[Prompt], images: ImageServer | None
) -> tuple[list[Result], float]:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = args.base_url.rstrip("/") + path
    # aiohttp never reads proxy settings from the environment (trust_env=False).
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency),
        timeout=aiohttp.ClientTimeout(total=args.request_timeout),
    ) as session:
        # Warm-up prompts come after the timed ones (main builds both): a timed prompt sent
        # first as warm-up would be a prefix-cache hit when timed.
        warm_prompts, prompts = prompts[args.num_prompts :], prompts[: args.num_prompts]
        for i, prompt in enumerate(warm_prompts):
            video, _ = video_of(args, -1 - i)
            body = request_body(args, prompt, 8, images_of(args, images, -1 - i), video)
            warm = await send_one(session, url, body)
            if not warm.ok:
                print(f"warm-up request failed: {warm.error}", file=sys.stderr)
        results = [Result(error="not run (--max-duration reached)") for _ in prompts]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(prompts)):
            queue.put_nowait(i)

        sent_videos: set[int] = set()

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                video, vid = video_of(args, i)
                body = request_body(
                    args, prompts[i], args.output_len, images_of(args, images, i), video
                )
                first = vid not in sent_videos
                sent_videos.add(vid)
                results[i] = await send_one(session, url, body)
                results[i].first_video = first
                if not results[i].ok:
                    print(f"request {i} failed: {results[i].error}", file=sys.stderr)

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            t.result()  # a bug in the client itself should not be a silent "error" count
        return results, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = build_prompts(
        tokenizer, args.num_prompts + args.warmup, args.input_len, args.shared_prefix_len,
        args.seed,
    )  # fmt: skip
    results, duration = asyncio.run(run(args, prompts))
    print(json.dumps(report(args, args.system or args.base_url, results, duration)), flush=True)


if __name__ == "__main__":
    main()
