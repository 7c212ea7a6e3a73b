"""The attention backend interface.

Per step the model runner calls `plan(...)` once with the batch layout, then every layer calls
`forward(layer_id, q, k, v)`: the backend writes this step's K/V into the pool at the planned
slots and attends each token over its sequence's slots (prefix + this chunk, causal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

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


class AttentionBackend(ABC):
    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.pool = pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    @abstractmethod
    def plan(
        self, chunks: list[ChunkLayout], out_slots: torch.Tensor, req_to_slot: torch.Tensor
    ) -> None:
        """Prepare this step's metadata. out_slots [T]: where each token's K/V goes."""

    @abstractmethod
    def forward(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
