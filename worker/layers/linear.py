"""Tensor-parallel linear layers (Megatron style).

Column-parallel layers split the output features across ranks (no communication); row-parallel
layers split the input features and all-reduce the partial sums. Every parameter carries a
`weight_loader(param, loaded, shard_id=None)` that narrows the full checkpoint tensor to this
rank's slice; `loaded` may be a tensor or a safetensors slice, so a rank reads only its part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.worker.distributed import all_reduce, tp_rank, tp_size
from fovea.worker.layers.cpu_layout import CpuWeights

# A tensor or a safetensors PySafeSlice (indexable, with get_shape()).
Loaded = Any
WeightLoader = Callable[[nn.Parameter, Loaded, Any], None]


def loaded_shape(loaded: Loaded) -> list[int]:
    if isinstance(loaded, torch.Tensor):
        return list(loaded.shape)
    return list(loaded.get_shape())


def narrow_loaded(loaded: Loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """loaded[..., start:start+length, ...] along `dim`, reading only that part from disk."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]  # type: ignore[no-any-return]


def read_full(loaded: Loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_checked(param: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(src.shape):
        raise ValueError(f"{what}: shape {tuple(src.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
    """A replicated parameter: the full tensor on every rank."""
    copy_checked(param, read_full(loaded), "replicated weight")


def set_weight_loader(param: torch.Tensor, loader: WeightLoader) -> None:
    param.weight_loader = loader  # type: ignore[attr-defined]


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tp size {d}")
    return n // d


class _ParallelLinear(nn.Module):
    cpu_weights: CpuWeights | None = None  # set by loader.prepare_for_cpu

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        # [out_per_rank, in_per_rank]
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            set_weight_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x Wᵀ (+ bias) through the CPU layouts when prepare_for_cpu gave them."""
        if self.cpu_weights is not None:
            return self.cpu_weights.linear(x, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(_ParallelLinear):
    """y = x Wᵀ with W split by output rows; each rank returns its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.out_per_rank = divide(out_features, tp_size(), "output features")
        super().__init__(in_features, self.out_per_rank, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        part = narrow_loaded(loaded, 0, tp_rank() * self.out_per_rank, self.out_per_rank)
        copy_checked(param, part, "column-parallel weight")


class MergedColumnParallelLinear(_ParallelLinear):
    """Several column-parallel projections stacked in one matmul (gate_up_proj); shard_id is
    the index of the part in `output_sizes`."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.sizes_per_rank = [divide(s, tp_size(), "output features") for s in output_sizes]
        super().__init__(in_features, sum(self.sizes_per_rank), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int), "merged linear needs an integer shard id"
        size = self.sizes_per_rank[shard_id]
        part = narrow_loaded(loaded, 0, tp_rank() * size, size)
        offset = sum(self.sizes_per_rank[:shard_id])
        copy_checked(param.data.narrow(0, offset, size), part, f"merged part {shard_id}")


class QKVParallelLinear(_ParallelLinear):
    """q, k and v projections in one matmul; shard ids 'q', 'k', 'v'. Query heads split across
    ranks; KV heads split too, or replicated when tp_size > num_kv_heads (each rank then keeps
    the one KV head its query heads use)."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "attention heads")
        if tp >= num_kv_heads:
            divide(tp, num_kv_heads, "tp size over KV heads")
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank() * num_kv_heads // tp
        else:
            self.num_kv_heads = divide(num_kv_heads, tp, "KV heads")
            self.kv_head_start = tp_rank() * self.num_kv_heads
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        if shard_id == "q":
            start, size, offset = tp_rank() * self.q_size, self.q_size, 0
        elif shard_id in ("k", "v"):
            start, size = self.kv_head_start * self.head_dim, self.kv_size
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
        else:
            raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        part = narrow_loaded(loaded, 0, start, size)
        copy_checked(param.data.narrow(0, offset, size), part, f"{shard_id}_proj")


class RowParallelLinear(_ParallelLinear):
    """y = x Wᵀ with W split by input columns; partial sums are all-reduced. The bias is added
    once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.in_per_rank = divide(in_features, tp_size(), "input features")
        super().__init__(self.in_per_rank, out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: replicated
            copy_checked(param, read_full(loaded), "row-parallel bias")
            return
        part = narrow_loaded(loaded, 1, tp_rank() * self.in_per_rank, self.in_per_rank)
        copy_checked(param, part, "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = all_reduce(self.matmul(x))
        return y if self.bias is None else y + self.bias
