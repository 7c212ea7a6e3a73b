"""The floor: Hugging Face transformers' padded batch `generate` on the benchmark's prompts.

Batches of `--batch-size` prompts (left-padded) run one after another, greedy, each request
producing exactly `--output-len` tokens (min_new_tokens = max_new_tokens). Latencies per request
are measured from its batch's start, like a closed-loop client with concurrency = batch size:
TTFT at the first decoding step, ITL between steps, E2E at the end of the batch. Prints one JSON
line in serving.py's shape.

    python -m fovea.bench.hf_generate --model SmolLM2-135M-Instruct --num-prompts 128

With `--images K` (a VLM from bench/make_vlm.py) each request is serving.py's chat request with
K images (the same JPEG bytes, ids and interleaving as serving.py sends), run through the
model's AutoProcessor and AutoModelForImageTextToText; a batch's time includes decoding its
JPEGs and the processor. transformers' Qwen2-VL-style processors import torchvision, so
bench/compare.py runs this mode with vLLM's bench venv's interpreter (bench/peers.py).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import time
from typing import Any

import torch
from PIL import Image

from fovea.bench.image_server import FORMATS, image_bytes, parse_sizes, size_of
from fovea.bench.prompts import Prompt, build_prompts, load_tokenizer, resolve_model_dir
from fovea.bench.serving import Result, image_ids, report, request_body


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
    p.add_argument("--images", type=int, default=0, help="images per request (a VLM)")
    p.add_argument("--image-size", default="448x448", help="WxH[,WxH...]: image i has size i mod n")
    p.add_argument("--image-format", choices=sorted(FORMATS), default="jpeg")
    p.add_argument("--image-offset", type=int, default=0)
    p.add_argument("--distinct-images", type=int, default=0)
    p.add_argument("--interleave", action="store_true")
    args = p.parse_args(argv)
    args.image_sizes = parse_sizes(args.image_size)
    return args


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
    model: Any, inputs: dict[str, torch.Tensor], pad: int, output_len: int, start: float
) -> tuple[list[Result], torch.Tensor]:
    """Greedy `output_len` tokens for a left-padded batch; latencies from `start`."""
    width = inputs["input_ids"].shape[1]
    clock = StepClock()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            pad_token_id=pad,
            logits_processor=[clock],
        )
    if out.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    new = out[:, width:]  # [batch, output_len]
    itl = [b - a for a, b in itertools.pairwise(clock.times)]
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    results = [
        Result(
            ok=True,
            input_tokens=int(n),
            output_tokens=int(new.shape[1]),
            ttft_s=clock.times[0] - start,
            e2e_s=end - start,
            itl_s=itl,
        )
        for n in lengths
    ]
    return results, new


def text_inputs(token_ids: list[list[int]], pad: int, device: str) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in token_ids)
    # Left padding: every row's last prompt token sits in the final column.
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in token_ids])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in token_ids])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def image_inputs(
    args: argparse.Namespace, processor: Any, prompts: list[Prompt], first: int
) -> dict[str, torch.Tensor]:
    """serving.py's chat requests `first`, `first + 1`, ... as the processor's batch: the same
    text pieces and image order, the images decoded from the same JPEG bytes."""
    texts, images = [], []
    shape = argparse.Namespace(**(vars(args) | {"model": "m", "endpoint": "chat"}))
    for i, prompt in enumerate(prompts, start=first):
        ids = image_ids(shape, i)
        body = request_body(shape, prompt, args.output_len, [str(n) for n in ids])
        content = [
            {"type": "image"} if part["type"] == "image_url" else part
            for part in body["messages"][0]["content"]
        ]
        texts.append(
            processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        )
        for n in ids:
            data = image_bytes(n, *size_of(n, args.image_sizes), args.image_format)
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return {k: v.to(args.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = build_prompts(
        tokenizer, args.num_prompts, args.input_len, args.shared_prefix_len, args.seed
    )
    dtype = pick_dtype(args.device, args.dtype)
    processor = None
    if args.images:
        processor = AutoProcessor.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(args.device).eval()
    print(f"hf_generate: {model_dir} on {args.device} in {dtype}", file=sys.stderr)

    results: list[Result] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        t0 = time.perf_counter()
        if processor is not None:
            inputs = image_inputs(args, processor, batch, i)
        else:
            inputs = text_inputs([p.token_ids for p in batch], tokenizer.pad_token_id, args.device)
        batch_results, new = generate_batch(
            model, inputs, tokenizer.pad_token_id, args.output_len, t0
        )
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
