"""LLaVA-OneVision video against transformers on the tiny checkpoint: the tokenizer service's
ids and pixel_values_videos equal LlavaOnevisionProcessor's (frames sampled uniformly at 2 fps
from a PyAV-decoded synthetic video, each pooled 2x2 by the model, one newline per video),
greedy 32 tokens identical and prefill logits within 1e-3 - for one video, a video plus an
image, and a second turn; the same video again runs no encoder."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from video_helpers import decode_all, load_torchvision, make_video
from worker_driver import GREEDY, greedy, make_runner, prefill_logits

from fovea.common.messages import ChatMessage, GenerateRequest, ImageInput, NewSequence
from fovea.common.model_config import read_model_info
from fovea.common.sampling import SamplingParams
from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.media import MediaLoader, MediaPolicy
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.tokenizer import Tokenizer, load_hf_tokenizer
from fovea.worker.model_runner import ModelRunner

N_NEW = 32
FPS = 2.0
TEMPLATE = "chatml-llava"
# A: 23 frames at 10 fps (2.3 s: 4 frames); B: 40 frames at 8 fps, WebM/VP9 (5 s: 10 frames).
VIDEOS = {
    "A": make_video(23, 64, 48, fps=10),
    "B": make_video(40, 96, 72, fps=8, fmt="webm", codec="libvpx-vp9", seed=1),
}
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8))
# A video given as 5 frames (image parts with "modalities": "video", as SGLang takes them).
FRAMES = [
    Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for i in range(5)
]

Part = str | tuple[str, str]
CASES: dict[str, list[tuple[str, list[Part]]]] = {
    "one_video": [("user", [("video", "A"), "Describe the video."])],
    "video_and_image": [("user", [("image", ""), "and then", ("video", "B"), "compare."])],
    "frames_as_video": [("user", ["Look:", ("frames", ""), "What changes?"])],
    "second_turn": [
        ("user", [("video", "B"), "What happens?"]),
        ("assistant", ["A square moves."]),
        ("user", ["Where does it go?"]),
    ],
}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _api_parts(p: Part) -> list[dict[str, Any]]:
    if isinstance(p, tuple) and p[0] == "frames":
        return [
            {"type": "image_url", "image_url": {"url": _uri(f)}, "modalities": "video"}
            for f in FRAMES
        ]
    return [_api_part(p)]


def _uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


def _api_part(p: Part) -> dict[str, Any]:
    if isinstance(p, str):
        return {"type": "text", "text": p}
    if p[0] == "image":
        url = "data:image/png;base64," + base64.b64encode(_png(IMAGE)).decode()
        return {"type": "image_url", "image_url": {"url": url}}
    mime = "video/webm" if p[1] == "B" else "video/mp4"
    url = f"data:{mime};base64," + base64.b64encode(VIDEOS[p[1]]).decode()
    return {"type": "video_url", "video_url": {"url": url}}


@pytest.fixture(scope="module")
def model_path(tiny_llava_onevision: Path) -> Path:
    torch.set_num_threads(2)
    return tiny_llava_onevision


@pytest.fixture(scope="module")
def service(model_path: Path) -> Tokenizer:
    hf = load_hf_tokenizer(str(model_path))
    cfg = json.loads((model_path / "config.json").read_text())
    processor = load_processor(str(model_path), cfg)
    assert processor is not None and processor.video is not None
    chat = ChatRenderer(hf, TEMPLATE, True, "<image>", "<video>")
    assert chat.video_refusal is None
    return Tokenizer(
        hf, read_model_info(str(model_path)), chat, processor, media=MediaLoader(MediaPolicy())
    )


class Ours:
    def __init__(self, svc: Tokenizer, turns: list[tuple[str, list[Part]]], rid: str) -> None:
        messages = [
            ChatMessage(role, [q for p in parts for q in _api_parts(p)]) for role, parts in turns
        ]
        req = GenerateRequest(
            rid=rid, sampling=SamplingParams(temperature=0.0, max_new_tokens=64), messages=messages
        )
        (seq,) = asyncio.run(svc.tokenize_async(req))
        self.ids: list[int] = seq.input_ids
        self.images: list[ImageInput] = seq.images

    def new_seq(self, key: str) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, [], self.images)


class Reference:
    def __init__(self, model_path: Path, turns: list[tuple[str, list[Part]]]) -> None:
        load_torchvision()
        import transformers as tf
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        cfg = json.loads((model_path / "config.json").read_text())
        tok = tf.AutoTokenizer.from_pretrained(str(model_path))
        side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
        proc = tf.LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(str(model_path)),
            tokenizer=tok,
            video_processor=LlavaOnevisionVideoProcessor.from_pretrained(str(model_path)),
            num_image_tokens=side * side,
            vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
            vision_aspect_ratio=cfg["vision_aspect_ratio"],
        )
        messages = [
            {
                "role": role,
                "content": [
                    {"type": "text", "text": p}
                    if isinstance(p, str)
                    else {"type": "image" if p[0] == "image" else "video"}
                    for p in parts
                ],
            }
            for role, parts in turns
        ]
        text = tok.apply_chat_template(
            messages, chat_template=BUILTIN_TEMPLATES[TEMPLATE].source, tokenize=False,
            add_generation_prompt=True,
        )  # fmt: skip
        kinds = [p for _, parts in turns for p in parts if isinstance(p, tuple)]
        videos = [decode_all(VIDEOS[name]) for kind, name in kinds if kind == "video"]
        images = [IMAGE for kind, _ in kinds if kind == "image"]
        if any(kind == "frames" for kind, _ in kinds):  # a frame list: all frames, no sampling
            stacked = np.stack([np.asarray(f) for f in FRAMES])
            sampling: dict[str, Any] = {"videos": [stacked], "do_sample_frames": False}
        else:
            sampling = {
                "videos": [v for v, _ in videos],
                "video_metadata": [m for _, m in videos],
                "do_sample_frames": True,
                "fps": FPS,
            }
        out = proc(
            text=[text],
            images=images or None,
            add_special_tokens=False,
            return_tensors="pt",
            **sampling,
        )
        self.ids: list[int] = out["input_ids"][0].tolist()
        self.out = out
        self.kwargs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}


@pytest.fixture(scope="module")
def cases(service: Tokenizer, model_path: Path) -> dict[str, tuple[Ours, Reference]]:
    return {n: (Ours(service, t, n), Reference(model_path, t)) for n, t in CASES.items()}


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(model_path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def runner(model_path: Path) -> ModelRunner:
    return make_runner(model_path)


def _videos(ours: Ours) -> list[ImageInput]:
    return [img for img in ours.images if img.second_per_grid_t > 0]


@pytest.mark.parametrize("case", list(CASES))
def test_processor_output_matches_transformers(
    cases: dict[str, tuple[Ours, Reference]], case: str
) -> None:
    ours, ref = cases[case]
    assert ours.ids == ref.ids
    (video,) = _videos(ours)
    theirs = ref.out["pixel_values_videos"][0].numpy()  # [frames, C, H, W]
    assert np.array_equal(video.pixel_values, theirs)
    # 4 patches a side pool to 2: 4 tokens a frame, plus the newline.
    assert video.num_tokens == len(theirs) * 4 + 1


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logits_match_transformers(
    runner: ModelRunner, hf_model: Any, cases: dict[str, tuple[Ours, Reference]], case: str
) -> None:
    ours, ref = cases[case]
    ids = ref.out["input_ids"]
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=ref.out["attention_mask"], do_sample=False,
            max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0,
            **ref.kwargs,
        )  # fmt: skip
        theirs = hf_model(ids, **ref.kwargs).logits[0]
    assert greedy(runner, ours) == out[0, len(ref.ids) :].tolist()
    assert (prefill_logits(runner, ours) - theirs).abs().max().item() < 1e-3
    assert runner.seqs == {}


def test_the_video_matters_and_again_runs_no_encoder(model_path: Path, service: Tokenizer) -> None:
    runner = make_runner(model_path)
    a = Ours(service, [("user", [("video", "A"), "Describe the video."])], "a")
    b = Ours(service, [("user", [("video", "B"), "Describe the video."])], "b")
    assert (prefill_logits(runner, a)[-1] - prefill_logits(runner, b)[-1]).abs().max() > 1e-2
    encoded = runner.images_encoded
    again = Ours(service, [("user", [("video", "A"), "Describe the video."])], "c")
    greedy(runner, again, "c")
    assert runner.images_encoded == encoded  # A's features are in the encoder cache
