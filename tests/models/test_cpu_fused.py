"""The fused CPU kernels (worker/attention/csrc/fused.cpp): RMSNorm, SiLU-mul and rotary against
the torch ops they replace, the fallback where they do not apply, their input checks, and the
row argmax against torch.argmax."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fovea.worker.attention import cpu_kernels
from fovea.worker.layers import fused_cpu
from fovea.worker.layers.norm import RMSNorm
from fovea.worker.layers.rotary import apply_rotary, apply_rotary_inplace


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    if not cpu_kernels.load():
        pytest.fail("the CPU kernels did not build on this machine (see the warning above)")


def _torch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    xf = total.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, total


def _acts(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


def test_fused_bf16_equal_torch_bit_for_bit() -> None:
    """On bf16 the kernels keep every rounding torch's op chains make."""
    bf = torch.bfloat16
    x, res = _acts(bf, 37, 576), _acts(bf, 37, 577)[:, :576].contiguous()
    w = (torch.rand(576, generator=torch.Generator().manual_seed(1)) + 0.5).to(bf)
    out, total = torch.ops.fovea.rms_norm(x, res, w, 1e-5)
    want_out, want_total = _torch_rms_norm(x, res, w, 1e-5)
    assert torch.equal(total, want_total)
    assert torch.equal(out, want_out)

    for inter in (1536, 3420, 13):  # 3420: Qwen2.5-VL's vision MLP, a tail of 4 (of 12 on
        gate_up = _acts(bf, 37, 2 * inter)  # AVX-512); 13: all but 5 columns in the tail
        gate, up = gate_up.chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        assert torch.equal(torch.ops.fovea.silu_mul(gate_up), want), inter

    qkv = _acts(bf, 37, 960)  # q: 9 heads of 64, k: 3 heads, v: 3 heads
    q, k = qkv[:, :576].view(37, 9, 64), qkv[:, 576:768].view(37, 3, 64)
    angles = torch.arange(37.0)[:, None] * torch.linspace(1.0, 1e-3, 32)[None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, 64]
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    want_q, want_k = apply_rotary(q, k, (cos, sin))
    v_before = qkv[:, 768:].clone()
    got_q, got_k = apply_rotary_inplace(q, k, (cos, sin))
    assert got_q.data_ptr() == qkv.data_ptr()  # in place, through the views
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(qkv[:, 768:], v_before)  # v's columns untouched


def test_fused_float32_close_to_torch() -> None:
    x, res, w = _acts(torch.float32, 5, 64), _acts(torch.float32, 5, 65)[:, :64], torch.ones(64)
    norm = RMSNorm(64, 1e-6)
    out, total = norm(x, res.contiguous())
    want_out, want_total = _torch_rms_norm(x, res, w, 1e-6)
    assert torch.equal(total, want_total)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    for inter in (16, 3420):
        gate_up = _acts(torch.float32, 3, 2 * inter)
        gate, up = gate_up.chunk(2, dim=-1)
        got = fused_cpu.silu_mul(gate_up)
        assert got.shape == (3, inter)
        torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_fused_falls_back_where_kernels_do_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """float16 and a process without the kernels take torch's ops."""
    gate_up = _acts(torch.float16, 2, 20)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fused_cpu.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)
    assert fused_cpu.rms_norm(_acts(torch.float16, 2, 64), None, torch.ones(64), 1e-6) is None
    q, k = _acts(torch.float32, 2, 2, 64), _acts(torch.float32, 2, 1, 64)
    cos, sin = torch.ones(2, 1, 64), torch.zeros(2, 1, 64)
    monkeypatch.setattr(cpu_kernels, "_loaded", False)
    assert fused_cpu.rms_norm(_acts(torch.float32, 2, 64), None, torch.ones(64), 1e-6) is None
    assert fused_cpu.rotary_inplace(q, k, cos, sin) is False


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: torch.ops.fovea.rms_norm(torch.zeros(2, 12), None, torch.ones(12), 1e-6),
         "x's last dimension must be a multiple of 8"),
        (lambda: torch.ops.fovea.rms_norm(torch.zeros(2, 8), None, torch.ones(16), 1e-6),
         "weight must be a contiguous [hidden] of x's dtype"),
        (lambda: torch.ops.fovea.rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.ones(8),
                                          1e-6),
         "residual must be a contiguous tensor like x"),
        (lambda: torch.ops.fovea.silu_mul(torch.zeros(2, 25)),
         "gate_up must be a contiguous [T, 2 * I]"),
        (lambda: torch.ops.fovea.silu_mul(torch.zeros(2, 24, 2)),
         "gate_up must be a contiguous [T, 2 * I]"),
        (lambda: torch.ops.fovea.silu_mul(torch.zeros(2, 32, dtype=torch.float64)),
         "gate_up must be float32 or bfloat16"),
        (lambda: torch.ops.fovea.causal_prefill(torch.zeros(2, 2, 8), torch.zeros(3, 1, 8),
                                                torch.zeros(3, 1, 8), 1.0),
         "shapes of q, k and v disagree"),
        (lambda: torch.ops.fovea.causal_prefill(torch.zeros(2, 2, 12), torch.zeros(2, 1, 12),
                                                torch.zeros(2, 1, 12), 1.0),
         "head_dim must be a multiple of 8, got 12"),
        (lambda: torch.ops.fovea.causal_prefill(torch.zeros(2, 2, 8), torch.zeros(2, 1, 8),
                                                torch.zeros(2, 1, 8, dtype=torch.float16), 1.0),
         "k and v must be [n, kv_heads, head_dim] alike"),
        (lambda: torch.ops.fovea.rotary_(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8),
                                         torch.ones(2, 8), torch.ones(2, 8)),
         "head_dim must be equal and a multiple of 16"),
        (lambda: torch.ops.fovea.rotary_(torch.zeros(2, 1, 16), torch.zeros(2, 1, 16),
                                         torch.ones(3, 16), torch.ones(2, 16)),
         "cos and sin must be contiguous [T, (1,) head_dim] of q's dtype"),
    ],
)  # fmt: skip
def test_fused_bad_input_is_refused(call: Any, message: str) -> None:
    with pytest.raises(RuntimeError) as e:
        call()
    assert message in str(e.value)


@pytest.mark.parametrize("vocab", [1, 5, 16, 37, 49152, 32001])
def test_argmax_rows_equals_torch(vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    # Ties: row 1's maximum at three places, the first in the vector body or the tail.
    x[1] = x[1].clamp(max=1.5)
    x[1, [vocab // 3, vocab // 2, vocab - 1]] = 3.0
    x[2] = float("-inf")  # every value -inf: index 0, as torch
    x[3, vocab // 2] = float("nan")  # a NaN wins over larger values
    x[3, 0] = 1e30
    x[4] = 2.0  # all equal: index 0
    x[5, vocab - 1] = 1e30  # the maximum in the last element (the tail when vocab % 16)
    got = cpu_kernels.argmax_rows(x)
    assert got.dtype == torch.int64
    assert got.tolist() == x.argmax(dim=-1).tolist()
    # Strided rows (a slice of wider logits) read the same values.
    wide = torch.zeros(6, vocab + 7)
    wide[:, :vocab] = x
    assert cpu_kernels.argmax_rows(wide[:, :vocab]).tolist() == x.argmax(dim=-1).tolist()


def test_argmax_rows_exact_indices() -> None:
    x = torch.full((3, 40), -1.0)
    x[0, 17], x[0, 33] = 5.0, 5.0  # tie: the first
    x[1, 39] = 0.5  # in the 8-element tail past 32
    x[2, 8], x[2, 24] = float("nan"), 9.0
    assert torch.ops.fovea.argmax_rows(x).tolist() == [17, 39, 8]
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fovea.argmax_rows(x.bfloat16())
    with pytest.raises(RuntimeError, match="empty row"):
        torch.ops.fovea.argmax_rows(torch.empty(2, 0))
