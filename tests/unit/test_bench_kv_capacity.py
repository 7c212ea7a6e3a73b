"""bench/kv_capacity.py on a small budget: the pools it sizes for gemma-3-4b-it's shapes, and
the scheduler run it reports (every request finishes; the same bytes hold more tokens once
the sliding-window layers keep only their windows); Mllama's shared image slots: 4 requests
sharing one image in a pool of 2 image slots all run at once in one slot with one K/V fill;
with an image each, 2 at a time. DeepSeek-VL2-small: the latent in the decompressed bytes."""

from __future__ import annotations

import argparse

from fovea.bench.kv_capacity import Gemma3Shapes, gemma3_rows, mllama_run
from fovea.bench.kv_capacity_mla import deepseek_rows


def test_gemma3_rows_on_a_small_budget() -> None:
    shapes = Gemma3Shapes()
    assert (shapes.num_global, shapes.bytes_per_slot(34)) == (5, 139_264)
    args = argparse.Namespace(
        budget_tokens=8192, context=2048, new_tokens=64, requests=12, chunk=256,
        step_tokens=1024, page_size=1, max_running=128, ratios=[1.0, 0.25],
    )  # fmt: skip
    before, same, small = gemma3_rows(args)
    assert (before["global_slots"], before["local_slots"]) == (8192, 0)
    # Ratio 1: a local slot per global one costs the bytes of one pool, so the same sizes.
    assert (same["global_slots"], same["local_slots"]) == (8192, 8192)
    # Ratio 0.25: 8192 x 34 layers' bytes over 5 + 29 / 4 layers' per global slot.
    assert (small["global_slots"], small["local_slots"]) == (22736, 5684)
    assert before["finished"] == same["finished"] == small["finished"] == 12
    assert same["peak_resident_tokens"] == before["peak_resident_tokens"]
    assert small["peak_resident_tokens"] > before["peak_resident_tokens"]


def test_mllama_rows_before_and_after() -> None:
    before = mllama_run(4, shared=False, image_slots=2, prompt=8, max_new=3)
    after = mllama_run(4, shared=True, image_slots=2, prompt=8, max_new=3)
    keys = ("peak_image_slots_used", "peak_running", "steps", "image_kv_fills")
    assert [before[k] for k in keys] == [2, 2, 6, 4]
    assert [after[k] for k in keys] == [1, 4, 3, 1]


def test_deepseek_rows_in_the_bytes_of_the_decompressed_budget() -> None:
    """1024 decompressed tokens' bytes (2 x 27 layers x 16 heads x 192, bf16) hold 10922 latent
    tokens (27 x 576 values)."""
    (row,) = deepseek_rows(1024, "bfloat16", 1)
    assert row["budget_bytes"] == 1024 * 331_776
    assert row["before"] == {
        "kind": "kv", "values_per_token_layer": 6144, "bytes_per_token": 331_776, "tokens": 1024,
    }  # fmt: skip
    assert row["after"] == {
        "kind": "mla_latent", "values_per_token_layer": 576, "bytes_per_token": 31_104,
        "tokens": 10_922,
    }  # fmt: skip
    assert row["ratio"] == 10.666
