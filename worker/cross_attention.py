"""Cross-attention image state for models that read images through cross-attention layers
(Mllama): a pool of image slots, the per-sequence bookkeeping, and each step's plan.

Pool: one slot holds one image's K/V for every cross-attention layer, k and v each
[cross_layers, slots, tokens_per_image, kv_heads, head_dim]; it is not the token KV pool.
Capacity is fixed at start-up (`plan_image_slots`) and reported to the scheduler, which owns
the slot ids (scheduler/cross_images.py): each NewSequence names its images' slots, one slot
per distinct image hash, shared by every running sequence with that image.

K/V of a slot are computed when a sequence names it for an image the slot does not hold yet
(`slot_image`), once however many sequences of the step name it, from the vision states kept
by image hash in the runner's EmbeddingCache (two projections per cross layer; the vision
encoder runs only for images the cache lacks). A slot keeps its K/V after its last user is
dropped, so a later sequence given the same slot for the same image (a re-admission after a
retraction, a prefix hit, a new request) reuses them. `users` counts each slot's references
by the sequences held here: a sequence naming a slot in use for another image is the
scheduler's error, raised at once rather than computed wrong.

Which images a token attends to (transformers' `get_cross_attention_token_mask`): image k
is seen by tokens from its `<|image|>` up to the next image's token (the last image's range,
and that of images right before it with no text between, runs to the end: generated tokens
see what the last prompt token sees), over its real tiles only. A token before the first
image has no image: transformers then lets it attend to every key of every image (its mask
row is all zero after `full_text_row_masked_out_mask`) and zeroes only the layer's MLP
output; `CrossBatch.row_mask` carries that zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fovea.common.messages import ImageInput
from fovea.worker.attention.base import ChunkLayout
from fovea.worker.kv_pool import kv_budget_bytes
from fovea.worker.mm_cache import EmbeddingCache

if TYPE_CHECKING:
    from fovea.worker.models.base import CrossAttentionImages

log = logging.getLogger(__name__)

CROSS_SHARE = 0.25  # most of the KV memory budget the image pool may take
NO_END = 1 << 62  # an image range that runs to the end of the sequence


def image_ranges(offsets: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) token positions that attend to each image, from the images' token offsets
    (transformers' get_cross_attention_token_mask, with NO_END for the end)."""
    ranges = [[lo, hi] for lo, hi in zip(offsets, [*offsets[1:], NO_END], strict=True)]
    end = NO_END
    for r in reversed(ranges):  # an image right before the next one shares its range
        if r[0] == r[1] - 1:
            r[1] = end
        end = r[1]
    return [(lo, hi) for lo, hi in ranges]


def plan_image_slots(
    *, device: torch.device, bytes_per_image: int, weight_bytes: int, cap: int,
    mem_fraction: float | None,
) -> int:  # fmt: skip
    """Image slots: at most `cap`, within CROSS_SHARE of the memory budget left after the
    weights. Raises if not even one image fits."""
    budget = kv_budget_bytes(device, weight_bytes, mem_fraction)
    slots = min(cap, int(CROSS_SHARE * max(budget, 0)) // bytes_per_image)
    if slots < 1:
        raise RuntimeError(
            f"no memory for one image's cross-attention state ({bytes_per_image} bytes; budget "
            f"{budget} bytes after {weight_bytes} bytes of weights); raise --mem-fraction-static"
        )
    return slots


class ImageSlotPool:
    """k, v [cross_layers, slots, tokens_per_image, kv_heads, head_dim]; slot ids come from
    the scheduler."""

    def __init__(
        self, *, layers: int, slots: int, tokens: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:  # fmt: skip
        shape = (layers, slots, tokens, kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # Batched decode pads with slot 0 and masks it: keep it finite (a masked NaN key or
        # value still poisons the row), whether or not an image was ever written there.
        self.k[:, 0].zero_()
        self.v[:, 0].zero_()
        self.capacity = slots

    @staticmethod
    def bytes_per_image(
        layers: int, tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * layers * tokens * kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class _SeqImages:
    images: list[ImageInput]
    slots: list[int]
    ranges: list[tuple[int, int]]  # positions attending to each image (image_ranges)
    real_tiles: torch.Tensor  # [n_images, max_tiles] bool (CPU): the image's own tiles


@dataclass
class _Segment:
    """Cross rows that attend in one call: a prefill chunk (one sequence, q_len rows), or
    every decode row of the step (one per sequence, images padded to the most any has)."""

    rows: slice | torch.Tensor  # positions among the step's cross rows
    decode: bool
    slots: torch.Tensor  # [B, n_images] image slots (padding: slot 0, masked)
    mask: torch.Tensor | None  # [B, 1, q_len, n_images * tokens] bool; None: every key


class CrossBatch:
    """A step's cross-attention plan, shared by every cross-attention layer."""

    def __init__(
        self, pool: ImageSlotPool, rows: torch.Tensor | None, row_mask: torch.Tensor,
        segments: list[_Segment],
    ) -> None:  # fmt: skip
        self.pool = pool
        self.rows = rows  # [R] batch rows of sequences with images; None: all rows
        self.row_mask = row_mask  # [R, 1]: 0.0 before the sequence's first image, else 1.0
        self.segments = segments

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [R, heads, head_dim] (normed) -> [R, heads * head_dim] over each row's images."""
        k_all, v_all = self.pool.k[layer], self.pool.v[layer]  # [slots, tokens, kv, hd]
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for s in self.segments:
            k = k_all[s.slots].flatten(1, 2).transpose(1, 2)  # [B, kv, n_images * tokens, hd]
            v = v_all[s.slots].flatten(1, 2).transpose(1, 2)
            qs = q[s.rows]  # decode [B, H, hd]; prefill [q_len, H, hd]
            qs = qs.unsqueeze(2) if s.decode else qs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, k, v, attn_mask=s.mask, enable_gqa=qs.shape[1] != k.shape[1]
            )  # [B, H, q_len, hd]
            out[s.rows] = o[:, :, 0].flatten(1) if s.decode else o[0].transpose(0, 1).flatten(1)
        return out


class CrossAttentionState:
    """The runner's cross-attention side: slots per sequence, each slot's K/V filled when it
    is first named for an image, one `CrossBatch` per step."""

    def __init__(
        self, model: CrossAttentionImages, pool: ImageSlotPool, mm_cache: EmbeddingCache
    ) -> None:
        self.model = model
        self.pool = pool
        self.mm_cache = mm_cache
        self.tokens = pool.k.shape[2]  # keys per image: max_tiles x patches per tile
        self.max_tiles = model.geometry.max_tiles
        self.seqs: dict[str, _SeqImages] = {}
        n = pool.capacity
        self.slot_image: list[bytes | None] = [None] * n  # whose K/V each slot holds
        self.users = [0] * n  # references by the sequences in `seqs`
        self.pending: dict[int, ImageInput] = {}  # slots to fill before the next forward
        self.kv_computed = 0  # slots filled since start: one per (slot, image) first named

    @staticmethod
    def create(
        model: CrossAttentionImages, *, device: torch.device, dtype: torch.dtype, weight_bytes: int,
        cap: int, mem_fraction: float | None, mm_cache: EmbeddingCache,
    ) -> CrossAttentionState:  # fmt: skip
        tokens = model.geometry.tokens_per_image
        layers, kv_heads, head_dim = (
            model.num_cross_layers,
            model.num_kv_heads,
            model.config.head_dim,
        )
        per_image = ImageSlotPool.bytes_per_image(layers, tokens, kv_heads, head_dim, dtype)
        slots = plan_image_slots(
            device=device, bytes_per_image=per_image, weight_bytes=weight_bytes, cap=cap,
            mem_fraction=mem_fraction,
        )  # fmt: skip
        log.info(
            "cross-attention image pool: %d image slots of %d tokens x %d layers (%.2f MiB each)",
            slots, tokens, layers, per_image / 2**20,
        )  # fmt: skip
        pool = ImageSlotPool(
            layers=layers, slots=slots, tokens=tokens, kv_heads=kv_heads, head_dim=head_dim,
            dtype=dtype, device=device,
        )  # fmt: skip
        return CrossAttentionState(model, pool, mm_cache)

    @property
    def free_slots(self) -> int:
        """Slots no sequence held here references."""
        return self.users.count(0)

    def admit(self, key: str, images: list[ImageInput], slots: list[int]) -> None:
        """Sequence `key` reads `images` from `slots` (the scheduler's, one per image)."""
        if len(slots) != len(images) or not all(0 <= s < self.pool.capacity for s in slots):
            raise RuntimeError(
                f"{key}: image slots {slots} for {len(images)} images in a pool of "
                f"{self.pool.capacity}"
            )
        for img, slot in zip(images, slots, strict=True):
            held = self.pending[slot].hash if slot in self.pending else self.slot_image[slot]
            if held != img.hash:
                if self.users[slot]:
                    raise RuntimeError(f"{key}: image slot {slot} is in use for another image")
                self.pending[slot] = img
                self.slot_image[slot] = None  # until written
        if images:
            tiles = torch.tensor([img.grid[1] for img in images])
            real = torch.arange(self.max_tiles)[None, :] < tiles[:, None]
            ranges = image_ranges([img.offset for img in images])
            self.seqs[key] = _SeqImages(images, list(slots), ranges, real)
            for slot in slots:
                self.users[slot] += 1

    def drop(self, key: str) -> None:
        """Forget `key`; its slots keep their K/V for a later user of the same image."""
        seq = self.seqs.pop(key, None)
        if seq is not None:
            for slot in seq.slots:
                self.users[slot] -= 1

    def fill_pending(self) -> int:
        """Write the K/V of the slots named for a new image since the last step, each once.
        Returns the number of vision-encoder runs (images not in the embedding cache), all in
        one tower call."""
        if not self.pending:
            return 0
        states: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, ImageInput] = {}
        for img in self.pending.values():
            cached = self.mm_cache.get(img.hash)
            if cached is not None:
                states[img.hash] = cached
            elif img.hash not in todo:
                todo[img.hash] = img
        if todo:
            for h, out in zip(todo, self.model.encode_images(list(todo.values())), strict=True):
                if out.shape[0] != self.tokens:
                    raise RuntimeError(f"vision states of {out.shape[0]} tokens, not {self.tokens}")
                states[h] = out
                self.mm_cache.put(h, out)
        slots = list(self.pending)
        k, v = self.model.cross_kv(torch.stack([states[self.pending[s].hash] for s in slots]))
        index = torch.tensor(slots, device=k.device)
        self.pool.k.index_copy_(1, index, k.to(self.pool.k.dtype))
        self.pool.v.index_copy_(1, index, v.to(self.pool.v.dtype))
        for s in slots:
            self.slot_image[s] = self.pending[s].hash
        self.kv_computed += len(slots)
        self.pending.clear()
        return len(todo)

    def plan(
        self, keys: list[str], layouts: list[ChunkLayout], num_tokens: int
    ) -> CrossBatch | None:
        """The step's plan for chunks `keys` laid out as `layouts` over `num_tokens` rows;
        None when no chunk's sequence has images (the cross layers are then skipped). Masks
        are built on the CPU and moved once."""
        device = self.pool.k.device
        rows: list[torch.Tensor] = []
        row_masks: list[torch.Tensor] = []
        segments: list[_Segment] = []
        decodes: list[tuple[int, list[int], torch.Tensor]] = []  # (row, slots, keys seen)
        count = 0
        for key, c in zip(keys, layouts, strict=True):
            seq = self.seqs.get(key)
            if seq is None:
                continue
            allowed, has_image = self._keys_seen(seq, c.prefix_len, c.q_len)
            if c.q_len == 1:
                decodes.append((count, seq.slots, allowed[0]))
            else:
                mask = None if bool(allowed.all()) else allowed[None, None].to(device)
                slots = torch.tensor([seq.slots], device=device)
                segments.append(_Segment(slice(count, count + c.q_len), False, slots, mask))
            rows.append(torch.arange(c.start, c.start + c.q_len))
            row_masks.append(has_image)
            count += c.q_len
        if decodes:
            segments.append(self._decode_segment(decodes))
        if not segments:
            return None
        row_mask = torch.cat(row_masks).to(device, self.pool.k.dtype)[:, None]
        all_rows = None if count == num_tokens else torch.cat(rows).to(device)
        return CrossBatch(self.pool, all_rows, row_mask, segments)

    def _keys_seen(self, seq: _SeqImages, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions [start, start + n): which keys each sees, [n, images * tokens] bool,
        and whether it sees any image, [n] bool (False: before the first image, where
        transformers attends to every key)."""
        pos = torch.arange(start, start + n)[:, None]
        lo = torch.tensor([r[0] for r in seq.ranges])
        hi = torch.tensor([r[1] for r in seq.ranges])
        sees = (pos >= lo) & (pos < hi)  # [n, images]
        has_image = sees.any(dim=1)
        tiles = (sees[:, :, None] & seq.real_tiles[None]) | ~has_image[:, None, None]
        per_tile = self.tokens // self.max_tiles
        return tiles.repeat_interleave(per_tile, dim=2).flatten(1), has_image

    def _decode_segment(self, decodes: list[tuple[int, list[int], torch.Tensor]]) -> _Segment:
        """Every decode row in one call: images padded to the most any sequence has (slot 0,
        its keys masked)."""
        most = max(len(slots) for _, slots, _ in decodes)
        slots = torch.zeros(len(decodes), most, dtype=torch.int64)
        mask = torch.zeros(len(decodes), most * self.tokens, dtype=torch.bool)
        for b, (_, own, seen) in enumerate(decodes):
            slots[b, : len(own)] = torch.tensor(own)
            mask[b, : seen.shape[0]] = seen
        device = self.pool.k.device
        rows = torch.tensor([row for row, _, _ in decodes], device=device)
        return _Segment(rows, True, slots.to(device), mask[:, None, None].to(device))
