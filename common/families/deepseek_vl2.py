"""DeepSeek-VL2 checkpoints (`DeepseekVLV2ForCausalLM`, model_type `deepseek_vl_v2`): what the
launcher, the tokenizer's image processor and the worker read from config.json (and
processor_config.json), with the defaults of DeepSeek-VL2's own config classes for keys a
checkpoint omits (its hub configs list only the fields that differ). No torch.

config.json: `vision_config` (a SigLIP ViT in timm's layout: `width`, `layers`, `heads`,
`mlp_ratio`, `patch_size`, `image_size`), `projector_config` (`downsample_mlp_gelu`: 2x2
neighbouring patches concatenated, then an MLP), `language_config` (DeepSeek-V2 MoE, MLA or
MHA), `tile_tag` "2D", `global_view_pos`, `candidate_resolutions` ((width, height) pairs, as
DeepSeek-VL2's processor reads them). Anything the reference implementation would not run,
or Fovea does not, is a `DeepseekVL2ConfigError` with one line naming the key. Not read, as
DeepSeek-VL2's model does not read them either: vision `model_name` and `select_layer` (it
builds `layers` blocks from width / heads / mlp_ratio and takes the last, normed) and the
language model's `ep_size` (a training-time expert split).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from fovea.common.families import FamilyConfigError

ARCHITECTURE = "DeepseekVLV2ForCausalLM"
IMAGE_TOKEN = "<image>"
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")


class DeepseekVL2ConfigError(FamilyConfigError):
    pass


@dataclass(frozen=True)
class DeepseekV2TextConfig:
    """The language model (`language_config`), defaults as DeepSeek-VL2's DeepseekV2Config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP (the first `first_k_dense_replace` layers)
    num_layers: int
    num_heads: int
    num_kv_heads: int  # MHA only (MLA keys and values have one latent, expanded per head)
    use_mla: bool
    q_lora_rank: int | None  # MLA: None = one q_proj, else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_positions: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"type": "linear" | "yarn", "factor": ...}
    attention_bias: bool
    tie_word_embeddings: bool
    # MoE; n_routed_experts None = a dense model.
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int
    moe_intermediate_size: int
    topk_method: str
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    scoring_func: str
    first_k_dense_replace: int
    moe_layer_freq: int

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """The KV pool's head dim. MLA stores per-head K = [k_nope, k_rope] and V zero-padded to
        the larger of the two; MHA's head dim is hidden / heads (LlamaAttention's)."""
        if self.use_mla:
            return max(self.qk_head_dim, self.v_head_dim)
        return self.hidden_size // self.num_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default")))

    @staticmethod
    def from_hf(d: dict[str, Any]) -> DeepseekV2TextConfig:
        def opt_int(key: str, default: int | None) -> int | None:
            value = d.get(key, default)
            return None if value is None else int(value)

        heads = int(d.get("num_attention_heads", 32))
        n_routed = opt_int("n_routed_experts", None)
        cfg = DeepseekV2TextConfig(
            vocab_size=int(d.get("vocab_size", 102400)),
            hidden_size=int(d.get("hidden_size", 4096)),
            intermediate_size=int(d.get("intermediate_size", 11008)),
            num_layers=int(d.get("num_hidden_layers", 30)),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            use_mla=bool(d.get("use_mla", True)),
            q_lora_rank=opt_int("q_lora_rank", 1536),
            kv_lora_rank=int(d.get("kv_lora_rank", 512) or 0),
            qk_nope_head_dim=int(d.get("qk_nope_head_dim", 128) or 0),
            qk_rope_head_dim=int(d.get("qk_rope_head_dim", 64) or 0),
            v_head_dim=int(d.get("v_head_dim", 128) or 0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_positions=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=dict(d["rope_scaling"]) if d.get("rope_scaling") else None,
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            n_routed_experts=n_routed,
            n_shared_experts=opt_int("n_shared_experts", None),
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(d.get("moe_intermediate_size", 1407)),
            topk_method=str(d.get("topk_method", "gready")),  # sic: the reference's default
            n_group=int(d.get("n_group") or 1),
            topk_group=int(d.get("topk_group") or 1),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            scoring_func=str(d.get("scoring_func", "softmax")),
            first_k_dense_replace=int(d.get("first_k_dense_replace", 0)),
            moe_layer_freq=int(d.get("moe_layer_freq", 1)),
        )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise DeepseekVL2ConfigError(f"language hidden_act {act!r} is not supported (silu)")
        cfg._check()
        return cfg

    def _check(self) -> None:
        err = DeepseekVL2ConfigError
        if self.use_mla:
            if not (self.kv_lora_rank and self.qk_rope_head_dim and self.v_head_dim):
                raise err("use_mla needs kv_lora_rank, qk_rope_head_dim and v_head_dim")
            if self.qk_rope_head_dim % 2:
                raise err(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        elif self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise err("hidden_size must divide by num_attention_heads, and those by KV heads")
        rope = self.rope_type
        supported = ("default", "linear", "yarn") if self.use_mla else ("default", "linear")
        if rope not in supported:
            raise err(f"rope_scaling type {rope!r} is not supported here ({', '.join(supported)})")
        if rope != "default" and self.rope_scaling and "factor" not in self.rope_scaling:
            raise err("rope_scaling needs a factor")
        if self.n_routed_experts is None:
            return
        e, k = self.n_routed_experts, self.num_experts_per_tok
        if self.topk_method not in TOPK_METHODS:
            raise err(f"topk_method {self.topk_method!r} is not one of {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in SCORING_FUNCS:
            raise err(f"scoring_func {self.scoring_func!r} is not one of softmax, sigmoid")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise err("topk_method noaux_tc needs scoring_func sigmoid")
        if e % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise err(
                f"n_group {self.n_group} / topk_group {self.topk_group} do not fit {e} experts"
            )
        reachable = e if self.topk_method == "greedy" else self.topk_group * (e // self.n_group)
        if not 1 <= k <= reachable:
            raise err(f"num_experts_per_tok {k} is not in [1, {reachable}]")
        if self.topk_method == "noaux_tc" and e // self.n_group < 2:
            raise err("noaux_tc scores groups by their top 2 experts: groups need 2 or more")
        if self.moe_layer_freq < 1:
            raise err("moe_layer_freq must be at least 1")


@dataclass(frozen=True)
class DeepseekVL2Spec:
    """Vision tower, projector and tiling of a DeepSeek-VL2 config.json."""

    image_size: int  # one tile (the global view, every local tile), square
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_hidden: int  # int(width * mlp_ratio), as timm's Mlp
    candidate_resolutions: tuple[tuple[int, int], ...]  # (width, height), multiples of image_size
    downsample_ratio: int
    projector_depth: int
    projector_mlp_ratio: int
    n_embed: int
    global_view_pos: str  # "head": global view, separator, local tiles; "tail": reversed
    text: DeepseekV2TextConfig

    @property
    def tokens_per_side(self) -> int:
        """Tokens per tile side after the projector's downsampling (zero-padded to a multiple)."""
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def image_tokens(self, width_tiles: int, height_tiles: int) -> int:
        """Placeholders of one image: the global view with a newline per row, the separator,
        the local tiles as one grid with a newline per row."""
        h = w = self.tokens_per_side
        return h * (w + 1) + 1 + (height_tiles * h) * (width_tiles * w + 1)


def deepseek_vl2_spec(cfg: dict[str, Any]) -> DeepseekVL2Spec:
    """Parse config.json; DeepseekVL2ConfigError (one line) for what cannot be served."""
    err = DeepseekVL2ConfigError
    vision = cfg.get("vision_config") or {}
    proj = cfg.get("projector_config") or {}
    text = DeepseekV2TextConfig.from_hf(cfg.get("language_config") or {})
    tile_tag = cfg.get("tile_tag", "tile_tag")  # sic: the reference's default, which it refuses
    if tile_tag != "2D":
        raise err(f"tile_tag {tile_tag!r} is not supported (only '2D', as DeepSeek-VL2 ships)")
    view_pos = str(cfg.get("global_view_pos", "head"))
    if view_pos not in ("head", "tail"):
        raise err(f"global_view_pos {view_pos!r} is not 'head' or 'tail'")
    kind = proj.get("projector_type", "downsample_mlp_gelu")
    if kind != "downsample_mlp_gelu" or proj.get("token_pooling"):
        raise err(f"projector_type {kind!r} is not supported (only downsample_mlp_gelu)")
    width = int(vision.get("width", 1024))
    spec = DeepseekVL2Spec(
        image_size=int(vision.get("image_size", 384)),
        patch_size=int(vision.get("patch_size", 16)),
        width=width,
        layers=int(vision.get("layers", 24)),
        heads=int(vision.get("heads", 16)),
        mlp_hidden=int(width * float(vision.get("mlp_ratio", 4))),
        candidate_resolutions=tuple(
            (int(w), int(h)) for w, h in cfg.get("candidate_resolutions", [[384, 384]])
        ),
        downsample_ratio=int(proj.get("downsample_ratio", 2)),
        projector_depth=int(proj.get("depth", 2)),
        projector_mlp_ratio=int(proj.get("mlp_ratio", 1)),
        n_embed=int(proj.get("n_embed", 2048)),
        global_view_pos=view_pos,
        text=text,
    )
    input_dim = int(proj.get("input_dim", 1152))
    if input_dim != width:
        raise err(f"projector input_dim {input_dim} is not the vision width {width}")
    if spec.n_embed != text.hidden_size:
        raise err(f"projector n_embed {spec.n_embed} is not the language hidden size")
    if width % spec.heads or spec.projector_depth < 1:
        raise err("vision width must divide by heads, and the projector depth be at least 1")
    if spec.image_size % spec.patch_size:
        raise err(f"image_size {spec.image_size} is not a multiple of patch_size")
    s = spec.image_size
    if not spec.candidate_resolutions or any(
        w % s or h % s or not w or not h for w, h in spec.candidate_resolutions
    ):
        raise err(f"candidate_resolutions must be non-empty multiples of image_size {s}")
    return spec


def added_token_id(model_dir: str, content: str) -> int | None:
    """The id of the tokenizer's added token `content` (tokenizer.json, else
    tokenizer_config.json), or None."""
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for tok in json.load(f).get("added_tokens", []):
                if tok.get("content") == content:
                    return int(tok["id"])
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for tid, tok in (json.load(f).get("added_tokens_decoder") or {}).items():
                if tok.get("content") == content:
                    return int(tid)
    return None


@dataclass(frozen=True)
class ProcessorSettings:
    """processor_config.json (DeepseekVLV2Processor's arguments); config.json's values where it
    is absent. The processor's tile is its first candidate resolution's width, as there."""

    candidate_resolutions: tuple[tuple[int, int], ...]  # (width, height)
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    normalize: bool
    image_token_id: int


def processor_settings(model_dir: str, spec: DeepseekVL2Spec) -> ProcessorSettings:
    """DeepseekVL2ConfigError (one line) when the processor's tiles or token grid disagree
    with the model's, or the tokenizer lacks the image token."""
    path = os.path.join(model_dir, "processor_config.json")
    pp: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            pp = json.load(f)
    resolutions = tuple((int(w), int(h)) for w, h in pp.get("candidate_resolutions") or [])
    resolutions = resolutions or spec.candidate_resolutions
    tile = resolutions[0][0]
    patch = int(pp.get("patch_size", spec.patch_size))
    ratio = int(pp.get("downsample_ratio", spec.downsample_ratio))
    if tile != spec.image_size or math.ceil((tile // patch) / ratio) != spec.tokens_per_side:
        raise DeepseekVL2ConfigError(
            f"processor_config.json's {tile}-pixel tiles of {patch}-pixel patches (downsampled "
            f"{ratio}x) do not fit the model's {spec.image_size}-pixel tiles of "
            f"{spec.tokens_per_side}x{spec.tokens_per_side} tokens"
        )
    if any(w % tile or h % tile or not w or not h for w, h in resolutions):
        raise DeepseekVL2ConfigError(f"candidate_resolutions must be multiples of {tile}")
    token = str(pp.get("image_token", IMAGE_TOKEN))
    token_id = added_token_id(model_dir, token)
    if token_id is None:
        raise DeepseekVL2ConfigError(f"the tokenizer has no {token} token")
    mean = tuple(float(x) for x in pp.get("image_mean", (0.5, 0.5, 0.5)))
    std = tuple(float(x) for x in pp.get("image_std", (0.5, 0.5, 0.5)))
    if len(mean) != 3 or len(std) != 3:
        raise DeepseekVL2ConfigError("image_mean and image_std need 3 values")
    return ProcessorSettings(resolutions, mean, std, bool(pp.get("normalize", True)), token_id)


def check_deepseek_vl2(model_dir: str, cfg: dict[str, Any]) -> None:
    """Raise DeepseekVL2ConfigError (one line) if a DeepSeek-VL2 directory cannot be served."""
    if (cfg.get("architectures") or [""])[0] == ARCHITECTURE:
        processor_settings(model_dir, deepseek_vl2_spec(cfg))
