"""torch.distributed for tensor parallelism: one process group over the tp ranks.

gloo on CPU, NCCL on CUDA. With world size 1 no group is created and every collective is a
no-op, so a single-rank worker never touches torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_SIZE = 1
_TP_RANK = 0
# Collective calls made by this process (no-ops at world size 1 included): the per-step
# communication cost of a model, for benchmarks and tests.
calls = {"all_reduce": 0, "all_gather": 0}


def init_distributed(tp_size: int, rank: int, init_addr: str, device: torch.device) -> None:
    """Join the tp group. `init_addr` is a torch init method, e.g. 'tcp://127.0.0.1:29500'."""
    global _TP_SIZE, _TP_RANK
    _TP_SIZE, _TP_RANK = tp_size, rank
    if tp_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_addr, world_size=tp_size, rank=rank)


def destroy_distributed() -> None:
    global _TP_SIZE, _TP_RANK
    if dist.is_initialized():
        dist.destroy_process_group()
    _TP_SIZE, _TP_RANK = 1, 0


def tp_rank() -> int:
    return _TP_RANK


def tp_size() -> int:
    return _TP_SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    calls["all_reduce"] += 1
    if _TP_SIZE > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order)."""
    calls["all_gather"] += 1
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
