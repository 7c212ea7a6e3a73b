"""CPU attention whose decode reads K/V rows in place from the paged pool (csrc/paged_decode.cpp).

Same plan and prefill path as TorchNativeBackend; only decode tokens differ. At a decode batch
of 32 sequences of ~280 tokens (SmolLM2-135M, 2 threads) the gather + SDPA pair took 2.5 ms
a layer, 39% of the step; the kernel ~0.9 ms.
"""

from __future__ import annotations

import torch

from fovea.worker.attention.torch_native import TorchNativeBackend, _Decode


def kernel_supports(head_dim: int, kv_dtype: torch.dtype) -> bool:
    """The kernel's vectors are 8 floats wide and it reads float32 or bfloat16 caches."""
    return head_dim % 8 == 0 and kv_dtype in (torch.float32, torch.bfloat16)


class CpuPagedBackend(TorchNativeBackend):  # type: ignore[misc,unused-ignore]
    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: _Decode
    ) -> torch.Tensor:
        out: torch.Tensor = torch.ops.fovea.paged_decode(
            q.float().contiguous(), k_cache, v_cache, d.slots, d.lens, self.scale
        )
        return out.to(q.dtype)
