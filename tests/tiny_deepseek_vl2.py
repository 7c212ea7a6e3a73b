"""Tiny random DeepSeek-VL2 checkpoints, built from transformers' own classes and saved in
DeepSeek-VL2's published layout (config.json with language/vision/projector configs,
processor_config.json, `vision.*` in timm names, `language.*`, `projector.*`,
`image_newline`, `view_seperator`), plus the same weights in transformers' layout for the
reference (deepseek_vl2_reference.py) beside the model directory.

Variants: "mla" (like -small / the full model: MLA with q_lora_rank None, here with yarn rope
so its mscale paths run) and "mha" (like -tiny: use_mla false, MLA dims 0 / null; here GQA).
Both: 3 layers (layer 0 dense, 1-2 MoE: 4 routed experts, top-2, 1 shared), a 2-layer SigLIP
of width 64 on 70-pixel tiles (5x5 patches of 14, zero-padded to 6x6 and downsampled 2x2 ->
3x3 tokens per tile), tiles up to 3 across or 2x2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tiny_models import _CORPUS

SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>", "<|ref|>",
    "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>",
]  # fmt: skip
BOS, EOS, PAD, IMAGE = 0, 1, 2, 3
TILE = 70
CANDIDATES = [[70, 70], [70, 140], [140, 70], [140, 140], [70, 210], [210, 70]]
YARN = {"factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.7}  # fmt: skip


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[BOS], eos_token=SPECIAL_TOKENS[EOS],
        pad_token=SPECIAL_TOKENS[PAD], unk_token=None,
    )  # fmt: skip
    fast.save_pretrained(str(out))


def hf_language_config(variant: str) -> dict[str, Any]:
    """transformers' DeepseekV2Config kwargs. The MHA variant's attention is swapped for
    LlamaAttention afterwards (deepseek_vl2_reference.py), so its MLA dims only build."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if variant == "mla":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, **YARN}
    return dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.5 if variant == "mla" else 1.0, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_parameters=rope, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, tie_word_embeddings=False,
    )  # fmt: skip


def llama_attention_config(variant: str) -> dict[str, Any]:
    """The MHA variant's LlamaConfig kwargs (DeepSeek-VL2 builds LlamaAttention from its
    DeepseekV2Config: head_dim hidden / heads, rope_theta)."""
    assert variant == "mha"
    return dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, rope_theta=10000.0, attention_bias=False,
    )  # fmt: skip


def deepseek_config(variant: str) -> dict[str, Any]:
    """config.json as DeepSeek-VL2 publishes it (language_config in its own key names)."""
    hf = hf_language_config(variant)
    lang = {k: v for k, v in hf.items() if k not in ("rope_parameters", "tie_word_embeddings")}
    lang.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                rope_theta=10000.0, torch_dtype="float32")  # fmt: skip
    if variant == "mla":
        lang["rope_scaling"] = {"type": "yarn", **YARN}
    else:  # -tiny's: MHA, the MLA fields zero / null
        lang.update(use_mla=False, num_key_value_heads=2, kv_lora_rank=None,
                    qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)  # fmt: skip
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "candidate_resolutions": CANDIDATES,
        "global_view_pos": "head",
        "tile_tag": "2D",
        "language_config": lang,
        "projector_config": {
            "model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
            "input_dim": 64, "n_embed": 64, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2,
        },
        "vision_config": {
            "model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": TILE,
            "patch_size": 14, "width": 64, "layers": 2, "heads": 4, "mlp_ratio": 1.5,
            "global_pool": "map", "ignore_head": True, "class_token": False,
        },
        "torch_dtype": "float32",
    }  # fmt: skip


def to_deepseek_names(vision: dict[str, Any], language: dict[str, Any]) -> dict[str, Any]:
    """transformers' SiglipVisionModel / DeepseekV2ForCausalLM state dicts -> DeepSeek-VL2's
    checkpoint names: timm's ViT (fused qkv rows q;k;v, pos_embed [1, P, D]) and one tensor
    per expert and projection."""
    import torch

    out: dict[str, Any] = {}
    vision = {k.removeprefix("vision_model."): v for k, v in vision.items()}
    for name, t in vision.items():
        if name == "embeddings.position_embedding.weight":
            out["vision.pos_embed"] = t[None]
        elif name.startswith("embeddings.patch_embedding."):
            out["vision.patch_embed.proj." + name.rsplit(".", 1)[1]] = t
        elif name.startswith("post_layernorm."):
            out["vision.norm." + name.rsplit(".", 1)[1]] = t
        elif ".self_attn.q_proj." in name:
            i, kind = name.split(".")[2], name.rsplit(".", 1)[1]
            parts = [vision[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"vision.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            new = name.replace("encoder.layers.", "blocks.").replace(
                "self_attn.out_proj", "attn.proj"
            )
            out["vision." + new.replace("layer_norm", "norm")] = t
    gen = torch.Generator().manual_seed(7)
    for name, shape in [("latent", (1, 1, 64)), ("q.weight", (64, 64)), ("q.bias", (64,)),
                        ("kv.weight", (128, 64)), ("kv.bias", (128,)), ("proj.weight", (64, 64)),
                        ("proj.bias", (64,)), ("norm.weight", (64,)), ("norm.bias", (64,)),
                        ("mlp.fc1.weight", (96, 64)), ("mlp.fc1.bias", (96,)),
                        ("mlp.fc2.weight", (64, 96)), ("mlp.fc2.bias", (64,))]:  # fmt: skip
        out[f"vision.attn_pool.{name}"] = torch.randn(shape, generator=gen)  # unused head
    for name, t in language.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]: gate rows, then up rows
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                base = f"language.{name.removesuffix('gate_up_proj')}{e}."
                out[base + "gate_proj.weight"] = gate[e].contiguous()
                out[base + "up_proj.weight"] = up[e].contiguous()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            for e in range(t.shape[0]):
                out[f"language.{name.removesuffix('down_proj')}{e}.down_proj.weight"] = t[e]
        else:
            out["language." + name] = t
    return {k: v.contiguous() for k, v in out.items()}


def make_tiny_deepseek_vl2(out_dir: str | os.PathLike[str], variant: str, seed: int = 0) -> Path:
    """Returns the model directory (out_dir/model); the reference's files go in
    out_dir/reference."""
    import torch
    from deepseek_vl2_reference import build_language_model
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    root = Path(out_dir)
    model_dir, ref_dir = root / "model", root / "reference"
    model_dir.mkdir(parents=True, exist_ok=True)
    ref_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(model_dir)
    torch.manual_seed(seed)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=TILE, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False,
        )
    )  # fmt: skip
    language = build_language_model(variant)
    extra = {  # projector (depth 2: layers.0, GELU, layers.2) and the two layout embeddings
        "projector.layers.0.weight": torch.empty(64, 64 * 4), "projector.layers.0.bias": torch.empty(64),
        "projector.layers.2.weight": torch.empty(64, 64), "projector.layers.2.bias": torch.empty(64),
        "image_newline": torch.empty(64), "view_seperator": torch.empty(64),
    }  # fmt: skip
    with torch.no_grad():
        for p in [*vision.parameters(), *language.parameters(), *extra.values()]:
            p.normal_(0.0, 0.2)
        for name, p in [*vision.named_parameters(), *language.named_parameters()]:
            if "norm" in name and name.endswith("weight"):  # scales near 1, as trained ones
                p.add_(1.0)
    v_state, l_state = vision.state_dict(), language.state_dict()
    weights = {**to_deepseek_names(v_state, l_state), **extra}
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(deepseek_config(variant), indent=2))
    processor = {
        "candidate_resolutions": CANDIDATES, "patch_size": 14, "downsample_ratio": 2,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "normalize": True,
        "image_token": "<image>", "pad_token": SPECIAL_TOKENS[PAD], "add_special_token": False,
        "sft_format": "deepseek", "mask_prompt": True, "ignore_id": -100,
        "processor_class": "DeepseekVLV2Processor",
    }  # fmt: skip
    (model_dir / "processor_config.json").write_text(json.dumps(processor, indent=2))
    vision.save_pretrained(str(ref_dir / "vision"))
    save_file(
        {k: v.contiguous() for k, v in l_state.items()}, str(ref_dir / "language.safetensors")
    )
    (ref_dir / "variant").write_text(variant)
    return model_dir
