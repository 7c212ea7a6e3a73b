"""The compiled CPU attention kernels (worker/attention/csrc): paged decode and causal prefill
(fresh prompts and chunks after a cached prefix) against torch's SDPA path, their input checks,
the build cache and the fallback when the kernels cannot be built. The fused layers and the
argmax: test_cpu_fused.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fovea.common.config import ServerArgs, check_args
from fovea.worker.attention import cpu_kernels
from fovea.worker.attention.base import ChunkLayout
from fovea.worker.attention.cpu_paged import CpuPagedBackend, kernel_supports
from fovea.worker.attention.torch_native import TorchNativeBackend
from fovea.worker.kv_pool import KVPool

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    if not cpu_kernels.load():
        pytest.fail("the CPU kernels did not build on this machine (see the warning above)")


def _pool(kv_heads: int, head_dim: int, dtype: torch.dtype, slots: int = 96) -> KVPool:
    pool = KVPool(
        num_layers=1,
        num_slots=slots,
        page_size=1,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=CPU,
    )
    g = torch.Generator().manual_seed(kv_heads * 1000 + head_dim)
    pool.k[0][1:] = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    pool.v[0][1:] = torch.randn(slots, kv_heads, head_dim, generator=g).to(dtype)
    return pool


def _both(
    chunks: list[ChunkLayout],
    table: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    windows: list[int] | None = None,
    slots: int = 96,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's output of both backends for the same step over the same pool contents."""
    outs = []
    num_tokens = sum(c.q_len for c in chunks)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(num_tokens, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=g).to(dtype)
    out_slots = torch.cat([table[c.row, c.prefix_len : c.prefix_len + c.q_len] for c in chunks])
    for cls in (CpuPagedBackend, TorchNativeBackend):
        pool = _pool(kv_heads, head_dim, dtype, slots)
        attn = cls(pool, heads, kv_heads, head_dim, layer_windows=windows)
        attn.plan(chunks, out_slots, table)
        outs.append(attn.forward(0, q, k, v))
    return outs[0], outs[1]


def _table(rows: int, width: int, slots: int = 96) -> torch.Tensor:
    """Row r holds slots scattered over the pool (never slot 0, the scratch page)."""
    perm = torch.randperm(slots, generator=torch.Generator().manual_seed(3)) + 1
    return torch.stack([perm.roll(17 * r)[:width] for r in range(rows)])


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    # Groups of 1-8 query heads (passes of 4 + 4, 4 + 3, 4 + 2); head_dims that are whole
    # 16-float vectors (64, 80, 128, 48: 4 + 1 and 3 of them a pass) and one that is not (72).
    [(4, 4, 64), (9, 3, 64), (7, 1, 80), (6, 2, 128), (6, 1, 48), (16, 2, 72)],
)
def test_decode_matches_sdpa(heads: int, kv_heads: int, head_dim: int) -> None:
    # Lengths 1..70 across rows: padding, the 4-position blocks' tails and a single position.
    lens = [1, 5, 70, 33, 4]
    table = _table(len(lens), 72)
    chunks = [ChunkLayout(r, r, 1, n - 1) for r, n in enumerate(lens)]
    got, want = _both(chunks, table, heads, kv_heads, head_dim)
    assert got.shape == (len(lens), heads * head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_beside_prefill_and_windows() -> None:
    # A mixed step (decodes around a 6-token prefill with a cached prefix) on a model whose
    # second layer is global and first slides over 8 positions.
    table = _table(3, 40)
    chunks = [ChunkLayout(0, 0, 1, 29), ChunkLayout(1, 1, 6, 10), ChunkLayout(2, 7, 1, 3)]
    for windows in (None, [8]):
        got, want = _both(chunks, table, 6, 2, 64, windows=windows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(4, 4, 64), (9, 3, 64), (7, 1, 80), (6, 2, 128)]
)
def test_fresh_prompts_match_sdpa(heads: int, kv_heads: int, head_dim: int) -> None:
    # Fresh prompts (no cached prefix) of 1, 5 and 37 tokens beside a decode: the causal
    # prefill kernel, whose row blocks (4) and key steps (16) these lengths cut mid-way.
    table = _table(4, 40)
    chunks = [
        ChunkLayout(0, 0, 1, 0),
        ChunkLayout(1, 1, 5, 0),
        ChunkLayout(2, 6, 37, 0),
        ChunkLayout(3, 43, 1, 20),
    ]
    got, want = _both(chunks, table, heads, kv_heads, head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got, want = _both(chunks, table, heads, kv_heads, head_dim, dtype=torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (7, 1, 80), (6, 2, 72)])
def test_chunks_after_a_cached_prefix_match_sdpa(heads: int, kv_heads: int, head_dim: int) -> None:
    # Chunks after a cached prefix (a prefix-cache hit, a long prompt's later chunks): keys
    # read from the pool by slot, query i at position prefix + i. Prefixes 30, 59, 1 and 150
    # and chunks of 7, 37, 2 and 5 cut the 4-row blocks and the 32-key steps mid-way; the
    # last one's 155 keys are laid out in two tasks (128 keys each at most).
    table = _table(4, 160, slots=160)
    chunks = [
        ChunkLayout(0, 0, 7, 30),
        ChunkLayout(1, 7, 37, 59),
        ChunkLayout(2, 44, 2, 1),
        ChunkLayout(3, 46, 5, 150),
    ]
    got, want = _both(chunks, table, heads, kv_heads, head_dim, slots=160)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got, want = _both(chunks, table, heads, kv_heads, head_dim, torch.bfloat16, slots=160)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_paged_prefill_exact_values_and_checks() -> None:
    """Keys by slot: the query at position 2 sees pool rows 5, 3 and 4 (equal keys: the mean of
    their values); the one at 1 sees rows 5 and 3."""
    k_cache = torch.ones(6, 1, 8)
    v_cache = torch.zeros(6, 1, 8)
    v_cache[5], v_cache[3], v_cache[4] = 3.0, 6.0, 12.0
    slots = torch.tensor([5, 3, 4])
    out = torch.ops.fovea.causal_prefill_paged(torch.ones(2, 2, 8), k_cache, v_cache, slots, 1.0)
    assert out[0].tolist() == [4.5] * 16
    assert out[1].tolist() == [7.0] * 16
    with pytest.raises(RuntimeError, match="slot 6 is outside the pool"):
        torch.ops.fovea.causal_prefill_paged(
            torch.ones(1, 2, 8), k_cache, v_cache, torch.tensor([6]), 1.0
        )
    with pytest.raises(RuntimeError, match="slots must cover the prefix and the chunk's 2"):
        torch.ops.fovea.causal_prefill_paged(
            torch.ones(2, 2, 8), k_cache, v_cache, torch.tensor([1]), 1.0
        )


def test_causal_prefill_exact_values() -> None:
    """Position 0 sees only itself: its output is its value row, bit for bit; position 1 with
    equal keys averages the two value rows."""
    q = torch.ones(2, 2, 8)
    k = torch.ones(2, 1, 8)
    v = torch.stack([torch.arange(8.0), torch.arange(8.0) + 2.0])[:, None, :]
    out = torch.ops.fovea.causal_prefill(q, k, v, 0.5)
    assert out[0].tolist() == [*range(8), *range(8)]
    assert out[1].tolist() == [*range(1, 9), *range(1, 9)]


def test_bf16_cache() -> None:
    table = _table(2, 50)
    chunks = [ChunkLayout(0, 0, 1, 44), ChunkLayout(1, 1, 1, 12)]
    got, want = _both(chunks, table, 8, 2, 64, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # Both read the same bf16 rows; they differ by the output's rounding to bf16.
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_exact_values() -> None:
    """One position: the output is that position's value row, bit for bit. Two positions
    with equal keys: their values' mean."""
    k = torch.zeros(4, 1, 8)
    v = torch.zeros(4, 1, 8)
    k[2] = 1.0
    k[3] = 1.0
    v[2] = torch.arange(8.0)
    v[3] = torch.arange(8.0) + 2.0
    q = torch.ones(2, 1, 8)
    slots = torch.tensor([[2, 0], [2, 3]])
    out = torch.ops.fovea.paged_decode(q, k, v, slots, torch.tensor([1, 2]), 0.5)
    assert out[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert out[1].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def _call(**over: torch.Tensor) -> None:
    args = {
        "q": torch.zeros(1, 2, 8),
        "k": torch.zeros(4, 1, 8),
        "v": torch.zeros(4, 1, 8),
        "slots": torch.tensor([[1, 2]]),
        "lens": torch.tensor([2]),
    }
    args.update(over)
    torch.ops.fovea.paged_decode(args["q"], args["k"], args["v"], args["slots"], args["lens"], 1.0)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"slots": torch.tensor([[1, 4]])}, "slot 4 is outside the pool"),
        ({"slots": torch.tensor([[-1, 2]])}, "slot -1 is outside the pool"),
        ({"lens": torch.tensor([3])}, "lens must lie in [1, max_len]"),
        ({"lens": torch.tensor([0])}, "lens must lie in [1, max_len]"),
        (
            {"q": torch.zeros(1, 2, 6), "k": torch.zeros(4, 1, 6), "v": torch.zeros(4, 1, 6)},
            "head_dim must be a multiple of 8, got 6",
        ),
        (
            {
                "k": torch.zeros(4, 1, 8, dtype=torch.float16),
                "v": torch.zeros(4, 1, 8, dtype=torch.float16),
            },
            "the KV cache must be float32 or bfloat16",
        ),
        ({"q": torch.zeros(1, 2, 8, dtype=torch.float64)}, "q must be a float32 or bfloat16"),
        ({"q": torch.zeros(1, 8, 2).transpose(1, 2)}, "with contiguous heads"),
        ({"slots": torch.tensor([[1, 2]], dtype=torch.int32)}, "must be contiguous int64"),
        (
            {"q": torch.zeros(1, 3, 8), "k": torch.zeros(4, 2, 8), "v": torch.zeros(4, 2, 8)},
            "shapes of q, caches, slots and lens disagree",
        ),
    ],
)
def test_bad_input_is_refused(over: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(RuntimeError) as e:
        _call(**over)
    assert message in str(e.value)


def test_decode_reads_bf16_q_rows_in_place() -> None:
    """q as bf16 rows of a wider tensor (the step's qkv): the output is bf16, equal to the
    float32 q's output rounded once."""
    k = torch.randn(6, 2, 16).bfloat16()
    v = torch.randn(6, 2, 16).bfloat16()
    qkv = torch.randn(2, 4 * 16 + 40).bfloat16()
    q = qkv[:, : 4 * 16].view(2, 4, 16)
    slots, lens = torch.tensor([[1, 2, 5], [3, 4, 0]]), torch.tensor([3, 2])
    got = torch.ops.fovea.paged_decode(q, k, v, slots, lens, 0.25)
    want = torch.ops.fovea.paged_decode(q.float().contiguous(), k, v, slots, lens, 0.25)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.bfloat16())


def test_prefill_reads_bf16_q_rows_in_place() -> None:
    qkv = torch.randn(9, 6 * 16 + 2 * 2 * 16).bfloat16()
    q = qkv[:, : 6 * 16].view(9, 6, 16)
    k = qkv[:, 6 * 16 : 8 * 16].view(9, 2, 16)
    v = qkv[:, 8 * 16 :].view(9, 2, 16)
    got = torch.ops.fovea.causal_prefill(q, k, v, 0.25)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.ops.fovea.causal_prefill(q.contiguous(), k, v, 0.25))
    # The float q path (float products; on AVX512-BF16 CPUs the bf16 one rounds the softmax
    # weights to bf16) agrees to bf16 precision.
    want = torch.ops.fovea.causal_prefill(q.float().contiguous(), k, v, 0.25)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [1, 2, 33, 64, 65, 150])
def test_bf16_prefill_matches_float_math(n: int) -> None:
    """All-bf16 inputs (vdpbf16ps where the CPU has it) against the float reference: lengths
    around the 32- and 64-key steps and odd ones (a last position pair half empty)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, h, 64, generator=g).bfloat16() for h in (9, 3, 3))
    got = torch.ops.fovea.causal_prefill(q, k, v, 0.125)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(3, 1)) * 0.125
    scores += torch.full((n, n), float("-inf")).triu(1)
    want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float().repeat_interleave(3, 1))
    torch.testing.assert_close(got.float(), want.reshape(n, -1), rtol=2e-2, atol=2e-2)


def test_bf16_prefill_exact_values() -> None:
    """As test_causal_prefill_exact_values with bf16 inputs (weights 1 and 1/2 are exact in
    bf16): position 0 is its value row, position 1 the average of two rows, bit for bit."""
    q = torch.ones(3, 2, 16).bfloat16()
    k = torch.ones(3, 1, 16).bfloat16()
    v = torch.stack([torch.arange(16.0), torch.arange(16.0) + 2.0, torch.zeros(16)])[:, None]
    out = torch.ops.fovea.causal_prefill(q, k, v.bfloat16(), 0.5)
    assert out[0].tolist() == [*range(16), *range(16)]
    assert out[1].tolist() == [*range(1, 17), *range(1, 17)]


def test_store_kv_writes_rows_at_their_slots() -> None:
    k_cache, v_cache = torch.zeros(5, 2, 8), torch.zeros(5, 2, 8)
    kv = torch.arange(3 * 2 * 2 * 8, dtype=torch.float32).view(3, 2 * 2 * 8)
    k, v = kv[:, :16].view(3, 2, 8), kv[:, 16:].view(3, 2, 8)  # views with a row stride of 32
    torch.ops.fovea.store_kv(k_cache, v_cache, torch.tensor([4, 1, 2]), k, v)
    assert torch.equal(k_cache[[4, 1, 2]], k)
    assert torch.equal(v_cache[[4, 1, 2]], v)
    assert k_cache[[0, 3]].abs().sum().item() == 0.0 == v_cache[[0, 3]].abs().sum().item()
    with pytest.raises(RuntimeError, match="slot 5 is outside the pool"):
        torch.ops.fovea.store_kv(k_cache, v_cache, torch.tensor([4, 5, 2]), k, v)
    with pytest.raises(RuntimeError, match="of the caches' dtype"):
        torch.ops.fovea.store_kv(k_cache, v_cache, torch.tensor([4, 1, 2]), k.double(), v)


def test_kernel_supports() -> None:
    assert kernel_supports(64, torch.float32)
    assert kernel_supports(72, torch.bfloat16)
    assert not kernel_supports(60, torch.float32)
    assert not kernel_supports(64, torch.float16)


def test_cuda_refuses_cpu_paged() -> None:
    args = ServerArgs(model_path="m", device="cuda", attention_backend="cpu_paged")
    assert check_args(args) == (
        "--attention-backend cpu_paged runs on CPU only; use --device cpu or auto"
    )


def test_build_is_cached_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second process finds the first one's build under the same key; changed sources get a
    new key (a new directory), never the stale library."""
    monkeypatch.setenv("FOVEA_CACHE_DIR", str(tmp_path))
    key = cpu_kernels.build_key()
    assert cpu_kernels.library_path() == (tmp_path / "cpu_kernels" / key / "fovea_cpu_kernels.so")
    src = tmp_path / "changed.cpp"
    src.write_text(cpu_kernels.SOURCES[0].read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [src, *cpu_kernels.SOURCES[1:]])
    assert cpu_kernels.build_key() != key


def test_build_failure_falls_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("int main( {\n")
    monkeypatch.setenv("FOVEA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "SOURCES", [broken])
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels._load() is False
    [record] = caplog.records
    assert record.getMessage().startswith("cpu kernels: cannot build (")
    assert "error:" in record.getMessage()
    assert record.getMessage().endswith("); attention uses torch")
    # Nothing half-built is left where a later process would load it.
    assert not cpu_kernels.library_path().exists()
    assert list((tmp_path / "cache" / "cpu_kernels").iterdir()) == []
