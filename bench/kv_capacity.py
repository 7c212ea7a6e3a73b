"""KV capacity at a fixed memory budget: the tokens resident at once when many long sequences
are served, before and after a family's KV saving, measured by driving the real scheduler
(its allocator, radix tree and, for sliding-window models, the local pool) with a worker
that computes nothing. Prints one JSON object; its `rows` hold one entry per family and
layout.

    python -m fovea.bench.kv_capacity --budget-tokens 65536 --context 8192 --requests 48

The budget is what `--budget-tokens` tokens take in one pool holding every layer's K/V (the
"before" layout, as --max-total-tokens sizes it); each "after" layout gets the same bytes,
split between its pools by the worker's own sizing function (worker/kv_pool.py). Each request
is a prompt of `context - new_tokens` distinct tokens and `new_tokens` outputs; requests are
all queued at once, so the scheduler admits what fits (a step's budget of several chunks keeps
prefill from bounding how many run at once: outputs of a sequence must outlast the prefills
admitted behind it). "Resident" is the sum of the running
sequences' computed tokens after a step; the row reports its peak, the sequences then
running, and retractions.

Gemma 3 rows: gemma-3-4b-it's text shapes (34 layers, 5 of 6 sliding with window 1024, 4 KV
heads of 256, bf16; sources in bench/README.md) at several --swa-full-tokens-ratio values.

Mllama cross-attention images (scheduler/cross_images.py): N concurrent requests sharing one
image, in an image pool of --image-slots slots and a token KV pool that holds all N. Per N
and mode, the most image slots in use at once, the most requests running at once, the steps
until all finished, and the image K/V fills the plans ask the workers for (a slot named for
an image it did not hold). "after" sends the same image in every request (today's sharing);
"before" gives each request's image its own hash, which costs what the scheduler charged
before sharing (one slot and one K/V fill per image per request).

    python -m fovea.bench.kv_capacity --families mllama --image-requests 1 4 16 64 --image-slots 8

DeepSeek-VL2-small (bench/kv_capacity_mla.py): the MLA latent cache against the decompressed
one in the same bytes (what --budget-tokens tokens take decompressed), by the worker's sizing
code; `--decode` adds a decode step micro-benchmark of the two layouts.

    python -m fovea.bench.kv_capacity --families deepseek --decode --dtype float32 --layers 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fovea.bench.kv_capacity_mla import DTYPES, decode_bench, deepseek_rows
from fovea.common.messages import ImageInput, StepResult, TokenizedRequest
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.worker.kv_pool import KVLayout, hybrid_slots_in_budget, slots_in_budget


@dataclass(frozen=True)
class Gemma3Shapes:
    """gemma-3-4b-it's text decoder, as far as its KV cache goes."""

    name: str = "gemma-3-4b-it"
    num_layers: int = 34
    sliding_window: int = 1024
    pattern: int = 6  # every 6th layer global, the other 5 sliding
    kv_heads: int = 4
    head_dim: int = 256
    dtype_bytes: int = 2  # bfloat16

    @property
    def num_global(self) -> int:
        return sum(1 for i in range(self.num_layers) if (i + 1) % self.pattern == 0)

    def bytes_per_slot(self, layers: int) -> int:
        """A token's K and V rows in `layers` layers, as the worker's pool sizes them."""
        return KVLayout("kv", layers, self.kv_heads, self.head_dim).bytes_per_token(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return {2: torch.bfloat16, 4: torch.float32}[self.dtype_bytes]


def serve_until_idle(
    sched: Scheduler, requests: list[TokenizedRequest], max_steps: int = 1_000_000
) -> dict[str, int]:
    """Run the scheduler with a worker that returns token 5 for every sampled chunk; returns
    the peak of resident tokens, the sequences running then, steps, retractions, and how many
    requests finished."""
    for r in requests:
        sched.handle(r)
    peak = running_at_peak = steps = 0
    while sched.has_work:
        plan = sched.schedule()
        if plan is None:
            raise RuntimeError("work left but nothing scheduled")
        resident = sum(s.num_computed for s in sched.running)
        if resident > peak:
            peak, running_at_peak = resident, len(sched.running)
        keys = [c.key for c in plan.chunks if c.sample]
        sched.process_result(StepResult(plan.step, keys, [5] * len(keys), [None] * len(keys), 0))
        steps += 1
        if steps > max_steps:
            raise RuntimeError("no progress")
    finished = sum(1 for o in sched.outputs if o.finish_reason == "length")
    return {
        "peak_resident_tokens": peak,
        "running_at_peak": running_at_peak,
        "steps": steps,
        "retractions": sched.num_retractions,
        "finished": finished,
    }


def _requests(
    n: int, context: int, new_tokens: int, vocab: int = 262_144
) -> list[TokenizedRequest]:
    """n prompts of distinct tokens (no prefix shared), each context - new_tokens long."""
    prompt_len = context - new_tokens
    sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [
        TokenizedRequest(
            rid=f"r{i}",
            index=0,
            input_ids=[10 + (i * prompt_len + j) % (vocab - 10) for j in range(prompt_len)],
            sampling=sp,
        )
        for i in range(n)
    ]


def gemma3_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    shapes = Gemma3Shapes()
    all_layers = shapes.bytes_per_slot(shapes.num_layers)
    budget = args.budget_tokens * all_layers
    base = dict(
        context_length=args.context + 1, page_size=args.page_size,
        max_prefill_tokens=args.step_tokens, chunked_prefill_size=args.chunk,
        max_running_requests=args.max_running,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    one_pool = slots_in_budget(budget, all_layers, args.page_size, None)
    sched = Scheduler(SchedulerConfig(**base), one_pool)
    before = serve_until_idle(sched, _requests(args.requests, args.context, args.new_tokens))
    rows.append(
        {"family": "gemma3", "layout": "one pool (before)", "global_slots": one_pool,
         "local_slots": 0, **before}
    )  # fmt: skip
    local_layers = shapes.num_layers - shapes.num_global
    for ratio in args.ratios:
        g, loc = hybrid_slots_in_budget(
            budget, shapes.bytes_per_slot(shapes.num_global), shapes.bytes_per_slot(local_layers),
            ratio, args.page_size, None,
        )  # fmt: skip
        cfg = SchedulerConfig(**base, sliding_window=shapes.sliding_window)
        sched = Scheduler(cfg, g, num_local_slots=loc)
        after = serve_until_idle(sched, _requests(args.requests, args.context, args.new_tokens))
        assert sched.local is not None
        rows.append(
            {"family": "gemma3", "layout": f"global + local pools, ratio {ratio}",
             "global_slots": g, "local_slots": loc, **after,
             "vs_before": round(after["peak_resident_tokens"] / before["peak_resident_tokens"], 3),
             "local_freed_early": sched.local.freed_early}
        )  # fmt: skip
    return rows


IMAGE_TOKEN = 400  # any id: the scheduler reads only the image's offset and hash
PIXELS = np.zeros((1, 3, 2, 2), dtype=np.float32)  # never read without workers


def _image(name: str) -> ImageInput:
    digest = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return ImageInput(digest, 1, 1, PIXELS, [1, 1])


def mllama_run(n: int, shared: bool, image_slots: int, prompt: int, max_new: int) -> dict[str, Any]:
    """Serve n requests of `prompt` tokens (the image token second) and `max_new` outputs."""
    cfg = SchedulerConfig(
        context_length=prompt + max_new + 1,
        max_prefill_tokens=max(2048, n * prompt),
        chunked_prefill_size=-1,
        max_running_requests=n,
        cross_image_slots=image_slots,
    )
    sched = Scheduler(cfg, n * (prompt + max_new) + 1)  # + the scratch slot
    assert sched.cross_images is not None
    sp = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    ids = [3, IMAGE_TOKEN, *range(10, 10 + prompt - 2)]
    for i in range(n):
        image = _image("shared" if shared else f"image-{i}")
        sched.handle(TokenizedRequest(rid=f"r{i}", index=0, input_ids=ids, sampling=sp,
                                      images=[image]))  # fmt: skip
    held: dict[int, bytes] = {}  # slot -> the image the workers hold there
    peak_slots = peak_running = steps = fills = 0
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None, "the scheduler stalled"
        for new in plan.new:
            for img, slot in zip(new.images, new.image_slots, strict=True):
                fills += held.get(slot) != img.hash
                held[slot] = img.hash
        peak_slots = max(peak_slots, sched.cross_images.used)
        peak_running = max(peak_running, len(sched.running))
        keys = [c.key for c in plan.chunks if c.sample]
        sched.process_result(StepResult(plan.step, keys, [7] * len(keys), [None] * len(keys), 0.0))
        steps += 1
    assert sched.cross_images.free == image_slots and sched.cross_images.users == 0
    return {
        "family": "mllama_cross_images",
        "mode": "after" if shared else "before",
        "requests": n,
        "image_slots_total": image_slots,
        "peak_image_slots_used": peak_slots,
        "peak_running": peak_running,
        "steps": steps,
        "image_kv_fills": fills,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--budget-tokens",
        type=int,
        default=65_536,
        help="the budget: this many tokens of one pool holding every layer",
    )
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence, in + out")
    p.add_argument("--new-tokens", type=int, default=128, help="output tokens per sequence")
    p.add_argument("--requests", type=int, default=48, help="sequences queued at once")
    p.add_argument("--chunk", type=int, default=2048, help="one sequence's prefill chunk")
    p.add_argument(
        "--step-tokens",
        type=int,
        default=8192,
        help="a step's token budget: large enough that prefill does not bound how "
        "many sequences run at once, memory does",
    )
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--max-running", type=int, default=128)
    p.add_argument(
        "--ratios",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.8, 0.25, 0.15, 0.14],
        help="--swa-full-tokens-ratio values",
    )
    p.add_argument("--families", default="gemma3,mllama,deepseek", help="comma-separated")
    p.add_argument(
        "--image-requests",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64],
        help="mllama: concurrent requests sharing one image",
    )
    p.add_argument("--image-slots", type=int, default=8, help="mllama: image pool size")
    p.add_argument("--image-prompt-tokens", type=int, default=64)
    p.add_argument("--image-max-new", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="deepseek: the cache dtype (the decode bench: its compute dtype too)")
    p.add_argument("--decode", action="store_true", help="deepseek: also time decode steps")
    p.add_argument("--layers", type=int, default=2, help="decode: decoder layers")
    p.add_argument("--intermediate", type=int, default=1408, help="decode: dense MLP width")
    p.add_argument("--batch", type=int, default=16, help="decode: sequences")
    p.add_argument("--decode-context", type=int, default=512, help="decode: cached tokens")
    p.add_argument("--warmup", type=int, default=3, help="decode: untimed rounds")
    p.add_argument("--rounds", type=int, default=10, help="decode: timed rounds")
    args = p.parse_args(argv)  # fmt: skip
    families = args.families.split(",")
    rows: list[dict[str, Any]] = []
    if "gemma3" in families:
        rows += gemma3_rows(args)
    if "mllama" in families:
        rows += [
            mllama_run(n, shared, args.image_slots, args.image_prompt_tokens, args.image_max_new)
            for n in args.image_requests
            for shared in (False, True)
        ]
    if "deepseek" in families:
        rows += deepseek_rows(args.budget_tokens, args.dtype, args.page_size)
    shapes = Gemma3Shapes()
    out = {
        "bench": "kv_capacity",
        "budget_tokens_one_pool": args.budget_tokens,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "requests": args.requests,
        "chunk": args.chunk,
        "step_tokens": args.step_tokens,
        "page_size": args.page_size,
        "models": {"gemma3": {**shapes.__dict__, "global_layers": shapes.num_global}},
        "rows": rows,
    }
    if args.decode:
        out["decode"] = decode_bench(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
