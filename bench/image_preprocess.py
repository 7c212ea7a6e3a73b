"""Image preprocessing throughput: Fovea's Qwen2VLProcessor against transformers'
Qwen2VLImageProcessorPil (default Qwen2-VL settings), side by side in one process on the same
random-content 1024×1024 JPEGs. JPEG decoding happens once up front and is reported on its own;
neither side's time includes it. Prints one JSON line.

    python -m fovea.bench.image_preprocess --n 20
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable

import numpy as np
import PIL.Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from fovea.tokenizer_service.processors import load_processor

SIDE = 1024


def images_per_second(
    fn: Callable[[PIL.Image.Image], object], images: list[PIL.Image.Image]
) -> float:
    fn(images[0])  # warm-up: first-call imports and allocations
    start = time.perf_counter()
    for image in images:
        fn(image)
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    jpegs: list[bytes] = []
    for _ in range(args.n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())

    start = time.perf_counter()
    # convert() forces the full decode: open() only reads the header.
    images = [PIL.Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]
    decode_ips = len(images) / (time.perf_counter() - start)

    hf = Qwen2VLImageProcessorPil()
    with tempfile.TemporaryDirectory() as model_dir:
        hf.save_pretrained(model_dir)
        ours = load_processor(model_dir, {"architectures": ["Qwen2VLForConditionalGeneration"]})
    assert ours is not None
    fovea_ips = images_per_second(ours.preprocess, images)
    hf_ips = images_per_second(lambda im: hf(im, return_tensors="np"), images)
    result = {
        "bench": "image_preprocess",
        "images": args.n,
        "size": f"{SIDE}x{SIDE}",
        "grid_thw": ours.preprocess(images[0]).grid,
        "decode_images_per_s": round(decode_ips, 1),
        "fovea_images_per_s": round(fovea_ips, 1),
        "hf_images_per_s": round(hf_ips, 1),
        "speedup": round(fovea_ips / hf_ips, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
