"""Attention with torch's SDPA over slots gathered from the KV pool (CPU, and the reference).

Decode tokens (q_len 1) of all sequences go through ONE padded SDPA call per layer: K/V are
gathered by a [B, max_len] slot matrix whose padding points at scratch slot 0 and is masked.
GQA for decode folds the query heads of a KV head into the query-length axis, so K/V are never
expanded. Prefill chunks are attended one sequence at a time (few per step): plain causal when
there is no cached prefix, else a causal mask offset by the prefix length.

Sliding-window layers and full spans (see base.py) get their own view per window: decode rows
gather only the window's slots; a prefill's mask adds the spans and the window, and its keys
start at the first position any query's window reaches. Without either, the plan is the
plain causal one above. With a local pool, windowed views index the local table (slots of
positions outside the window may be 0 there: never gathered).

MLA's latent pool (forward_latent) reuses the same plan: decode rows are MQA over the latent
rows (one shared row a position, the value its first kv_lora_rank elements) with absorbed
queries; a prefill chunk decompresses the latent rows of the keys its view names (this
step's rows when there is no prefix) and runs SDPA per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fovea.worker.attention.base import AttentionBackend, ChunkLayout, LatentProjections


@dataclass
class _Decode:
    token_idx: torch.Tensor | None  # [B] batch positions; None when every token is a decode
    slots: torch.Tensor  # [B, max_len]; row b's first lens[b] entries are real
    lens: torch.Tensor  # [B] int64
    mask: torch.Tensor | None  # [B, 1, 1, max_len] bool, True = attend; None: no padding


@dataclass
class _KV:
    """What a prefill chunk's queries attend to under one window."""

    slots: torch.Tensor | None  # [kv_len] of positions [kv_lo, total); None: this step's K/V
    mask: torch.Tensor | None  # [q_len, kv_len] bool; None: plain causal (is_causal)
    # The mask is plain causal offset by the prefix (no full spans, no window; kv_lo is 0).
    offset_causal: bool = False


@dataclass
class _Prefill:
    start: int
    q_len: int
    views: dict[int, _KV]  # by window (0: global)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for slots of any shape; index_select is ~4x faster than advanced indexing
    on CPU."""
    rows = cache.index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:])


class TorchNativeBackend(AttentionBackend):  # type: ignore[misc,unused-ignore]
    def plan(
        self,
        chunks: list[ChunkLayout],
        out_slots: torch.Tensor,
        req_to_slot: torch.Tensor,
        local: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        device = out_slots.device
        self.out_slots = out_slots
        self.out_local = local[0] if local is not None else None
        # The slot table each window's view reads: windowed layers' K/V sit in the local pool.
        tables = {w: local[1] if local is not None and w else req_to_slot for w in self.windows}
        self.num_tokens = int(out_slots.shape[0])
        decodes = [c for c in chunks if c.q_len == 1]
        self.decodes: dict[int, _Decode] = {}  # by window
        if decodes:
            rows = torch.tensor([c.row for c in decodes], device=device)
            totals = [c.prefix_len + 1 for c in decodes]
            token_idx = None
            if len(decodes) != len(chunks):
                token_idx = torch.tensor([c.start for c in decodes], device=device)
            for w in self.windows:
                if w and max(totals) <= w and tables[w] is req_to_slot:  # all fit the window
                    self.decodes[w] = self.decodes[0]
                else:
                    self.decodes[w] = self._plan_decode(rows, totals, w, token_idx, tables[w])
        self.prefills: list[_Prefill] = []
        for c in chunks:
            if c.q_len == 1:
                continue
            views: dict[int, _KV] = {}
            for w in self.windows:
                fits = w and c.prefix_len + c.q_len <= w
                if fits and tables[w] is req_to_slot:
                    views[w] = views[0]
                else:  # a view that fits its window is the plain causal one, on its table
                    views[w] = self._plan_prefill(c, 0 if fits else w, tables[w])
            self.prefills.append(_Prefill(c.start, c.q_len, views))

    @staticmethod
    def _plan_decode(
        rows: torch.Tensor,
        totals: list[int],
        window: int,
        token_idx: torch.Tensor | None,
        req_to_slot: torch.Tensor,
    ) -> _Decode:
        """Each decode token reads positions [lo, total) of its row: lo = 0 for global
        attention, total - window for a sliding window (so a long sequence reads only its
        window). Rows shorter than the longest are padded with slot 0 and masked."""
        device = rows.device
        los = [max(0, t - window) if window else 0 for t in totals]
        lens_list = [t - lo for t, lo in zip(totals, los, strict=True)]
        max_len = max(lens_list)
        if not any(los):
            slots = req_to_slot[rows, :max_len]
        else:
            cols = torch.tensor(los, device=device)[:, None] + torch.arange(max_len, device=device)
            slots = req_to_slot[rows[:, None], cols.clamp(max=req_to_slot.shape[1] - 1)]
        mask = None
        lens = torch.tensor(lens_list, device=device)
        if min(lens_list) != max_len:
            valid = torch.arange(max_len, device=device)[None, :] < lens[:, None]
            slots = torch.where(valid, slots, 0)
            mask = valid[:, None, None, :]
        return _Decode(token_idx, slots.contiguous(), lens, mask)

    @staticmethod
    def _plan_prefill(c: ChunkLayout, window: int, req_to_slot: torch.Tensor) -> _KV:
        """Queries at positions [prefix, total) over keys [lo, total): causal, or-ed with the
        full spans, and-ed with the window (lo skips keys no query's window reaches)."""
        prefix, total = c.prefix_len, c.prefix_len + c.q_len
        if prefix == 0 and not c.full_spans and not window:
            return _KV(None, None)
        device = req_to_slot.device
        lo = max(0, prefix - window + 1) if window else 0
        qpos = torch.arange(prefix, total, device=device)[:, None]
        kpos = torch.arange(lo, total, device=device)[None, :]
        allowed = kpos <= qpos  # [q_len, total - lo]
        for a, b in c.full_spans:
            allowed |= (qpos >= a) & (qpos < b) & (kpos >= a) & (kpos < b)
        if window:
            allowed &= kpos > qpos - window
        slots = req_to_slot[c.row, lo:total] if prefix else None  # no prefix: lo is 0
        return _KV(slots, allowed, offset_causal=not c.full_spans and not window)

    def forward(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer_id], self.pool.v[layer_id]
        slots = self.out_slots
        if self.out_local is not None and self.pool.is_local(layer_id):
            slots = self.out_local
        self._store(k_cache, v_cache, k, v, slots)
        window = self.window(layer_id)
        decode = self.decodes.get(window)
        if decode is not None and decode.token_idx is None:
            return self._decode(q, k_cache, v_cache, decode)
        out = q.new_empty(self.num_tokens, self.num_heads * self.head_dim)
        if decode is not None:
            idx = decode.token_idx
            assert idx is not None
            out[idx] = self._decode(q[idx], k_cache, v_cache, decode)
        for p in self.prefills:
            end = p.start + p.q_len
            kv = p.views[window]
            out[p.start : end] = self._prefill(q[p.start : end], k, v, k_cache, v_cache, p, kv)
        return out

    def _store(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """This step's K/V rows into their slots [T]."""
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)

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
        kv: _KV,
    ) -> torch.Tensor:
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, head_dim]
        if kv.slots is None:
            end = p.start + p.q_len
            kh = k[p.start : end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, q_len, head_dim]
            vh = v[p.start : end].transpose(0, 1).unsqueeze(0)
        else:
            kh = _gather(k_cache, kv.slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, n, hd]
            vh = _gather(v_cache, kv.slots).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qh,
            kh,
            vh,
            attn_mask=kv.mask,
            is_causal=kv.mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o[0].transpose(0, 1).reshape(p.q_len, self.num_heads * self.head_dim)

    def forward_latent(
        self, layer_id: int, q: torch.Tensor, rows: torch.Tensor, mla: LatentProjections
    ) -> torch.Tensor:
        cache = self.pool.k[layer_id]  # [slots, 1, kv_lora_rank + qk_rope]
        cache.index_copy_(0, self.out_slots, rows.unsqueeze(1))
        heads = q.shape[1]
        decode = self.decodes.get(0)
        if decode is not None:
            idx = decode.token_idx
            q_lat = mla.absorb_query(q if idx is None else q[idx])
            o = self._latent_decode(q_lat, cache, decode, mla.kv_lora_rank)
            o = mla.absorb_output(o.view(-1, heads, mla.kv_lora_rank))  # [B, heads, v_dim]
            if idx is None:
                return o
        out = q.new_empty(self.num_tokens, heads, mla.v_dim)
        if decode is not None:
            out[decode.token_idx] = o
        for p in self.prefills:
            end, kv = p.start + p.q_len, p.views[0]
            src = rows[p.start : end] if kv.slots is None else _gather(cache, kv.slots)[:, 0]
            k, v = mla.expand(src)  # [n, heads, qk], [n, heads, v_dim]
            chunk = F.scaled_dot_product_attention(
                q[p.start : end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=kv.mask, is_causal=kv.mask is None, scale=self.scale,
            )  # fmt: skip  [heads, q_len, v_dim]
            out[p.start : end] = chunk.transpose(0, 1)
        return out

    def _latent_decode(
        self, q: torch.Tensor, cache: torch.Tensor, d: _Decode, v_dim: int
    ) -> torch.Tensor:
        """q [B, heads, D] against latent rows cache [slots, 1, D], values their first v_dim
        elements -> [B, heads * v_dim]."""
        b, heads, dim = q.shape
        kg = _gather(cache, d.slots).transpose(1, 2)  # [B, 1, max_len, D]
        o = F.scaled_dot_product_attention(
            q.view(b, 1, heads, dim), kg, kg[..., :v_dim], attn_mask=d.mask, scale=self.scale
        )
        return o.reshape(b, heads * v_dim)
