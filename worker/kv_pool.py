"""The paged KV cache: per layer one K and one V tensor indexed by slot.

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

import torch

CPU_DEFAULT_FRACTION = 0.25
CUDA_DEFAULT_FRACTION = 0.88
COMMIT_AT_START_BYTES = 2 << 30
COMMIT_AHEAD_ROWS = 512


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
    slots = max(budget, 0) // bytes_per_slot
    if max_total_tokens is not None:
        slots = min(slots, max_total_tokens)
    slots -= slots % page_size
    if slots < page_size:
        raise RuntimeError(
            f"no memory left for the KV cache (budget {budget} bytes after {weight_bytes} bytes "
            f"of weights); raise --mem-fraction-static"
        )
    return slots


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
    ) -> None:
        self.num_slots = num_slots
        self.page_size = page_size
        rows = num_slots + page_size
        # torch.empty: pages never written cost no physical memory on CPU.
        # Each: [num_slots + page_size, kv_heads, head_dim]
        self.k = [torch.empty(rows, kv_heads, head_dim, dtype=dtype, device=device)]
        self.v = [torch.empty(rows, kv_heads, head_dim, dtype=dtype, device=device)]
        for _ in range(num_layers - 1):
            self.k.append(torch.empty(rows, kv_heads, head_dim, dtype=dtype, device=device))
            self.v.append(torch.empty(rows, kv_heads, head_dim, dtype=dtype, device=device))
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

    @staticmethod
    def bytes_per_slot(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * dtype.itemsize
