"""The floor: Hugging Face transformers' padded batch `generate` on the benchmark's prompts.

Batches of `--batch-size` prompts (left-padded) run one after another, greedy, each request
producing exactly `--output-len` tokens (min_new_tokens = max_new_tokens). Latencies per request
are measured from its batch's start, like a closed-loop client with concurrency = batch size:
TTFT at the first decoding step, ITL between steps, E2E at the end of the batch. Prints one JSON
line in serving.py's shape.

    python -m fovea.bench.hf_generate --model SmolLM2-135M-Instruct --num-prompts 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from fovea.bench.prompts import build_prompts, load_tokenizer, resolve_model_dir
from fovea.bench.serving import Result, report


class StepClock:
    """A logits processor that only records when each decoding step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="local HF model dir (or built-in alias)")
    p.add_argument("--tokenizer", default="", help="default: --model")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--shared-prefix-len", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    return p.parse_args(argv)


def pick_dtype(device: str, requested: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX); else fp32, since bf16 matmul
    on an AVX2-only CPU is two orders of magnitude slower."""
    if requested != "auto":
        return torch.float32 if requested == "float32" else torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16
    from fovea.worker.model_runner import cpu_has_native_bf16

    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def generate_batch(
    model: Any, tokenizer: Any, token_ids: list[list[int]], output_len: int, device: str
) -> tuple[list[Result], torch.Tensor]:
    width = max(len(ids) for ids in token_ids)
    pad = tokenizer.pad_token_id
    # Left padding: every row's last prompt token sits in the final column.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in token_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in token_ids])
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            pad_token_id=pad,
            logits_processor=[clock],
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    end = time.perf_counter()
    new = out[:, width:]  # [batch, output_len]
    itl = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    results = [
        Result(
            ok=True,
            input_tokens=len(ids),
            output_tokens=int(new.shape[1]),
            ttft_s=clock.times[0] - start,
            e2e_s=end - start,
            itl_s=itl,
        )
        for ids in token_ids
    ]
    return results, new


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = build_prompts(
        tokenizer, args.num_prompts, args.input_len, args.shared_prefix_len, args.seed
    )
    dtype = pick_dtype(args.device, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    print(f"hf_generate: {model_dir} on {args.device} in {dtype}", file=sys.stderr)

    results: list[Result] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        batch = [p.token_ids for p in prompts[i : i + args.batch_size]]
        batch_results, new = generate_batch(model, tokenizer, batch, args.output_len, args.device)
        if new.shape[1] != args.output_len:
            raise RuntimeError(f"generate made {new.shape[1]} tokens, not {args.output_len}")
        results += batch_results
    duration = time.perf_counter() - start

    # serving.py's report, with the batch as the concurrency: one JSON shape for both.
    shape = argparse.Namespace(**vars(args), concurrency=args.batch_size, endpoint="generate")
    system = f"hf-transformers-generate ({args.device}, {str(dtype).removeprefix('torch.')})"
    line = report(shape, system, results, duration)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
