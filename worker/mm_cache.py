"""Vision-encoder outputs kept by image content hash, so an image seen again (in a new request
that is not a prefix hit, or after a retraction) is not encoded again.

Bounded by bytes, least recently used out first. An entry larger than the whole budget is
never kept. Entries are read-only tensors shared by every sequence that shows the image.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EmbeddingCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> torch.Tensor | None:
        emb = self._entries.get(key)
        if emb is not None:
            self._entries.move_to_end(key)
        return emb

    def put(self, key: bytes, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.capacity or key in self._entries:
            return
        while self.used + size > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self._entries[key] = emb
        self.used += size
