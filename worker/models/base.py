"""The worker's model contract, as Protocols, and the base class every model class builds on.

The runner (worker/model_runner.py), the loader and the cross-attention state type a model
as one of these, and test for a capability with isinstance (runtime-checkable): a model
class names the capabilities it has among its bases, so mypy checks it implements them, and
the architecture table (common/architectures.py) states the same capabilities for the
processes that never import torch (tests/test_architectures.py checks both agree).

- `CausalLM`: every model. forward(input_ids [T], positions [T] or [3, T], attn,
  input_embeds [T, hidden] | None) -> final hidden states [T, hidden]; compute_logits
  [n, hidden] -> float32 [n, vocab]; the KV pool's geometry on this rank (num_heads,
  num_kv_heads, config.num_layers / head_dim) and what the pool holds per token
  (kv_layout: K/V rows, or an MLA model's latent); optional attention_scale and layer_windows
  for the attention backend.
- `EncodesImages`: encode_images(images) -> [num_tokens, hidden] each, and embed_tokens(ids),
  whose placeholder rows the runner replaces by those embeddings.
- `MRopePositions`: mrope_positions(prompt_ids, images) -> ([3, L] int64, delta).
- `CrossAttentionImages`: images enter through cross-attention layers instead (Mllama):
  their K/V (cross_kv) live in the runner's image pool and forward takes `cross`.
- `DeclaresWeightNames`: how checkpoint names become parameter names (worker/loader.py).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from fovea.common.messages import ImageInput
from fovea.worker.attention.base import AttentionBackend
from fovea.worker.distributed import tp_size
from fovea.worker.kv_pool import KVLayout
from fovea.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding

if TYPE_CHECKING:
    from fovea.worker.cross_attention import CrossBatch


class ModelGeometry(Protocol):
    """The fields of a model's `config` that the runner and the loader read."""

    @property
    def num_layers(self) -> int: ...  # layers that take token KV slots

    @property
    def head_dim(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tie_word_embeddings(self) -> bool: ...


@runtime_checkable
class DeclaresWeightNames(Protocol):
    """First matching (checkpoint prefix, parameter prefix) renames, then (fused parameter,
    checkpoint name, shard id) stacks; tensors whose names end in a skip suffix are ignored."""

    @property
    def checkpoint_prefixes(self) -> Sequence[tuple[str, str]]: ...

    @property
    def stacked_params_mapping(self) -> Sequence[tuple[str, str, Any]]: ...

    @property
    def skip_weight_suffixes(self) -> tuple[str, ...]: ...


@runtime_checkable
class CausalLM(Protocol):
    config: ModelGeometry
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (replicated when tp_size > num_kv_heads)
    attention_scale: float | None  # the score scale; None: head_dim ** -0.5
    layer_windows: list[int] | None  # per-layer sliding window, 0 = global; None: all global

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def kv_layout(self, *, mla_latent: bool = True) -> KVLayout: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@runtime_checkable
class EncodesImages(Protocol):
    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]: ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...


# A vision tower run a piece at a time: each `next()` computes one piece (a block over every
# patch) and yields how many patch rows it computed; the generator's return value is the output.
EncoderStages = Generator[int, None, torch.Tensor]
R = TypeVar("R")


def run_stages(stages: Generator[int, None, R]) -> R:
    """Every stage at once: the result of the whole computation."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


@runtime_checkable
class EncodesInStages(Protocol):
    """An image encoder that can stop between blocks (worker/encode_ahead.py)."""

    def encode_stages(
        self, images: list[ImageInput]
    ) -> Generator[int, None, list[torch.Tensor]]: ...


@runtime_checkable
class MRopePositions(Protocol):
    def mrope_positions(
        self, prompt_ids: list[int], images: list[ImageInput]
    ) -> tuple[torch.Tensor, int]: ...


class CrossImageGeometry(Protocol):
    @property
    def max_tiles(self) -> int: ...

    @property
    def tokens_per_image(self) -> int: ...  # vision states per image (all tile slots)


@runtime_checkable
class CrossAttentionImages(CausalLM, EncodesImages, Protocol):
    geometry: CrossImageGeometry

    @property
    def num_cross_layers(self) -> int: ...

    def cross_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [n, tokens, hidden] -> k, v [cross layers, n, tokens, kv_heads, head_dim]."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
        cross: CrossBatch | None = None,
    ) -> torch.Tensor: ...


class Decoder(Protocol):
    """A model's `model` submodule: token embeddings, then the layers and final norm."""

    @property
    def embed_tokens(self) -> VocabParallelEmbedding: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class CausalLMBase(nn.Module, CausalLM, DeclaresWeightNames):
    """What every model class shares: the decoder `model`, the LM head, the per-rank KV
    geometry, forward delegating to the decoder, and float32 logits. Subclasses set config,
    model (annotating their decoder's class) and call make_lm_head and set_kv_geometry."""

    config: ModelGeometry
    model: Decoder
    lm_head: ParallelLMHead
    num_heads: int
    num_kv_heads: int
    attention_scale: float | None = None
    layer_windows: list[int] | None = None
    checkpoint_prefixes: Sequence[tuple[str, str]] = ()
    stacked_params_mapping: Sequence[tuple[str, str, Any]] = ()
    skip_weight_suffixes: tuple[str, ...] = ()

    def make_lm_head(self, vocab_size: int, hidden_size: int, tied: bool) -> None:
        """The LM head after the decoder; tied: it is the input embedding."""
        self.lm_head = ParallelLMHead(vocab_size, hidden_size)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_kv_geometry(self, num_heads: int, num_kv_heads: int) -> None:
        """The KV pool's geometry on this rank: heads split across ranks; KV heads too, or
        one replicated per rank when tp_size > num_kv_heads."""
        self.num_heads = num_heads // tp_size()
        self.num_kv_heads = max(1, num_kv_heads // tp_size())

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [T], positions [T] (or [3, T] for M-RoPE), optional input_embeds
        [T, hidden] used instead of the token embeddings -> final hidden states [T, hidden]."""
        out: torch.Tensor = self.model(input_ids, positions, attn, input_embeds)
        return out

    def kv_layout(self, *, mla_latent: bool = True) -> KVLayout:
        """What the KV pool holds per token on this rank: K and V rows of num_kv_heads x
        head_dim. mla_latent: an MLA model keeps its latent instead (deepseek_v2.py); others
        ignore it."""
        return KVLayout("kv", self.config.num_layers, self.num_kv_heads, self.config.head_dim)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits.float()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden]: the decoder's token embeddings (image placeholder rows are
        replaced by the images' embeddings)."""
        emb: torch.Tensor = self.model.embed_tokens(ids)
        return emb
