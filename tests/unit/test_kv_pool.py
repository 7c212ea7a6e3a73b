"""The CPU KV pool's memory commit: the first rows at start-up, then ahead of each step's
highest slot, never touching a row a step has written; its per-token bytes for MLA's latent
layout against the decompressed one (DeepSeek-VL2-small's shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worker_driver import Driver, generate_together, make_runner

from fovea.common.families.deepseek_vl2 import DeepseekV2TextConfig
from fovea.worker import kv_pool
from fovea.worker.kv_pool import KVLayout, KVPool, slots_in_budget
from fovea.worker.models.deepseek_v2 import kv_layout

ROW_BYTES = 2 * 2 * 2 * 4 * 4  # 2 layers x (K, V) x 2 heads x 4 dims x float32


def _pool(slots: int = 96, page_size: int = 1) -> KVPool:
    return KVPool(
        num_layers=2, num_slots=slots, page_size=page_size, kv_heads=2, head_dim=4,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip


def test_a_pool_under_the_start_budget_is_committed_whole() -> None:
    pool = _pool(96)
    assert pool.nbytes() == 97 * ROW_BYTES
    assert pool.committed == 97
    assert pool.committed_bytes() == 97 * ROW_BYTES


def test_start_commits_the_budget_then_steps_commit_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_pool, "COMMIT_AT_START_BYTES", 10 * ROW_BYTES)
    monkeypatch.setattr(kv_pool, "COMMIT_AHEAD_ROWS", 4)
    pool = _pool(96)
    assert pool.committed == 10
    for t in (*pool.k, *pool.v):
        t[5] = 7.0  # K/V a step stored
        t[10:] = 3.0  # stands for whatever fresh memory holds
    pool.commit(10)  # all below 10 is resident already
    assert pool.committed == 10
    assert torch.equal(pool.k[1][10], torch.full((2, 4), 3.0))
    pool.commit(11)
    assert pool.committed == 15
    for t in (*pool.k, *pool.v):
        assert torch.equal(t[5], torch.full((2, 4), 7.0))
        assert torch.count_nonzero(t[10:15]).item() == 0
        assert torch.equal(t[15:], torch.full((82, 2, 4), 3.0))
    pool.commit(95)  # ahead stops at the last row
    assert pool.committed == 97
    assert pool.committed_bytes() == 97 * ROW_BYTES


def test_the_scratch_page_is_zero_even_with_no_start_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kv_pool, "COMMIT_AT_START_BYTES", 0)
    pool = _pool(32, page_size=4)
    assert pool.committed == 4
    assert torch.count_nonzero(pool.v[0][:4]).item() == 0


def test_steps_commit_ahead_of_their_slots_and_generate_the_same_tokens(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = {"a": [5, 9, 14, 2, 7, 7, 30], "b": [11, 3, 8]}
    want = generate_together(Driver(make_runner(tiny_llama)), prompts, 6)
    monkeypatch.setattr(kv_pool, "COMMIT_AT_START_BYTES", 0)
    monkeypatch.setattr(kv_pool, "COMMIT_AHEAD_ROWS", 2)
    runner = make_runner(tiny_llama)
    assert runner.pool.committed == 1  # the scratch page
    driver = Driver(runner)
    # The prefill writes slots 1..10 and commits rows below 13; each decode step writes two
    # more slots, so every other one (slots 13-14, 17-18) commits two rows further.
    got = generate_together(driver, prompts, 6)
    assert got == want
    assert driver.next_slot == 21
    assert runner.pool.committed == 21


# DeepSeek-VL2-small's language_config, the keys that size the KV pool (its published
# config.json; bench/README.md cites it).
VL2_SMALL = {"num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
             "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
             "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_size": 2048}  # fmt: skip


def test_deepseek_vl2_small_keeps_the_latent_per_token() -> None:
    """576 values a token and layer (kv_lora_rank 512 + rope key 64) against the decompressed
    K/V's 2 x 16 heads x 192; in bf16 1 GiB holds 34521 tokens against 3236 (10.67x)."""
    cfg = DeepseekV2TextConfig.from_hf(VL2_SMALL)
    latent, old = kv_layout(cfg), kv_layout(cfg, mla_latent=False)
    assert latent == KVLayout("mla_latent", 27, 1, 576)
    assert old == KVLayout("kv", 27, 16, 192)
    assert latent.bytes_per_token(torch.bfloat16) == 27 * 576 * 2 == 31104
    assert old.bytes_per_token(torch.bfloat16) == 2 * 27 * 16 * 192 * 2 == 331776
    assert slots_in_budget(1 << 30, 31104, 1) == 34521
    assert slots_in_budget(1 << 30, 331776, 1) == 3236
    assert slots_in_budget(1 << 30, 31104, 16, max_total_tokens=20000) == 20000
    assert slots_in_budget(100, 31104, 1) == 0
    # Tensor parallel: every rank keeps the whole latent, and its own heads' K/V.
    assert kv_layout(cfg, tp=2) == latent
    assert kv_layout(cfg, mla_latent=False, tp=2) == KVLayout("kv", 27, 8, 192)


def test_a_latent_pool_has_no_values() -> None:
    pool = KVPool(
        num_layers=2, num_slots=8, page_size=4, kv_heads=1, head_dim=40, dtype=torch.float32,
        device=torch.device("cpu"), kind="mla_latent",
    )  # fmt: skip
    assert pool.v == [] and [tuple(k.shape) for k in pool.k] == [(12, 1, 40)] * 2
    assert pool.bytes_per_token() == 2 * 40 * 4 and pool.nbytes() == 12 * 2 * 40 * 4
    assert torch.count_nonzero(pool.k[1][:4]).item() == 0


def test_sliding_window_layers_split_the_layout_into_two_pools() -> None:
    """Layers 0 and 2 of 3 local: the global pool holds layer 1's K and V a token, the local
    one layers 0 and 2's; the same layout sizes both through hybrid_slots_in_budget."""
    layout = KVLayout("kv", 3, 2, 32)
    local = frozenset({0, 2})
    glob, loc = layout.split(local)
    assert (glob, loc) == (KVLayout("kv", 1, 2, 32), KVLayout("kv", 2, 2, 32))
    g_bytes, l_bytes = glob.bytes_per_token(torch.float32), loc.bytes_per_token(torch.float32)
    assert (g_bytes, l_bytes) == (512, 1024)
    # Each global slot costs 512 + 0.5 x 1024 = 1024 bytes: 64 global, 32 local in 65536.
    assert kv_pool.hybrid_slots_in_budget(65536, g_bytes, l_bytes, 0.5, 4, None) == (64, 32)
    pool = KVPool.for_layout(
        layout, num_slots=64, page_size=4, dtype=torch.float32, device=torch.device("cpu"),
        local_layers=local, num_local_slots=32,
    )  # fmt: skip
    assert [tuple(k.shape) for k in pool.k] == [(36, 2, 32), (68, 2, 32), (36, 2, 32)]
    assert [tuple(v.shape) for v in pool.v] == [(36, 2, 32), (68, 2, 32), (36, 2, 32)]
    assert (pool.bytes_per_token(), pool.bytes_per_token(local=True)) == (512, 1024)
    assert pool.nbytes() == 68 * 512 + 36 * 1024 == pool.committed_bytes()


def test_a_latent_pool_with_local_layers_keeps_no_values_in_either_space() -> None:
    pool = KVPool(
        num_layers=2, num_slots=8, page_size=4, kv_heads=1, head_dim=40, dtype=torch.float32,
        device=torch.device("cpu"), kind="mla_latent", local_layers=frozenset({1}),
        num_local_slots=4,
    )  # fmt: skip
    assert pool.v == [] and [tuple(k.shape) for k in pool.k] == [(12, 1, 40), (8, 1, 40)]
    assert (pool.bytes_per_token(), pool.bytes_per_token(local=True)) == (160, 160)
    assert pool.committed_bytes() == 12 * 160 + 8 * 160
