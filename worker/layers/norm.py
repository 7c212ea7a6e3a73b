"""RMSNorm, with a fused residual-add variant (as in HF: statistics in float32)."""

from __future__ import annotations

import torch
from torch import nn

from fovea.worker.layers import fused_cpu


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); residual None means x is the residual."""
        if (fused := fused_cpu.rms_norm(x, residual, self.weight, self.eps)) is not None:
            return fused
        if residual is not None:
            x = x + residual
        return self._norm(x), x
