"""KV-memory capacity of the model families whose caches hold more than their tokens' KV,
measured by driving the real scheduler (no model, no worker: each step's sampled chunks get
a fixed token). Prints one JSON object whose "rows" each name their family.

Mllama cross-attention images (scheduler/cross_images.py): N concurrent requests sharing one
image, in an image pool of --image-slots slots and a token KV pool that holds all N. Per N
and mode, the most image slots in use at once, the most requests running at once, the steps
until all finished, and the image K/V fills the plans ask the workers for (a slot named for
an image it did not hold). "after" sends the same image in every request (today's sharing);
"before" gives each request's image its own hash, which costs what the scheduler charged
before sharing (one slot and one K/V fill per image per request).

    python -m fovea.bench.kv_capacity --requests 1 4 16 64 --image-slots 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

import numpy as np

from fovea.common.messages import ImageInput, StepResult, TokenizedRequest
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler

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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--image-slots", type=int, default=8, help="Mllama image pool size")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=32)
    args = ap.parse_args(argv)
    rows = [
        mllama_run(n, shared, args.image_slots, args.prompt_tokens, args.max_new)
        for n in args.requests
        for shared in (False, True)
    ]
    print(json.dumps({"bench": "kv_capacity", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
