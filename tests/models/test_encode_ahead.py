"""Images encoded ahead of their prefill (worker/encode_ahead.py) on tiny Qwen2-VL and
Qwen2.5-VL checkpoints (2 vision blocks): the staged tower computes exactly what the whole
one does, a slice stops between blocks, and a prompt prefilled after its images were encoded
ahead takes their outputs (no encoder run in its step) and gets exactly the logits of a
prompt whose images are encoded in its own step."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from worker_driver import GREEDY, make_runner

from fovea.common.messages import ImageInput, NewSequence, ScheduledChunk, StepPlan
from fovea.worker.model_runner import ModelRunner
from fovea.worker.models.base import EncodesInStages, run_stages

PAD = 5  # <|image_pad|> in tiny_models
PATCH_DIM = 3 * 2 * 14 * 14


def image(seed: int, h: int, w: int, offset: int) -> ImageInput:
    """An image of h x w patches (random pixel values) whose tokens start at `offset`."""
    pixels = np.random.default_rng(seed).standard_normal((h * w, PATCH_DIM)).astype(np.float32)
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=32).digest()
    return ImageInput(digest, offset, h * w // 4, pixels, [1, h, w])


# Two images: 8x8 patches (16 tokens) at [2, 18), 12x16 (48 tokens) at [20, 68); 70 tokens.
A, B = image(1, 8, 8, 2), image(2, 12, 16, 20)
IDS = [7, 3, *[PAD] * 16, 4, 3, *[PAD] * 48, 4, 9]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_path(request: pytest.FixtureRequest) -> Path:
    torch.set_num_threads(2)
    return request.getfixturevalue(f"tiny_{request.param}")  # type: ignore[no-any-return]


def prefill(runner: ModelRunner, key: str, encode: list[ImageInput]) -> tuple[torch.Tensor, int]:
    """(last-token logits, encoder runs in the prefill step) of IDS, the sequence dropped."""
    new = NewSequence(key, IDS, len(IDS), GREEDY, [], [A, B])
    chunk = ScheduledChunk(key, list(range(1, len(IDS) + 1)), True)
    runner._admit(new)
    before = runner.images_encoded
    logits, _ = runner.forward(StepPlan(0, [], [chunk], [], encode))
    runs = runner.images_encoded - before
    runner.step(StepPlan(0, [], [], [key]))
    return logits[0], runs


def test_stages_compute_exactly_the_whole_tower(model_path: Path) -> None:
    runner = make_runner(model_path, encoder_slice_patches=0)
    model = runner.model
    assert isinstance(model, EncodesInStages) and runner.ahead is None
    with torch.inference_mode():
        whole = model.encode_images([A, B])  # type: ignore[attr-defined]
        stages = model.encode_stages([A, B])
        assert next(stages) == 64 + 192  # a yield between the two blocks: every patch row
        with pytest.raises(StopIteration) as done:
            next(stages)
        staged = done.value.value
        assert [t.shape[0] for t in staged] == [16, 48]
        assert all(torch.equal(a, b) for a, b in zip(whole, staged, strict=True))
        again = run_stages(model.encode_stages([A, B]))
        assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))


def test_slices_and_prefill_after_encoding_ahead_exact(model_path: Path) -> None:
    ahead = make_runner(model_path, encoder_slice_patches=1)  # one block a step
    plain = make_runner(model_path, encoder_slice_patches=0)
    # The images ride with a plan that has no chunks; each is a job of its own, one block a
    # step, so A (2 blocks) is ready after the second step and B after the fourth.
    r0 = ahead.step(StepPlan(0, [], [], [], [A, B]))
    assert (r0.images_ready, r0.images_encoded, r0.keys) == ([], 0, [])
    r1 = ahead.step(StepPlan(1, [], [], [], []))
    assert (r1.images_ready, r1.images_encoded) == ([A.hash], 1)
    # A sent again (a retry after the scheduler forgot it): cached, ready at once, no run.
    r2 = ahead.step(StepPlan(2, [], [], [], [A]))
    assert (r2.images_ready, r2.images_encoded) == ([A.hash], 0)
    r3 = ahead.step(StepPlan(3, [], [], [], []))
    assert (r3.images_ready, r3.images_encoded) == ([B.hash], 1)
    got, runs_ahead = prefill(ahead, "s", [])
    want, runs_plain = prefill(plain, "s", [])
    assert (runs_ahead, runs_plain) == (0, 2)
    assert torch.equal(got, want)
    assert ahead.ahead is not None and ahead.ahead.ready == {}  # the prefill took them


def test_a_slice_runs_whole_blocks_until_its_patch_rows(model_path: Path) -> None:
    """Slices of 100 patch rows: both of A's 64-row stages fit in one, one of B's 192-row
    stages ends a slice, and a later plan's image waits behind the earlier ones."""
    runner = make_runner(model_path, encoder_slice_patches=100)
    c = image(3, 8, 8, 2)
    results = [
        runner.step(StepPlan(0, [], [], [], [A, B])),
        runner.step(StepPlan(1, [], [], [], [c])),
        runner.step(StepPlan(2, [], [], [], [])),
        runner.step(StepPlan(3, [], [], [], [])),
    ]
    assert [r.images_ready for r in results] == [[A.hash], [], [B.hash], [c.hash]]
    assert [r.images_encoded for r in results] == [1, 0, 1, 1]


def test_a_worker_without_encode_ahead_refuses_images_to_encode(model_path: Path) -> None:
    runner = make_runner(model_path, encoder_slice_patches=0)
    with pytest.raises(RuntimeError, match="encode ahead"):
        runner.step(StepPlan(0, [], [], [], [A]))
