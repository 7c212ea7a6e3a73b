"""Random-weight checkpoints with the shapes of real VLMs, for benchmarks: Qwen2.5-VL-3B's vision
tower on a Qwen2.5-0.5B-shaped LM, and gemma-3-4b-it's SigLIP on gemma-3-270m's text stack.

Written with transformers' own classes, so that compute and memory match the real models; text
is noise (benchmarks run with ignore_eos).

- `qwen2_5_vl`: the vision tower of Qwen2.5-VL-3B-Instruct as published (32 blocks of width
  1280, window attention but in blocks 7/15/23/31, a merger onto the LM's width) with a
  language model of Qwen2.5-0.5B-Instruct's shape (24 layers of 896; M-RoPE sections halved
  from Qwen2.5-VL's [16, 24, 24] to [8, 12, 12] for its head_dim of 64).
- `gemma3`: gemma-3-4b-it's SigLIP tower (27 layers of 1152 on 896x896 images, no pooling head)
  and projector (256 tokens per image) with gemma-3-270m's text stack (18 layers of 640, five
  local layers of window 512 to one global) over gemma-3-4b-it's vocabulary.

The numbers and their sources are in bench/README.md. Weights take transformers' own
initialisation (normal, std = initializer_range 0.02; norms at their identity), except Gemma 3's
projection, which starts at zero there and is drawn here so that images reach the decoder.

The tokenizer is a byte-level BPE built without training: 256 byte tokens, then merges of a
fixed alphabet (pairs, then triples, ...) until, with the family's added tokens at the ids the
real tokenizer gives them, every id in [0, vocab) is a token: random weights emit any id and a
server must detokenize each. The image processors are the PIL ones (no torchvision).

    python -m fovea.bench.make_vlm --family qwen2_5_vl --out /tmp/vlm/qwen2_5_vl
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fovea.tokenizer_service.builtin_templates import GEMMA_IT, QWEN2_VL

# Qwen2.5 / Qwen2.5-VL tokenizer.json's added tokens, from id 151643 on; those from <tool_call>
# on are plain text there ("special": false).
_QWEN_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN_ADDED: dict[str, int] = {tok: 151_643 + i for i, tok in enumerate(_QWEN_ADDED)}

# gemma-3-4b-it's: <end_of_turn> is its second EOS (106); the image tokens are config.json's
# boi_token_index, eoi_token_index and image_token_index. Runs of one to four newlines are whole
# plain-text tokens from 107 on, as in Gemma's vocabulary; vLLM's Gemma 3 processing looks
# them up (it merges the "\n\n" it inserts around an image with a neighbouring newline).
GEMMA3_NEWLINES = tuple("\n" * n for n in range(1, 5))
GEMMA3_ADDED: dict[str, int] = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<start_of_turn>": 105, "<end_of_turn>": 106, **{nl: 106 + len(nl) for nl in GEMMA3_NEWLINES},
    "<start_of_image>": 255_999, "<end_of_image>": 256_000, "<image_soft_token>": 262_144,
}  # fmt: skip


@dataclass(frozen=True)
class TokenizerSpec:
    """A family's tokenizer: added tokens (content -> id), which of them are plain text, the
    special-token names PreTrainedTokenizerFast takes, BOS added on encode, chat template."""

    added: Mapping[str, int]
    names: Mapping[str, Any]
    chat_template: str
    text_tokens: frozenset[str] = frozenset()
    bos_on_encode: str | None = None
    generation: Mapping[str, Any] = field(default_factory=dict)  # generation_config.json


TOKENIZERS: dict[str, TokenizerSpec] = {
    "qwen2_5_vl": TokenizerSpec(
        added=QWEN_ADDED,
        text_tokens=frozenset(_QWEN_ADDED[_QWEN_ADDED.index("<tool_call>") :]),
        names=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        chat_template=QWEN2_VL,
        generation=dict(
            bos_token_id=151_643, eos_token_id=[151_645, 151_643], pad_token_id=151_643
        ),
    ),
    "gemma3": TokenizerSpec(
        added=GEMMA3_ADDED,
        text_tokens=frozenset(GEMMA3_NEWLINES),
        names=dict(
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            mask_token="<mask>",
            extra_special_tokens={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
        ),
        chat_template=GEMMA_IT,
        bos_on_encode="<bos>",  # as Gemma's tokenizer.json (the template renders its own)
        generation=dict(bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0),
    ),
}


def qwen2_5_vl_config() -> Any:
    """Qwen2.5-VL-3B-Instruct's vision_config (out_hidden_size: this LM's width) and token ids;
    Qwen2.5-0.5B-Instruct's text shape. M-RoPE: Qwen2.5-VL's [16, 24, 24] (t, h, w) covers
    head_dim 128 (sum = head_dim / 2); this LM's head_dim is 896 / 14 = 64, so the sections are
    halved to [8, 12, 12], the same split of the rotary frequencies."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=32_768, rms_norm_eps=1e-6, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        use_sliding_window=False, max_window_layers=21,
        bos_token_id=151_643, eos_token_id=151_645, tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2,
        out_hidden_size=text["hidden_size"], initializer_range=0.02,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151_655, video_token_id=151_656,
        vision_start_token_id=151_652, vision_end_token_id=151_653, tie_word_embeddings=True,
    )  # fmt: skip


def gemma3_config() -> Any:
    """gemma-3-4b-it's vision_config, projector and image token ids; gemma-3-270m's text stack
    (its rope: no scaling, 32k positions) over gemma-3-4b-it's vocabulary of 262208."""
    from transformers import Gemma3Config

    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 3  # 18 layers
    text = dict(
        vocab_size=262_208, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32_768,
        rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=layer_types, initializer_range=0.02,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        final_logit_softcapping=None, attn_logit_softcapping=None,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    vision = dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        num_channels=3, image_size=896, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=False,
    )  # fmt: skip
    # eos_token_id [<eos>, <end_of_turn>] at the top level, as published: not a declared field
    # of Gemma3Config, which keeps it as an extra key.
    return Gemma3Config(  # type: ignore[call-arg]
        text_config=text, vision_config=vision, mm_tokens_per_image=256,
        boi_token_index=255_999, eoi_token_index=256_000, image_token_index=262_144,
        initializer_range=0.02, tie_word_embeddings=True, eos_token_id=[1, 106],
    )  # fmt: skip


CONFIGS = {"qwen2_5_vl": qwen2_5_vl_config, "gemma3": gemma3_config}


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-character table, by byte value: the alphabet of a ByteLevel BPE
    (printable bytes stand for themselves, the others for characters from U+0100 on)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _merges(symbols: Sequence[str], taken: set[str]) -> Iterator[tuple[str, str]]:
    """Merges in rank order: every token of length n followed by every alphabet symbol, for
    n = 1, 2, ...; `symbols` is the alphabet (space, letters, digits, punctuation, newline).
    Strings already in `taken` (the added tokens) are skipped; `taken` grows."""
    level = list(symbols)
    while True:
        longer = []
        for left in level:
            for right in symbols:
                if left + right not in taken:
                    taken.add(left + right)
                    longer.append(left + right)
                    yield left, right
        level = longer


def byte_bpe_tokenizer(
    vocab_size: int,
    added: Mapping[str, int],
    *,
    text_tokens: frozenset[str] = frozenset(),
    bos_on_encode: str | None = None,
    chat_template: str | None = None,
    **names: Any,
) -> Any:
    """A PreTrainedTokenizerFast of exactly `vocab_size` tokens: `added` at their ids (special,
    but for `text_tokens`), the 256 byte tokens at the lowest free ids, merged tokens at the
    rest. `names`: bos_token, eos_token, ... as PreTrainedTokenizerFast takes them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    used = set(added.values())
    if len(used) < len(added) or not all(0 <= i < vocab_size for i in used):
        raise ValueError(f"added token ids must be distinct and in [0, {vocab_size})")
    free = [i for i in range(vocab_size) if i not in used]
    symbols = byte_symbols()
    if len(free) < len(symbols):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 byte tokens")
    # The merge alphabet: frequent characters of text, in ByteLevel's spelling (' ' is 'Ġ').
    alphabet = [symbols[b] for b in b" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    alphabet += [symbols[b] for b in b"0123456789.,'-!?:;()\"\n"]
    tokens = list(symbols)
    merges: list[tuple[str, str]] = []
    for left, right in _merges(alphabet, set(tokens) | set(added)):
        if len(tokens) == len(free):
            break
        tokens.append(left + right)
        merges.append((left, right))
    # Added tokens sit in the model's vocabulary too, so that they keep these ids when added.
    vocab = {**dict(zip(tokens, free, strict=True)), **added}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [
            AddedToken(t, special=t not in text_tokens, normalized=False)
            for t in sorted(added, key=added.__getitem__)
        ]
    )
    if bos_on_encode is not None:
        bos = (bos_on_encode, added[bos_on_encode])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)  # type: ignore[no-untyped-call]
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def family_tokenizer(family: str, vocab_size: int, added: Mapping[str, int] | None = None) -> Any:
    """The family's tokenizer over `vocab_size` ids; `added` overrides the added tokens' ids
    (a scaled-down vocabulary must move them)."""
    spec = TOKENIZERS[family]
    return byte_bpe_tokenizer(
        vocab_size,
        spec.added if added is None else added,
        text_tokens=spec.text_tokens,
        bos_on_encode=spec.bos_on_encode,
        chat_template=spec.chat_template,
        **spec.names,
    )


def image_processor(family: str) -> Any:
    """The published preprocessor settings on transformers' PIL image processor."""
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12_845_056)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": 896, "width": 896})


def save_processor(family: str, tokenizer: Any, out: Path) -> None:
    """Writes the image processor (preprocessor_config.json, as published), the tokenizer with
    its chat template, and what names the processor class for AutoProcessor. Gemma 3: its
    processor's own save_pretrained as well (processor_config.json, where transformers v5 nests
    the image processor). Qwen2.5-VL: its processor cannot be built without torchvision (its
    video processor needs it), so the tokenizer names the class instead."""
    images = image_processor(family)
    if family == "gemma3":
        from transformers import Gemma3Processor

        Gemma3Processor(
            image_processor=images,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            image_seq_length=256,
        ).save_pretrained(str(out))
    else:
        tokenizer._set_processor_class("Qwen2_5_VLProcessor")
        tokenizer.save_pretrained(str(out))
    images.save_pretrained(str(out))


VISION_PREFIXES = ("model.visual.", "model.vision_tower.", "model.multi_modal_projector.")


def gemma3_hub_names(out: Path) -> int:
    """Renames the SigLIP tower's tensors in out/model.safetensors from what transformers v5
    saves (`vision_tower.encoder.*`) to the published gemma-3-4b-it's names
    (`vision_tower.vision_model.encoder.*`), which vLLM 0.32 requires; returns how many."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(str(path))
    old = "vision_tower."
    new = {
        (f"{old}vision_model.{k[len(old):]}" if k.startswith(old) and ".vision_model." not in k
         else k): v
        for k, v in tensors.items()
    }  # fmt: skip
    renamed = sum(a != b for a, b in zip(tensors, new, strict=True))
    if renamed:
        save_file(new, str(path), metadata={"format": "pt"})
    return renamed


def build(family: str, out: Path, dtype: str = "bfloat16", seed: int = 0) -> dict[str, Any]:
    """Writes the checkpoint into `out`; returns the summary line's fields."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    start = time.perf_counter()
    config = CONFIGS[family]()
    torch.manual_seed(seed)
    # Built directly in `dtype` (transformers sets it as the default while initialising).
    model = AutoModelForImageTextToText.from_config(  # type: ignore[no-untyped-call]
        config, dtype=getattr(torch, dtype)
    )
    if family == "gemma3":  # zero at init: the image would not reach the decoder
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    counts = {"vision": 0, "lm": 0}
    for name, p in model.named_parameters():  # tied lm_head counted once, with the LM
        counts["vision" if name.startswith(VISION_PREFIXES) else "lm"] += p.numel()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    del model
    if family == "gemma3":
        gemma3_hub_names(out)
    tokenizer = family_tokenizer(family, config.text_config.vocab_size)
    save_processor(family, tokenizer, out)
    generation = GenerationConfig(**TOKENIZERS[family].generation)  # type: ignore[no-untyped-call]
    generation.save_pretrained(str(out))
    return {
        "family": family,
        "out": str(out),
        "dtype": dtype,
        "vision_params": counts["vision"],
        "lm_params": counts["lm"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(CONFIGS), required=True)
    p.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(build(args.family, args.out, args.dtype, args.seed)), flush=True)


if __name__ == "__main__":
    main()
