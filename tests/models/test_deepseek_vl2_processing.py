"""DeepSeek-VL2 without the model: the processor's tile choice, placeholder counts and pixels
equal DeepSeek-VL2's processor (written out in deepseek_vl2_reference.py); the deepseek-vl2
template's golden strings; template + processor give the reference's prompt ids; configs
that cannot be served fail with one line; tp sizes count the experts and the tower."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deepseek_vl2_reference import Processor, format_conversation, select_best_resolution
from PIL import Image

from fovea.common.messages import ChatMessage
from fovea.common.model_config import ModelConfigError, read_model_info, tp_size_problem
from fovea.tokenizer_service.chat_templates import ChatRenderer, ChatRenderError
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.processors.deepseek_vl2 import ONE_TILE, DeepseekVL2Processor

EOS = "<｜end▁of▁sentence｜>"
BOS = "<｜begin▁of▁sentence｜>"


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def ours(tiny_deepseek_vl2: Path) -> DeepseekVL2Processor:
    config = json.loads((tiny_deepseek_vl2 / "config.json").read_text())
    processor = load_processor(str(tiny_deepseek_vl2), config)
    assert isinstance(processor, DeepseekVL2Processor)
    return processor


@pytest.fixture(scope="module")
def reference(tiny_deepseek_vl2: Path) -> Processor:
    return Processor(tiny_deepseek_vl2)


# (width, height) -> (tiles across, tiles down), placeholders; 70-pixel tiles of 3x3 tokens.
SIZES = {
    (120, 80): ((2, 2), 55),  # 140x140 keeps all 9600 pixels; 140x70 only 7350
    (50, 50): ((1, 1), 25),  # every candidate keeps all: 70x70 wastes least
    (60, 140): ((1, 2), 37),
    (200, 60): ((3, 1), 43),
    (30, 300): ((1, 3), 49),
    (1000, 1000): ((2, 2), 55),  # the largest candidate of that shape
}


@pytest.mark.parametrize("size", list(SIZES))
def test_tiles_and_pixels_equal_deepseek_vl2s_processor(
    ours: DeepseekVL2Processor, reference: Processor, size: tuple[int, int]
) -> None:
    (tiles, count), pic = SIZES[size], image(*size, seed=size[0])
    best = select_best_resolution(pic.size, reference.candidates)
    assert (best[0] // 70, best[1] // 70) == tiles
    out = ours.preprocess_in_request(pic, 2)
    assert (tuple(out.grid), out.num_tokens, out.variant) == (tiles, count, b"")
    assert 3 * 4 + 1 + (tiles[1] * 3) * (tiles[0] * 3 + 1) == count  # newline, separator
    ids, views, crops = reference.tokenize_with_images("<image>", [pic])
    assert crops == [tiles] and ids.count(reference.image_token_id) == count
    assert out.pixel_values.shape == (1 + tiles[0] * tiles[1], 3, 70, 70)
    assert out.pixel_values.dtype == np.float32 and out.pixel_values.flags.c_contiguous
    assert np.array_equal(out.pixel_values, views[0].numpy())  # bit-identical
    # The global view: the image scaled to 70x21, centred (rows 24..44) on the mean colour,
    # uint8 127 -> (127 / 255 - 0.5) / 0.5 in float32.
    if size == (200, 60):
        pad = (np.float32(127) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
        rows = (out.pixel_values[0] == pad).all(axis=(0, 2))
        assert rows.tolist() == [True] * 24 + [False] * 21 + [True] * 25


def test_more_than_two_images_are_one_tile_each(
    ours: DeepseekVL2Processor, reference: Processor
) -> None:
    pics = [image(120, 80, 1), image(60, 140, 2), image(50, 50, 3)]
    _, views, crops = reference.tokenize_with_images("<image><image><image>", pics)
    assert crops == [(1, 1)] * 3
    for pic, view in zip(pics, views, strict=True):
        out = ours.preprocess_in_request(pic, 3)
        assert (out.grid, out.num_tokens, out.variant) == ([1, 1], 25, ONE_TILE)
        assert np.array_equal(out.pixel_values, view.numpy())
    # Alone or with one other, the same image is tiled (and hashes apart from the above).
    assert ours.preprocess(pics[0]).num_tokens == 55


# ---------------------------------------------------------------- the deepseek-vl2 template


@pytest.fixture(scope="module")
def tok(tiny_deepseek_vl2: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_deepseek_vl2))


def render(tok: Any, messages: list[ChatMessage], gen: bool = True) -> str:
    return ChatRenderer(tok, "deepseek-vl2", model_takes_images=True).render(messages, gen)


def img(name: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"http://x/{name}.png"}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def test_golden_one_image(tok: Any) -> None:
    msgs = [ChatMessage("user", [img("a"), text("Describe the image.")])]
    assert render(tok, msgs) == f"{BOS}<|User|>: <image>\nDescribe the image.\n\n<|Assistant|>:"


def test_golden_two_images_go_before_the_text(tok: Any) -> None:
    msgs = [ChatMessage("user", [text("Compare "), img("a"), text("with"), img("b")])]
    assert render(tok, msgs) == (f"{BOS}<|User|>: <image>\n<image>\nCompare with\n\n<|Assistant|>:")


def test_golden_system(tok: Any) -> None:
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "  Hi there  ")]
    assert render(tok, msgs) == f"{BOS}Be brief.\n\n<|User|>: Hi there\n\n<|Assistant|>:"


def test_golden_multi_turn(tok: Any) -> None:
    msgs = [
        ChatMessage("user", [img("a"), text("What is it?")]),
        ChatMessage("assistant", "A cat."),
        ChatMessage("user", "And its colour?"),
    ]
    assert render(tok, msgs) == (
        f"{BOS}<|User|>: <image>\nWhat is it?\n\n<|Assistant|>: A cat.{EOS}"
        "<|User|>: And its colour?\n\n<|Assistant|>:"
    )
    assert render(tok, msgs[:2], gen=False) == (
        f"{BOS}<|User|>: <image>\nWhat is it?\n\n<|Assistant|>: A cat.{EOS}"
    )
    # A turn with no text is its role and a colon, as conversation.py renders it.
    assert render(tok, [ChatMessage("user", "")]) == f"{BOS}<|User|>:<|Assistant|>:"


def test_template_refusals(tok: Any) -> None:
    with pytest.raises(ChatRenderError, match="images in user messages only"):
        render(tok, [ChatMessage("user", "a"), ChatMessage("assistant", [img("a")])])
    with pytest.raises(ChatRenderError, match="system, user and assistant messages only"):
        render(tok, [ChatMessage("tool", "x")])


CONVERSATIONS: dict[str, tuple[list[ChatMessage], str, list[tuple[str, str]], int]] = {
    # name: (OpenAI messages, the reference's system, its turns, images)
    "text": ([ChatMessage("user", "Paris is the capital of France.")], "",
             [("user", "Paris is the capital of France.")], 0),
    "system_image": (
        [ChatMessage("system", "Be brief."), ChatMessage("user", [img("a"), text("Describe.")])],
        "Be brief.", [("user", "<image>\nDescribe.")], 1,
    ),
    "multi_turn_two_images": (
        [ChatMessage("user", [img("a"), text("What?")]), ChatMessage("assistant", "A fox."),
         ChatMessage("user", [text("And"), img("b")])],
        "", [("user", "<image>\nWhat?"), ("assistant", "A fox."), ("user", "<image>\nAnd")], 2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_template_and_processor_give_the_reference_ids(
    tok: Any, ours: DeepseekVL2Processor, reference: Processor, name: str
) -> None:
    """What the tokenizer service does (render, encode without special tokens, expand) equals
    DeepSeek-VL2's processor on its own conversation format (BOS first)."""
    messages, system, turns, n = CONVERSATIONS[name]
    pics = [image(120, 80, 1), image(60, 140, 2)][:n]
    ref_ids, _, _ = reference.tokenize_with_images(format_conversation(turns, system), pics)
    ids = tok.encode(render(tok, messages), add_special_tokens=False)
    expanded, offsets = ours.expand_placeholders(
        ids, [ours.preprocess_in_request(p, n) for p in pics]
    )
    assert expanded == ref_ids and expanded[0] == 0  # BOS
    assert offsets == [i for i, t in enumerate(ref_ids) if t == 3 and ref_ids[i - 1] != 3]


# ---------------------------------------------------------------- configs


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def test_model_info_reads_language_config(tiny_deepseek_vl2: Path) -> None:
    info = read_model_info(str(tiny_deepseek_vl2))
    assert (info.architecture, info.context_length) == ("DeepseekVLV2ForCausalLM", 1024)
    assert (info.vocab_size, info.eos_token_ids) == (512, [1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("config", "tile_tag", "1D"), "tile_tag '1D' is not supported (only '2D', as DeepSeek-VL2 ships)"),
        (("language", "topk_method", "top_p"), "topk_method 'top_p' is not one of greedy, group_limited_greedy, noaux_tc"),
        (("language", "hidden_act", "gelu"), "language hidden_act 'gelu' is not supported (silu)"),
        (("projector", "projector_type", "mlp_gelu"), "projector_type 'mlp_gelu' is not supported (only downsample_mlp_gelu)"),
        (("processor", "patch_size", 16), "processor_config.json's 70-pixel tiles of 16-pixel patches (downsampled 2x) do not fit the model's 70-pixel tiles of 3x3 tokens"),
    ],
)  # fmt: skip
def test_configs_that_cannot_be_served_fail_in_one_line(
    tiny_deepseek_vl2: Path, tmp_path: Path, change: tuple[str, str, Any], message: str
) -> None:
    d = _copy_without_weights(tiny_deepseek_vl2, tmp_path / "m")
    where, key, value = change
    file = d / ("processor_config.json" if where == "processor" else "config.json")
    data = json.loads(file.read_text())
    section = {"language": "language_config", "projector": "projector_config"}.get(where)
    (data[section] if section else data)[key] = value
    file.write_text(json.dumps(data))
    with pytest.raises(ModelConfigError) as e:
        read_model_info(str(d))
    assert str(e.value) == f"{d / 'config.json'}: {message}"


def test_tp_sizes_count_the_experts_and_the_tower() -> None:
    """DeepSeek-VL2-tiny's shapes: 10 heads, dense MLP 6848, experts 896 wide, SigLIP-so400m
    (16 heads, MLP int(1152 * 3.7362) = 4304)."""
    cfg = {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "language_config": {"num_attention_heads": 10, "num_key_value_heads": 10,
                            "intermediate_size": 6848, "n_routed_experts": 64,
                            "moe_intermediate_size": 896},
        "vision_config": {"width": 1152, "heads": 16, "mlp_ratio": 3.7362},
    }  # fmt: skip
    assert tp_size_problem(cfg, 2) is None
    assert tp_size_problem(cfg, 5) == (
        "--tp-size 5 cannot split this model (10 attention heads, 10 KV heads, MLP width 6848, "
        "expert width 896, vision heads 16, vision MLP width 4304); valid sizes: 1, 2"
    )
