"""The fused CPU ops (worker/attention/csrc/fused.cpp) where they apply, torch's ops elsewhere.

They apply on CPU tensors of float32 or bfloat16 once this process loaded the kernels
(cpu_kernels.load(), which the model runner calls on CPU unless --attention-backend
torch_native). Each function here computes what its torch fallback computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fovea.worker.attention import cpu_kernels

_DTYPES = (torch.float32, torch.bfloat16)


def _usable(x: torch.Tensor, multiple: int) -> bool:
    return (
        cpu_kernels.active()
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.shape[-1] % multiple == 0
    )


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm(x + residual) * weight, x + residual) from one pass; None where the kernel does
    not apply (the caller runs torch's ops)."""
    if not (_usable(x, 8) and x.dim() == 2 and x.is_contiguous() and weight.dtype == x.dtype):
        return None
    if residual is not None and not (residual.is_contiguous() and residual.dtype == x.dtype):
        return None
    out, total = torch.ops.fovea.rms_norm(x, residual, weight, eps)
    return out, total


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate columns, then up) -> silu(gate) * up [T, I]."""
    if _usable(gate_up, 2) and gate_up.dim() == 2 and gate_up.is_contiguous():
        out: torch.Tensor = torch.ops.fovea.silu_mul(gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """q [T, heads, D], k [T, kv_heads, D] rotated in place (their rows may be views into one
    qkv tensor); False, untouched, where the kernel does not apply."""
    ok = (
        _usable(q, 16)
        and q.dim() == k.dim() == 3
        and all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (q, k))
        and k.dtype == cos.dtype == sin.dtype == q.dtype
        and cos.is_contiguous()
        and sin.is_contiguous()
        and cos.numel() == q.shape[0] * q.shape[2]
    )
    if ok:
        torch.ops.fovea.rotary_(q, k, cos, sin)
    return ok
