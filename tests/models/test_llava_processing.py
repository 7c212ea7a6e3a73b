"""The LLaVA family without a model: image preprocessing bit-equal to transformers' PIL-backend
image processors and placeholder counts equal to their processors over many image sizes; the
built-in chat templates render SGLang's / LLaVA's published formats (golden strings, one BOS);
original-layout configs resolve their tower from the built-in table, or fail naming it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llava_helpers import LlavaReference, random_image
from PIL import Image
from tiny_models import make_original_llava

from fovea.common.families.llava import (
    LlavaConfigError,
    llava_spec,
    parse_pinpoints,
    select_best_resolution,
)
from fovea.common.families.llava_defaults import KNOWN_TOWERS
from fovea.common.messages import ChatMessage
from fovea.common.model_config import ModelConfigError, read_model_info
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.processors.llava import LlavaProcessor

# (width, height): square, wide, tall, extreme both ways, tiny, odd, larger than every pinpoint.
SIZES = [(56, 56), (64, 48), (100, 150), (300, 20), (20, 300), (57, 113), (9, 7), (390, 400)]
KINDS = ["llava", "llava_next", "llava_onevision"]


@pytest.fixture(scope="module", params=KINDS)
def kind_and_path(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def ref(kind_and_path: tuple[str, Path]) -> LlavaReference:
    return LlavaReference(kind_and_path[1], kind_and_path[0])


def config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())  # type: ignore[no-any-return]


def ours(path: Path) -> LlavaProcessor:
    proc = load_processor(str(path), config(path))
    assert isinstance(proc, LlavaProcessor)
    return proc


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixels_and_counts_match_transformers(
    kind_and_path: tuple[str, Path], ref: LlavaReference, size: tuple[int, int]
) -> None:
    """One image alone, and (OneVision's other path) the first of two: pixel values
    bit-equal, placeholder count equal to transformers' processor's."""
    _, path = kind_and_path
    proc, image = ours(path), random_image(sum(size), *size)
    for n in (1, 2):
        messages = [{"role": "user", "content": [{"type": "image"}] * n}]
        ids, kw = ref.prompt(messages, [image] * n)
        mine = proc.preprocess_in_request(image, n)
        assert mine.grid == [size[1], size[0]]
        assert n * mine.num_tokens == ids.count(ref.image_token)
        theirs = kw["pixel_values"].numpy()[0]
        theirs = theirs if theirs.ndim == 4 else theirs[None]
        assert mine.pixel_values.dtype == np.float32 and mine.pixel_values.flags.c_contiguous
        assert np.array_equal(mine.pixel_values, theirs[: len(mine.pixel_values)])
        assert not theirs[len(mine.pixel_values) :].any()  # only transformers' batch padding


def test_grey_and_transparent_images(kind_and_path: tuple[str, Path]) -> None:
    """Converted to RGB as transformers does (transparency onto white) before processing."""
    proc = ours(kind_and_path[1])
    grey = Image.fromarray(np.full((48, 64), 77, dtype=np.uint8), mode="L")
    rgba = Image.fromarray(np.zeros((48, 64, 4), dtype=np.uint8), mode="RGBA")
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    assert np.array_equal(
        proc.preprocess(grey).pixel_values,
        proc.preprocess(Image.new("RGB", (64, 48), (77, 77, 77))).pixel_values,
    )
    assert np.array_equal(proc.preprocess(rgba).pixel_values, proc.preprocess(white).pixel_values)


def test_llava_without_pad_to_square(tiny_llava: Path, tmp_path: Path) -> None:
    """llava-hf's CLIPImageProcessor configs do not pad: shortest-edge resize, centre crop."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    for f in tiny_llava.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    hf = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    hf.save_pretrained(str(tmp_path))
    assert not ours(tmp_path).pad_square and ours(tiny_llava).pad_square
    for w, h in SIZES:
        image = random_image(w * h, w, h)
        theirs = hf(images=[image], return_tensors="np")["pixel_values"]
        assert np.array_equal(ours(tmp_path).preprocess(image).pixel_values, theirs)


def test_select_best_resolution_matches_transformers() -> None:
    from transformers.image_processing_utils import select_best_resolution as theirs

    pins = parse_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pins) == 36 and pins[0] == (384, 384) and pins[-1] == (2304, 2304)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (200, 2)).tolist():
        assert select_best_resolution(h, w, pins) == tuple(theirs((h, w), [list(p) for p in pins]))


# ---------------------------------------------------------------- the original layout


def test_original_configs_resolve_the_hub_towers() -> None:
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    base |= {"num_attention_heads": 4, "vocab_size": 512, "max_position_embeddings": 4096}
    clip = llava_spec(
        base | {"architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "mlp2x_gelu",
                "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]]}
    )  # fmt: skip
    v = clip.vision_config
    assert (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"]) == (1024, 24, 16)
    assert (v["patch_size"], v["image_size"], v["intermediate_size"]) == (14, 336, 4096)
    assert v["hidden_act"] == "quick_gelu" and clip.tower == "clip" and clip.anyres
    assert clip.feature_layers == (-2,) and clip.drop_first and clip.tile_features == 576
    assert clip.processor_defaults["crop_size"] == {"height": 336, "width": 336}
    siglip = llava_spec(
        base | {"architectures": ["LlavaQwenForCausalLM"], "mm_projector_type": "mlp2x_gelu",
                "mm_vision_tower": "google/siglip-so400m-patch14-384",
                "image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": "(1x1),...,(6x6)"}
    )  # fmt: skip
    v = siglip.vision_config
    assert (v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"]) == (1152, 27, 4304)
    assert (v["patch_size"], v["image_size"], v["hidden_act"]) == (14, 384, "gelu_pytorch_tanh")
    assert siglip.text_config["attention_bias"] and siglip.max_tiles == 9
    assert siglip.tile_features == 729 and siglip.multi_image_base_only
    assert siglip.processor_defaults["image_mean"] == [0.5, 0.5, 0.5]
    assert set(KNOWN_TOWERS) == {
        "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384",
    }  # fmt: skip


def test_unknown_tower_fails_naming_the_known_ones(tiny_llava: Path, tmp_path: Path) -> None:
    out = make_original_llava(tiny_llava, tmp_path / "orig")
    cfg = config(out)
    del cfg["mm_vision_tower_config"]
    cfg["mm_vision_tower"] = "someone/my-tower"
    message = (
        "unknown vision tower 'someone/my-tower' (mm_vision_tower); known: "
        "openai/clip-vit-large-patch14-336, google/siglip-so400m-patch14-384; for another tower "
        "put its transformers vision_config (with model_type) in config.json as "
        "mm_vision_tower_config"
    )
    with pytest.raises(LlavaConfigError) as e:
        llava_spec(cfg)
    assert str(e.value) == message
    # At load (the launcher reads the model info before starting any process): one line.
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError) as e2:
        read_model_info(str(out))
    assert str(e2.value) == f"{out / 'config.json'}: {message}"
    # Without the escape hatch the named hub tower's real config is used.
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    assert llava_spec(cfg).vision_config["hidden_size"] == 1024


def test_original_layout_without_an_image_token(tiny_llava: Path, tmp_path: Path) -> None:
    """An original tokenizer has no <image> token: the fix is named; image_token_index in
    config.json is the alternative (an id past the vocabulary is fine: it embeds clamped)."""
    out = make_original_llava(tiny_llava, tmp_path / "orig")
    cfg = config(out)
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image>"]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text("{}")
    fix = (
        "the tokenizer has no <image> token and config.json sets no image_token_index; add "
        "<image> to the tokenizer as a special token or set image_token_index"
    )
    with pytest.raises(LlavaConfigError) as e:
        load_processor(str(out), cfg)
    assert str(e.value) == fix
    with pytest.raises(ModelConfigError, match=re.escape(fix)):
        read_model_info(str(out))
    assert ours_with(out, cfg | {"image_token_index": 600}).image_token_id == 600


def ours_with(path: Path, cfg: dict[str, Any]) -> LlavaProcessor:
    proc = load_processor(str(path), cfg)
    assert isinstance(proc, LlavaProcessor)
    return proc


def test_unsupported_original_configs_fail_clearly() -> None:
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    }
    with pytest.raises(LlavaConfigError, match="mm_projector_type 'mlp3x_gelu' is not supported"):
        llava_spec(cfg | {"mm_projector_type": "mlp3x_gelu"})
    with pytest.raises(LlavaConfigError, match="anyres needs spatial_unpad"):
        llava_spec(cfg | {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "flat"})


# ---------------------------------------------------------------- chat templates

SYS_V = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
SYS_L3 = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
H = "<|start_header_id|>{}<|end_header_id|>\n\n"


def img() -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "http://x/a.png"}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "one": [ChatMessage("user", [img(), text("What is this?")])],
    "two": [ChatMessage("user", [img(), img(), text("Compare them.")])],
    "turns": [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", [text("Look:"), img()]),
        ChatMessage("assistant", "A cat."),
        ChatMessage("user", "And now?"),
    ],
}
GOLDEN = {
    "vicuna_v1.1": {
        "one": f"<s>{SYS_V} USER: <image>\nWhat is this? ASSISTANT:",
        "two": f"<s>{SYS_V} USER: <image>\n<image>\nCompare them. ASSISTANT:",
        "turns": "<s>Be brief. USER: Look:<image>\n ASSISTANT: A cat.</s>USER: And now? ASSISTANT:",
    },
    "chatml-llava": {
        "one": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
        "two": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\nCompare them.<|im_end|>\n<|im_start|>assistant\n",
        "turns": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nLook:<image>\n"
        "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nAnd now?"
        "<|im_end|>\n<|im_start|>assistant\n",
    },
    "llava_llama_3": {
        "one": f"<|begin_of_text|>{H.format('system')}{SYS_L3}<|eot_id|>{H.format('user')}"
        f"<image>\nWhat is this?<|eot_id|>{H.format('assistant')}",
        "two": f"<|begin_of_text|>{H.format('system')}{SYS_L3}<|eot_id|>{H.format('user')}"
        f"<image>\n<image>\nCompare them.<|eot_id|>{H.format('assistant')}",
        # Each turn's text is stripped: the newline after a trailing image goes.
        "turns": f"<|begin_of_text|>{H.format('system')}Be brief.<|eot_id|>{H.format('user')}"
        f"Look:<image><|eot_id|>{H.format('assistant')}A cat.<|eot_id|>{H.format('user')}"
        f"And now?<|eot_id|>{H.format('assistant')}",
    },
}
TEMPLATE_MODEL = {"vicuna_v1.1": "llava", "chatml-llava": "llava_onevision"}
TEMPLATE_MODEL["llava_llama_3"] = "llama3_llava_next"


@pytest.mark.parametrize("template", list(GOLDEN))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_templates_render_the_published_formats(
    template: str, conversation: str, request: pytest.FixtureRequest
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(f"tiny_{TEMPLATE_MODEL[template]}"))
    rendered = ChatRenderer(tok, template, model_takes_images=True).render(
        CONVERSATIONS[conversation]
    )
    assert rendered == GOLDEN[template][conversation]
    ids = tok.encode(rendered, add_special_tokens=False)  # as the tokenizer service does
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == rendered.count("<image>")
    if tok.bos_token_id is not None:  # exactly one BOS, first
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.encode(rendered[len(tok.bos_token) :])[0] == tok.bos_token_id
