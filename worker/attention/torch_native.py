"""Attention with torch's SDPA over slots gathered from the KV pool (CPU, and the reference).

Decode tokens (q_len 1) of all sequences go through ONE padded SDPA call per layer: K/V are
gathered by a [B, max_len] slot matrix whose padding points at scratch slot 0 and is masked.
GQA for decode folds the query heads of a KV head into the query-length axis, so K/V are never
expanded. Prefill chunks are attended one sequence at a time (few per step): plain causal when
there is no cached prefix, else a causal mask offset by the prefix length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fovea.worker.attention.base import AttentionBackend, ChunkLayout


@dataclass
class _Decode:
    token_idx: torch.Tensor | None  # [B] batch positions; None when every token is a decode
    slots: torch.Tensor  # [B, max_len]
    mask: torch.Tensor | None  # [B, 1, 1, max_len] bool, True = attend; None: no padding


@dataclass
class _Prefill:
    start: int
    q_len: int
    slots: torch.Tensor | None  # [prefix + q_len]; None: no prefix, use this step's K/V
    mask: torch.Tensor | None  # [q_len, prefix + q_len] bool


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for slots of any shape; index_select is ~4x faster than advanced indexing
    on CPU."""
    rows = cache.index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:])


class TorchNativeBackend(AttentionBackend):  # type: ignore[misc,unused-ignore]
    def plan(
        self, chunks: list[ChunkLayout], out_slots: torch.Tensor, req_to_slot: torch.Tensor
    ) -> None:
        device = out_slots.device
        self.out_slots = out_slots
        self.num_tokens = int(out_slots.shape[0])
        decodes = [c for c in chunks if c.q_len == 1]
        self.decode: _Decode | None = None
        if decodes:
            rows = torch.tensor([c.row for c in decodes], device=device)
            lens_list = [c.prefix_len + 1 for c in decodes]
            max_len = max(lens_list)
            slots = req_to_slot[rows, :max_len]
            mask = None
            if min(lens_list) != max_len:
                lens = torch.tensor(lens_list, device=device)
                valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
                slots = torch.where(valid, slots, 0)
                mask = valid[:, None, None, :]
            token_idx = None
            if len(decodes) != len(chunks):
                token_idx = torch.tensor([c.start for c in decodes], device=device)
            self.decode = _Decode(token_idx, slots, mask)
        self.prefills: list[_Prefill] = []
        for c in chunks:
            if c.q_len == 1:
                continue
            if c.prefix_len == 0:
                self.prefills.append(_Prefill(c.start, c.q_len, None, None))
                continue
            total = c.prefix_len + c.q_len
            qpos = torch.arange(c.prefix_len, total, device=device)
            mask = torch.arange(total, device=device)[None, :] <= qpos[:, None]
            self.prefills.append(_Prefill(c.start, c.q_len, req_to_slot[c.row, :total], mask))

    def forward(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer_id], self.pool.v[layer_id]
        k_cache.index_copy_(0, self.out_slots, k)
        v_cache.index_copy_(0, self.out_slots, v)
        if self.decode is not None and self.decode.token_idx is None:
            return self._decode(q, k_cache, v_cache, self.decode)
        out = q.new_empty(self.num_tokens, self.num_heads * self.head_dim)
        if self.decode is not None:
            idx = self.decode.token_idx
            assert idx is not None
            out[idx] = self._decode(q[idx], k_cache, v_cache, self.decode)
        for p in self.prefills:
            end = p.start + p.q_len
            out[p.start : end] = self._prefill(q[p.start : end], k, v, k_cache, v_cache, p)
        return out

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: _Decode
    ) -> torch.Tensor:
        b = q.shape[0]
        kvh, hd = self.num_kv_heads, self.head_dim
        group = self.num_heads // kvh
        qg = q.view(b, kvh, group, hd)  # query heads of one KV head as the query-length axis
        kg = _gather(k_cache, d.slots).transpose(1, 2)  # [B, kv_heads, max_len, head_dim]
        vg = _gather(v_cache, d.slots).transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=d.mask, scale=self.scale)
        return o.reshape(b, self.num_heads * hd)  # [B, heads * head_dim]

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        p: _Prefill,
    ) -> torch.Tensor:
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, head_dim]
        if p.slots is None:
            end = p.start + p.q_len
            kh = k[p.start : end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, q_len, head_dim]
            vh = v[p.start : end].transpose(0, 1).unsqueeze(0)
        else:
            kh = _gather(k_cache, p.slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, total, hd]
            vh = _gather(v_cache, p.slots).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qh,
            kh,
            vh,
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o[0].transpose(0, 1).reshape(p.q_len, self.num_heads * self.head_dim)
