"""The paged KV cache: per layer one K and one V tensor indexed by slot (or, for an MLA
model's latent cache, one tensor of latent rows and no V).

Slot convention (the scheduler relies on it): slots 0..page_size-1 are a scratch page, never
handed out; attention reads padding from slot 0 and masks it. Usable slots are
page_size..num_slots+page_size-1, so each tensor has num_slots + page_size rows.

On CPU the pool's memory is committed (first written) ahead of use, in bulk: a row left for
the step that stores its K/V costs page faults scattered over 2 x layers tensors, several times
dearer than zeroing in bulk (docs/cpu.md). The scheduler hands out the lowest free slots first,
so start-up commits the first COMMIT_AT_START_BYTES of rows and a step that reaches above the
committed rows commits up to COMMIT_AHEAD_ROWS past its highest slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CPU_DEFAULT_FRACTION = 0.25
CUDA_DEFAULT_FRACTION = 0.88
COMMIT_AT_START_BYTES = 2 << 30
COMMIT_AHEAD_ROWS = 512


@dataclass(frozen=True)
class KVLayout:
    """What the pool holds for one token in every layer, on one rank.

    kind "kv": a K row and a V row of [kv_heads, head_dim] each. kind "mla_latent" (DeepSeek-V2
    MLA): one row [1, head_dim] holding the normalized compressed KV (kv_lora_rank values) then
    the rotated shared rope key (qk_rope_head_dim values), and no V: attention reads values
    from the same row (worker/attention/base.py, forward_latent)."""

    kind: str
    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def has_values(self) -> bool:
        return self.kind == "kv"

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        tensors = 2 if self.has_values else 1
        return tensors * self.num_layers * self.kv_heads * self.head_dim * dtype.itemsize


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget_bytes(device: torch.device, weight_bytes: int, mem_fraction: float | None) -> int:
    """Bytes for caches: the memory fraction less the weights (and, on CUDA, less whatever is
    allocated already, when that is more). May be negative."""
    if device.type == "cuda":
        fraction = CUDA_DEFAULT_FRACTION if mem_fraction is None else mem_fraction
        used = torch.cuda.memory_allocated(device)
        # weights are already counted in `used` once loaded on the device
        return int(fraction * total_memory_bytes(device)) - max(used, weight_bytes)
    fraction = CPU_DEFAULT_FRACTION if mem_fraction is None else mem_fraction
    return int(fraction * total_memory_bytes(device)) - weight_bytes


def plan_num_slots(
    *,
    device: torch.device,
    bytes_per_slot: int,
    weight_bytes: int,
    page_size: int,
    mem_fraction: float | None,
    max_total_tokens: int | None,
) -> int:
    """Usable slots: the memory budget left after the weights (and any other pool counted in
    `weight_bytes`), capped by max_total_tokens, rounded down to whole pages. Raises if not
    even one page fits."""
    budget = kv_budget_bytes(device, weight_bytes, mem_fraction)
    slots = slots_in_budget(budget, bytes_per_slot, page_size, max_total_tokens)
    if slots < page_size:
        raise RuntimeError(
            f"no memory left for the KV cache (budget {budget} bytes after {weight_bytes} bytes "
            f"of weights); raise --mem-fraction-static"
        )
    return slots


def slots_in_budget(
    budget: int, bytes_per_slot: int, page_size: int, max_total_tokens: int | None = None
) -> int:
    """Slots (tokens) whose cache rows fit in `budget` bytes, capped by max_total_tokens,
    rounded down to whole pages (0 when not even one page fits)."""
    slots = max(budget, 0) // bytes_per_slot
    if max_total_tokens is not None:
        slots = min(slots, max_total_tokens)
    return slots - slots % page_size


class KVPool:
    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kind: str = "kv",
    ) -> None:
        """kind: KVLayout's; "mla_latent" keeps only `k` (latent rows) and leaves `v` empty."""
        self.layout = KVLayout(kind, num_layers, kv_heads, head_dim)
        self.dtype = dtype
        self.num_slots = num_slots
        self.page_size = page_size
        rows = num_slots + page_size

        def layer() -> torch.Tensor:
            # torch.empty: pages never written cost no physical memory on CPU.
            return torch.empty(rows, kv_heads, head_dim, dtype=dtype, device=device)

        # Each: [num_slots + page_size, kv_heads, head_dim]
        self.k = [layer() for _ in range(num_layers)]
        self.v = [layer() for _ in range(num_layers)] if self.layout.has_values else []
        self.rows = rows
        # Rows [0, committed) of every tensor have been written (zeroed or stored); no step
        # has written a row at or above it. GPU memory is committed when allocated.
        self.committed = page_size if device.type == "cpu" else rows
        # The scratch page is read as padding (masked): keep it finite so 0 * x stays 0.
        for t in (*self.k, *self.v):
            t[:page_size].zero_()
        self._commit_to(min(rows, COMMIT_AT_START_BYTES * rows // self.nbytes()))

    def commit(self, upto: int) -> None:
        """Make rows [0, upto) of every tensor resident, and COMMIT_AHEAD_ROWS more. Call
        before a step stores K/V in rows below `upto`."""
        if upto > self.committed:
            self._commit_to(min(self.rows, upto + COMMIT_AHEAD_ROWS))

    def _commit_to(self, end: int) -> None:
        # Rows at or above `committed` hold nothing yet: zeroing them loses no K/V.
        for t in (*self.k, *self.v):
            t[self.committed : end].zero_()
        self.committed = max(self.committed, end)

    def committed_bytes(self) -> int:
        return self.nbytes() // self.rows * self.committed

    def nbytes(self) -> int:
        """Bytes the pool reserves (on CPU resident once committed)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def kind(self) -> str:
        return self.layout.kind

    def bytes_per_token(self) -> int:
        return self.layout.bytes_per_token(self.dtype)

    @classmethod
    def for_layout(
        cls, layout: KVLayout, *, num_slots: int, page_size: int, dtype: torch.dtype,
        device: torch.device,
    ) -> KVPool:  # fmt: skip
        return cls(
            num_layers=layout.num_layers, num_slots=num_slots, page_size=page_size,
            kv_heads=layout.kv_heads, head_dim=layout.head_dim, dtype=dtype, device=device,
            kind=layout.kind,
        )  # fmt: skip

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return KVLayout("kv", num_layers, kv_heads, head_dim).bytes_per_token(dtype)
