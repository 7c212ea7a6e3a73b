"""The attention backend interface.

Per step the model runner calls `plan(...)` once with the batch layout, then every layer calls
`forward(layer_id, q, k, v)`: the backend writes this step's K/V into the pool at the planned
slots and attends each token over its sequence's slots (prefix + this chunk, causal).

An MLA model whose pool holds latent rows (KVLayout kind "mla_latent") calls
`forward_latent(layer_id, q, rows, mla)` instead: this step's latent rows go into the pool;
decode tokens attend in latent space (the query absorbs the key up-projection, the output the
value up-projection: one shared K/V row a position, as the DeepSeek-V2 paper's inference
form); a prefill chunk's keys and values are decompressed from the latent rows of its
positions (a cached prefix's and earlier chunks' read back from the pool) and attended per head.

Two optional refinements, both off by default (the plain causal path is unchanged):
- `layer_windows[layer_id] = w > 0`: a sliding-window (local) layer; a token attends only to
  the w most recent positions, itself included (kv > q - w). When the pool keeps these layers'
  K/V in its local slot space (`KVPool.local_layers`), `plan` gets the step's local slots and
  table too, and those layers store and read there; otherwise every layer keeps all its KV.
- `ChunkLayout.full_spans`: position spans inside the chunk whose tokens attend to each other
  in full (an image under bidirectional image attention), on top of causal attention.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fovea.worker.kv_pool import KVPool


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """One sequence's chunk in the flattened batch: tokens [start, start + q_len) of the batch
    are its positions [prefix_len, prefix_len + q_len); its slots are row `row` of the
    req_to_slot table (first prefix_len + q_len entries)."""

    row: int
    start: int
    q_len: int
    prefix_len: int
    # [lo, hi) sequence positions within [prefix_len, prefix_len + q_len), disjoint: the
    # tokens of one span see each other in full.
    full_spans: tuple[tuple[int, int], ...] = ()


class LatentProjections(Protocol):
    """An MLA layer's up-projections as latent attention uses them (per rank's heads).
    Latent rows are [n, kv_lora_rank + qk_rope_head_dim]: normalized compressed KV, then the
    rotated shared rope key."""

    kv_lora_rank: int
    v_dim: int

    def absorb_query(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, heads, qk_nope + qk_rope] -> [B, heads, kv_lora_rank + qk_rope]: q_nope
        through the key up-projection, then q_rope as is."""
        ...

    def absorb_output(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, heads, kv_lora_rank] (attention over latents) -> [B, heads, v_dim]."""
        ...

    def expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [n, kv_lora_rank + qk_rope] -> k [n, heads, qk_nope + qk_rope],
        v [n, heads, v_dim]."""
        ...


class AttentionBackend(ABC):
    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float | None = None,
        layer_windows: Sequence[int] | None = None,
    ) -> None:
        """scale: of the scores (default head_dim ** -0.5); layer_windows: one per layer,
        0 for global attention (default: every layer global)."""
        self.pool = pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.layer_windows = [int(w) for w in layer_windows or ()]
        # The distinct windows (0 included): the backend plans one view per window.
        self.windows = sorted({0, *self.layer_windows})

    def window(self, layer_id: int) -> int:
        return self.layer_windows[layer_id] if self.layer_windows else 0

    @abstractmethod
    def plan(
        self,
        chunks: list[ChunkLayout],
        out_slots: torch.Tensor,
        req_to_slot: torch.Tensor,
        local: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Prepare this step's metadata. out_slots [T]: where each token's K/V goes; local:
        (out_local_slots [T], req_to_local) for the pool's local layers, when it has any."""

    @abstractmethod
    def forward(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""

    @abstractmethod
    def forward_latent(
        self, layer_id: int, q: torch.Tensor, rows: torch.Tensor, mla: LatentProjections
    ) -> torch.Tensor:
        """MLA over a latent pool: q [T, heads, qk_nope + qk_rope] (rope part rotated), rows
        [T, kv_lora_rank + qk_rope] this step's latent rows -> [T, heads, v_dim]."""
