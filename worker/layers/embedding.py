"""Vocabulary-parallel embedding and LM head: the vocabulary is split across ranks (padded up
to a multiple of tp_size)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.worker.distributed import all_gather, all_reduce, tp_rank, tp_size
from fovea.worker.layers.cpu_layout import CpuWeights
from fovea.worker.layers.linear import (
    Loaded,
    copy_checked,
    loaded_shape,
    narrow_loaded,
    set_weight_loader,
)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        tp = tp_size()
        self.vocab_size = vocab_size
        self.per_rank = (vocab_size + tp - 1) // tp
        self.start = tp_rank() * self.per_rank
        # [per_rank, hidden]; rows past vocab_size (padding on the last rank) stay zero.
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        rows = loaded_shape(loaded)[0]
        if rows != self.vocab_size:
            raise ValueError(f"embedding has {rows} rows, config vocab_size is {self.vocab_size}")
        n = min(self.per_rank, self.vocab_size - self.start)
        copy_checked(param.data[:n], narrow_loaded(loaded, 0, self.start, n), "embedding")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        summed: torch.Tensor = all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))
        return summed


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h Wᵀ over this rank's vocabulary slice, gathered to the full vocabulary.
    Tied embeddings: the model points `weight` at the embedding's parameter."""

    cpu_weights: CpuWeights | None = None  # set by loader.prepare_for_cpu

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cpu_weights is not None:
            logits = self.cpu_weights.linear(hidden)  # [n, per_rank]
        else:
            logits = F.linear(hidden, self.weight)
        full: torch.Tensor = all_gather(logits, dim=-1)
        return full[:, : self.vocab_size]
