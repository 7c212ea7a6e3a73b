"""bench/kv_capacity.py drives the real scheduler: 4 requests sharing one image in a pool of
2 image slots all run at once in one slot with one K/V fill; with an image each, 2 at a time."""

from __future__ import annotations

from fovea.bench.kv_capacity import mllama_run


def test_mllama_rows_before_and_after() -> None:
    before = mllama_run(4, shared=False, image_slots=2, prompt=8, max_new=3)
    after = mllama_run(4, shared=True, image_slots=2, prompt=8, max_new=3)
    keys = ("peak_image_slots_used", "peak_running", "steps", "image_kv_fills")
    assert [before[k] for k in keys] == [2, 2, 6, 4]
    assert [after[k] for k in keys] == [1, 4, 3, 1]
