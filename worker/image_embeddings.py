"""The vision encoder's outputs for the image rows a step computes (models with
`EncodesImages` whose images replace placeholder token embeddings; cross-attention models keep
theirs in worker/cross_attention.py).

An output comes from the images encoded ahead of their prefill (worker/encode_ahead.py), else
from the embedding cache (by image hash), else from one encoder call over the step's images
that have none. Every output is checked against its image's placeholder count.
"""

from __future__ import annotations

import torch

from fovea.common.messages import ImageInput
from fovea.worker.encode_ahead import EncoderQueue, checked
from fovea.worker.mm_cache import EmbeddingCache
from fovea.worker.models.base import EncodesImages

# (image, first embedding row used, batch row it goes to, rows) per image overlap of a step
Overlap = tuple[ImageInput, int, int, int]


class ImageEmbeddings:
    def __init__(self, encoder: EncodesImages, cache: EmbeddingCache, slice_patches: int) -> None:
        """slice_patches: the encode-ahead slice (0: images are encoded in their prefill)."""
        self.encoder = encoder
        self.cache = cache
        self.ahead = EncoderQueue(encoder, cache, slice_patches) if slice_patches else None
        self.encoded_in_step = 0

    @property
    def encoded(self) -> int:
        """Vision-encoder runs, one per image, ahead or in a step."""
        return self.encoded_in_step + (self.ahead.encoded if self.ahead is not None else 0)

    def merge(self, ids: torch.Tensor, overlaps: list[Overlap]) -> torch.Tensor:
        """Token embeddings [T, hidden] with each image's placeholder rows replaced by that
        image's embedding rows (only the rows this step computes)."""
        embeds = self.encoder.embed_tokens(ids)
        by_hash = self._by_hash([img for img, *_ in overlaps])
        for img, first, at, n in overlaps:
            embeds[at : at + n] = by_hash[img.hash][first : first + n].to(embeds.dtype)
        return embeds

    def _by_hash(self, images: list[ImageInput]) -> dict[bytes, torch.Tensor]:
        """Embeddings [num_tokens, hidden] of every image by hash: encoded ahead, cached, or
        from one encoder call over the images that have neither."""
        found: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, ImageInput] = {}
        for img in images:
            emb = self.cache.get(img.hash)
            if self.ahead is not None and (held := self.ahead.take(img.hash)) is not None:
                emb = held if emb is None else emb
            if emb is not None:
                found[img.hash] = emb
            elif img.hash not in todo:
                todo[img.hash] = img
        if todo:
            outs = self.encoder.encode_images(list(todo.values()))
            self.encoded_in_step += len(todo)
            for (h, img), emb in zip(todo.items(), outs, strict=True):
                found[h] = checked(img, emb)
                self.cache.put(h, emb)
        return found
