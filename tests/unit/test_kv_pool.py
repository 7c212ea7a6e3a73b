"""The CPU KV pool's memory commit: the first rows at start-up, then ahead of each step's
highest slot, never touching a row a step has written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from worker_driver import Driver, generate_together, make_runner

from fovea.worker import kv_pool
from fovea.worker.kv_pool import KVPool

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
