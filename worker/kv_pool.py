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

Models with sliding-window layers keep those layers' K/V in a second slot space (the local
pool, `local_layers`, `num_local_slots` + page_size rows, the same slot convention): the
scheduler frees a sequence's local slots once they leave its window (scheduler/window_slots.py),
so the local pool holds about a window per sequence where the global one holds every token.

One sizing path for every layout: the model's KVLayout gives a token's bytes (split into the
global and the local layers' with a local pool), and slots_in_budget / hybrid_slots_in_budget
turn a memory budget into slots.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

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

    def split(self, local_layers: frozenset[int]) -> tuple[KVLayout, KVLayout]:
        """(global, local) layouts when `local_layers` keep their rows in a local pool: the
        same rows, the layers counted apart (the local one has 0 layers without one)."""
        n = len(local_layers)
        return replace(self, num_layers=self.num_layers - n), replace(self, num_layers=n)


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


def slots_in_budget(
    budget: int, bytes_per_slot: int, page_size: int, max_total_tokens: int | None = None
) -> int:
    """Slots of `bytes_per_slot` in `budget` bytes, capped by max_total_tokens, rounded down
    to whole pages (possibly 0)."""
    slots = max(budget, 0) // bytes_per_slot
    if max_total_tokens is not None:
        slots = min(slots, max_total_tokens)
    return slots - slots % page_size


def hybrid_slots_in_budget(
    budget: int,
    global_bytes_per_slot: int,
    local_bytes_per_slot: int,
    local_ratio: float,
    page_size: int,
    max_total_tokens: int | None,
) -> tuple[int, int]:
    """(global, local) slots of a two-pool cache with `local_ratio` local slots per global
    one in `budget` bytes: each global slot is charged its bytes and its share of local ones
    (max_total_tokens caps the global pool); the local pool is that ratio of it, whole pages,
    at least one."""
    per_global = global_bytes_per_slot + local_bytes_per_slot * local_ratio
    num_global = slots_in_budget(budget, max(1, math.ceil(per_global)), page_size, max_total_tokens)
    num_local = int(num_global * local_ratio)
    return num_global, max(page_size, num_local - num_local % page_size)


def _no_room(budget: int, weight_bytes: int) -> RuntimeError:
    return RuntimeError(
        f"no memory left for the KV cache (budget {budget} bytes after {weight_bytes} bytes "
        f"of weights); raise --mem-fraction-static"
    )


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
        raise _no_room(budget, weight_bytes)
    return slots


def plan_hybrid_slots(
    *,
    device: torch.device,
    global_bytes_per_slot: int,
    local_bytes_per_slot: int,
    local_ratio: float,
    weight_bytes: int,
    page_size: int,
    mem_fraction: float | None,
    max_total_tokens: int | None,
) -> tuple[int, int]:
    """(global, local) usable slots of a two-pool cache (hybrid_slots_in_budget) in the
    memory budget left after the weights. Raises if not even one page fits."""
    budget = kv_budget_bytes(device, weight_bytes, mem_fraction)
    num_global, num_local = hybrid_slots_in_budget(
        budget, global_bytes_per_slot, local_bytes_per_slot, local_ratio, page_size,
        max_total_tokens,
    )  # fmt: skip
    if num_global < page_size:
        raise _no_room(budget, weight_bytes)
    return num_global, num_local


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
        local_layers: frozenset[int] = frozenset(),
        num_local_slots: int = 0,
    ) -> None:
        """kind: KVLayout's; "mla_latent" keeps only `k` (latent rows) and leaves `v` empty.
        local_layers: the layers whose K/V live in the local pool of num_local_slots."""
        if local_layers and num_local_slots < page_size:
            raise ValueError(f"local pool of {num_local_slots} slots: less than one page")
        self.layout = KVLayout(kind, num_layers, kv_heads, head_dim)
        self.dtype = dtype
        self.num_slots = num_slots
        self.num_local_slots = num_local_slots if local_layers else 0
        self.page_size = page_size
        self.local_layers = local_layers
        rows = num_slots + page_size
        local_rows = num_local_slots + page_size
        # torch.empty: pages never written cost no physical memory on CPU.
        # Each: [num_slots + page_size (num_local_slots + page_size), kv_heads, head_dim]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []  # empty for a latent pool
        for layer in range(num_layers):
            n = local_rows if layer in local_layers else rows
            self.k.append(torch.empty(n, kv_heads, head_dim, dtype=dtype, device=device))
            if self.layout.has_values:
                self.v.append(torch.empty(n, kv_heads, head_dim, dtype=dtype, device=device))
        self.rows = rows
        self.local_rows = local_rows if local_layers else 0
        # Rows [0, committed) of every global tensor (local_committed: of every local one)
        # have been written (zeroed or stored); no step has written a row at or above it.
        # GPU memory is committed when allocated.
        cpu = device.type == "cpu"
        self.committed = page_size if cpu else rows
        self.local_committed = page_size if cpu else self.local_rows
        # The scratch page is read as padding (masked): keep it finite so 0 * x stays 0.
        for t in (*self.k, *self.v):
            t[:page_size].zero_()
        # The same share of each space's rows, COMMIT_AT_START_BYTES in all.
        self._commit_to(min(rows, COMMIT_AT_START_BYTES * rows // self.nbytes()), False)
        if local_layers:
            n = self.local_rows
            self._commit_to(min(n, COMMIT_AT_START_BYTES * n // self.nbytes()), True)

    def is_local(self, layer_id: int) -> bool:
        return layer_id in self.local_layers

    def commit(self, upto: int, local: bool = False) -> None:
        """Make rows [0, upto) of every tensor of one slot space (global or local) resident,
        and COMMIT_AHEAD_ROWS more. Call before a step stores K/V in rows below `upto`."""
        if upto > (self.local_committed if local else self.committed):
            limit = self.local_rows if local else self.rows
            self._commit_to(min(limit, upto + COMMIT_AHEAD_ROWS), local)

    def _tensors(self, local: bool) -> list[torch.Tensor]:
        layers = [i for i in range(len(self.k)) if self.is_local(i) == local]
        return [self.k[i] for i in layers] + [self.v[i] for i in layers if self.v]

    def _commit_to(self, end: int, local: bool) -> None:
        # Rows at or above the committed mark hold nothing yet: zeroing them loses no K/V.
        done = self.local_committed if local else self.committed
        for t in self._tensors(local):
            t[done:end].zero_()
        if local:
            self.local_committed = max(done, end)
        else:
            self.committed = max(done, end)

    def committed_bytes(self) -> int:
        total = 0
        for local, rows, done in (
            (False, self.rows, self.committed),
            (True, self.local_rows, self.local_committed),
        ):
            if rows:
                per_row = sum(t[0].numel() * t.element_size() for t in self._tensors(local))
                total += per_row * done
        return total

    def nbytes(self) -> int:
        """Bytes the pool reserves (on CPU resident once committed)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def kind(self) -> str:
        return self.layout.kind

    def bytes_per_token(self, local: bool = False) -> int:
        """Bytes one token takes in one slot space: the global layers' (every layer's with
        one pool) or the local layers' (0 without a local pool)."""
        return self.layout.split(self.local_layers)[local].bytes_per_token(self.dtype)

    @classmethod
    def for_layout(
        cls, layout: KVLayout, *, num_slots: int, page_size: int, dtype: torch.dtype,
        device: torch.device, local_layers: frozenset[int] = frozenset(),
        num_local_slots: int = 0,
    ) -> KVPool:  # fmt: skip
        return cls(
            num_layers=layout.num_layers, num_slots=num_slots, page_size=page_size,
            kv_heads=layout.kv_heads, head_dim=layout.head_dim, dtype=dtype, device=device,
            kind=layout.kind, local_layers=local_layers, num_local_slots=num_local_slots,
        )  # fmt: skip
