"""CPU attention with compiled kernels (csrc/): decode reads K/V rows in place from the paged
pool (paged_decode.cpp); a prefill chunk with no window and no full spans runs
causal_prefill.cpp, reading a fresh prompt's K/V from the step's rows and a chunk after a
cached prefix (a prefix-cache hit, a long prompt's later chunks) from the pool by slot. The
rest is TorchNativeBackend's. MLA's latent decode runs paged_decode_latent (one pass over a
sequence's latent rows per four query heads).

SmolLM2-135M, 2 threads: at a decode batch of 32 sequences of ~280 tokens the gather + SDPA
pair took 2.5 ms a layer, 39% of the step, the first kernel ~0.9 ms (fp32, AVX2); on AVX-512
bf16 the kernel went 505 -> 272 us a layer once each K/V row fed all its query heads. A
200-token prompt's attention: 0.29-0.33 ms a layer against SDPA's 0.74-0.86 (bf16).
"""

from __future__ import annotations

import torch

from fovea.worker.attention.torch_native import _KV, TorchNativeBackend, _Decode, _Prefill


def kernel_supports(head_dim: int, kv_dtype: torch.dtype) -> bool:
    """The kernels' vectors are 8 floats wide and they read float32 or bfloat16 K/V."""
    return head_dim % 8 == 0 and kv_dtype in (torch.float32, torch.bfloat16)


class CpuPagedBackend(TorchNativeBackend):  # type: ignore[misc,unused-ignore]
    """The kernels read q in place (float32 or bf16 rows of the step's qkv) and return the
    output in q's dtype."""

    def _store(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        rows_ok = all(
            x.dim() == 3 and x.dtype == k_cache.dtype and x.stride(2) == 1
            and x.stride(1) == x.shape[2]
            for x in (k, v)
        )  # fmt: skip
        if not rows_ok:
            return super()._store(k_cache, v_cache, k, v, slots)
        torch.ops.fovea.store_kv(k_cache, v_cache, slots, k, v)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: _Decode
    ) -> torch.Tensor:
        out: torch.Tensor = torch.ops.fovea.paged_decode(
            q, k_cache, v_cache, d.slots, d.lens, self.scale
        )
        return out

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        p: _Prefill,
        kv: _KV,
    ) -> torch.Tensor:
        out: torch.Tensor
        if kv.slots is None and kv.mask is None:  # a fresh prompt
            end = p.start + p.q_len
            out = torch.ops.fovea.causal_prefill(q, k[p.start : end], v[p.start : end], self.scale)
        elif kv.slots is not None and kv.offset_causal:  # after a cached prefix or chunk
            out = torch.ops.fovea.causal_prefill_paged(q, k_cache, v_cache, kv.slots, self.scale)
        else:  # a window or full spans
            out = super()._prefill(q, k, v, k_cache, v_cache, p, kv)
        return out

    def _latent_decode(
        self, q: torch.Tensor, cache: torch.Tensor, d: _Decode, v_dim: int
    ) -> torch.Tensor:
        out: torch.Tensor = torch.ops.fovea.paged_decode_latent(
            q.contiguous(), cache, d.slots, d.lens, v_dim, self.scale
        )
        return out
