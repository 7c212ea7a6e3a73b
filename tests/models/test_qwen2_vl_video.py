"""Qwen2-VL and Qwen2.5-VL video against transformers on tiny checkpoints: the tokenizer
service's ids, pixel_values_videos, video_grid_thw and second_per_grid_t equal the
processor's (frames sampled at 2 fps from a PyAV-decoded synthetic video), M-RoPE positions
equal, greedy 32 tokens identical and prefill logits within 1e-3 - for one video, a video plus
an image, and a second turn; the same video again runs no encoder."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from video_helpers import decode_all, load_torchvision, make_video
from vision_helpers import still_as_transformers
from worker_driver import GREEDY, greedy, make_runner, prefill_logits

from fovea.common.messages import (
    ChatMessage,
    GenerateRequest,
    ImageInput,
    NewSequence,
)
from fovea.common.model_config import read_model_info
from fovea.common.sampling import SamplingParams
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.media import MediaLoader, MediaPolicy
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.tokenizer import Tokenizer, load_hf_tokenizer
from fovea.worker.model_runner import ModelRunner

N_NEW = 32
FPS = 2.0
# A: 23 frames at 10 fps, 64x48 (2.3 s: 4 frames sampled, the min_frames floor); B: 40 frames
# at 8 fps, 96x72, WebM/VP9 (5 s: 10 frames, grid [5, 6, 6]).
VIDEOS = {
    "A": make_video(23, 64, 48, fps=10),
    "B": make_video(40, 96, 72, fps=8, fmt="webm", codec="libvpx-vp9", seed=1),
}
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (112, 112, 3), dtype=np.uint8))
# A video given as 5 frames (image parts with "modalities": "video"): padded to 6, grid t 3.
FRAMES = [
    Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for i in range(5)
]

Part = str | tuple[str, str]  # text, ("video", name) or ("image", "")
CASES: dict[str, list[tuple[str, list[Part]]]] = {
    "one_video": [("user", [("video", "A"), "Describe the video."])],
    "video_and_image": [
        ("user", [("image", ""), "and then", ("video", "B"), "compare them."]),
    ],
    "frames_as_video": [("user", ["Look:", ("frames", ""), "What changes?"])],
    "second_turn": [
        ("user", [("video", "B"), "What happens?"]),
        ("assistant", ["A square moves."]),
        ("user", ["Where does it go?"]),
    ],
}


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _api_parts(p: Part) -> list[dict[str, Any]]:
    if isinstance(p, tuple) and p[0] == "frames":
        return [
            {
                "type": "image_url",
                "image_url": {"url": _data_uri("image/png", _png(f))},
                "modalities": "video",
            }
            for f in FRAMES
        ]
    return [_api_part(p)]


def _api_part(p: Part) -> dict[str, Any]:
    if isinstance(p, str):
        return {"type": "text", "text": p}
    if p[0] == "image":
        return {"type": "image_url", "image_url": {"url": _data_uri("image/png", _png(IMAGE))}}
    mime = "video/webm" if VIDEOS[p[1]][:4] == b"\x1a\x45\xdf\xa3" else "video/mp4"
    return {"type": "video_url", "video_url": {"url": _data_uri(mime, VIDEOS[p[1]])}}


def _hf_part(p: Part) -> dict[str, Any]:
    if isinstance(p, str):
        return {"type": "text", "text": p}
    return {"type": "image" if p[0] == "image" else "video"}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_path(request: pytest.FixtureRequest) -> Path:
    torch.set_num_threads(2)
    return request.getfixturevalue(f"tiny_{request.param}")  # type: ignore[no-any-return]


def _is_25(model_path: Path) -> bool:
    return "qwen2-5" in model_path.name


@pytest.fixture(scope="module")
def service(model_path: Path) -> Tokenizer:
    hf = load_hf_tokenizer(str(model_path))
    config = read_model_info(str(model_path))
    import json

    processor = load_processor(
        str(model_path), json.loads((model_path / "config.json").read_text()), "pil"
    )
    assert processor is not None and processor.video is not None
    chat = ChatRenderer(hf, None, True, "<|image_pad|>", "<|video_pad|>")
    assert chat.video_refusal is None
    svc = Tokenizer(hf, config, chat, processor, media=MediaLoader(MediaPolicy()))
    return svc


class Ours:
    """The tokenizer service's output for a case."""

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
    """transformers' processor output for a case: Qwen2VLProcessor / Qwen2_5_VLProcessor with
    the PIL image processor and Qwen2VLVideoProcessor, videos decoded with PyAV."""

    def __init__(self, model_path: Path, turns: list[tuple[str, list[Part]]]) -> None:
        load_torchvision()
        from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        tok = AutoTokenizer.from_pretrained(str(model_path))
        cls = Qwen2_5_VLProcessor if _is_25(model_path) else Qwen2VLProcessor
        proc = cls(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(model_path)),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor.from_pretrained(str(model_path)),
        )
        messages = [
            {"role": role, "content": [_hf_part(p) for p in parts]} for role, parts in turns
        ]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kinds = self._kinds(turns)
        videos = [decode_all(VIDEOS[name]) for kind, name in kinds if kind == "video"]
        images = [IMAGE for kind, _ in kinds if kind == "image"]
        if any(kind == "frames" for kind, _ in kinds):  # a frame list: all frames, no sampling
            stacked = np.stack([np.asarray(f) for f in FRAMES])
            sampling: dict[str, Any] = {"videos": [stacked], "do_sample_frames": False}
        else:
            sampling = {
                "videos": [v for v, _ in videos] or None,
                "video_metadata": [m for _, m in videos] or None,
                "do_sample_frames": True,
                "fps": FPS,
            }
        out = proc(
            text=[text],
            images=images or None,
            cap_pixels_per_frame=False,
            return_tensors="pt",
            **sampling,
        )
        self.ids: list[int] = out["input_ids"][0].tolist()
        self.out = out
        self.kwargs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}

    @staticmethod
    def _kinds(turns: list[tuple[str, list[Part]]]) -> list[tuple[str, str]]:
        return [p for _, parts in turns for p in parts if isinstance(p, tuple)]


@pytest.fixture(scope="module")
def cases(service: Tokenizer, model_path: Path) -> dict[str, tuple[Ours, Reference]]:
    return {
        name: (Ours(service, turns, name), Reference(model_path, turns))
        for name, turns in CASES.items()
    }


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = (
        Qwen2_5_VLForConditionalGeneration
        if _is_25(model_path)
        else Qwen2VLForConditionalGeneration
    )
    return cls.from_pretrained(str(model_path), dtype=torch.float32).eval()


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
    videos = _videos(ours)
    grids = ref.out["video_grid_thw"].tolist()
    assert [v.grid for v in videos] == grids
    theirs = ref.out["pixel_values_videos"].numpy()
    assert np.array_equal(np.concatenate([v.pixel_values for v in videos]), theirs)
    if "second_per_grid_ts" in ref.out:
        sgt = [float(s) for s in ref.out["second_per_grid_ts"]]
        assert [np.float32(v.second_per_grid_t) for v in videos] == [np.float32(s) for s in sgt]
    if "pixel_values" in ref.out:
        still = next(img for img in ours.images if img.second_per_grid_t == 0)
        assert still.pixel_values.dtype == np.uint8  # sent raw, normalized in the tower
        got = still_as_transformers(still.pixel_values, still.pixel_scale, still.pixel_shift, 2)
        assert np.abs(got - ref.out["pixel_values"].numpy()).max() <= 2e-6


@pytest.mark.parametrize("case", list(CASES))
def test_mrope_positions_match_transformers(
    runner: ModelRunner, hf_model: Any, cases: dict[str, tuple[Ours, Reference]], case: str
) -> None:
    ours, ref = cases[case]
    positions, delta = runner.model.mrope_positions(ours.ids, ours.images)
    kw = ref.kwargs
    theirs, their_delta = hf_model.model.get_rope_index(
        ref.out["input_ids"],
        kw["mm_token_type_ids"],
        kw.get("image_grid_thw"),
        kw.get("video_grid_thw"),
        **({"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}),
    )
    assert torch.equal(positions, theirs[:, 0]) and delta == int(their_delta)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_and_logits_match_transformers(
    runner: ModelRunner, hf_model: Any, cases: dict[str, tuple[Ours, Reference]], case: str
) -> None:
    ours, ref = cases[case]
    with torch.no_grad():
        out = hf_model.generate(
            ref.out["input_ids"],
            attention_mask=ref.out["attention_mask"],
            do_sample=False,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            eos_token_id=None,
            pad_token_id=0,
            **ref.kwargs,
        )
        theirs = hf_model(ref.out["input_ids"], **ref.kwargs).logits[0]
    assert greedy(runner, ours) == out[0, len(ref.ids) :].tolist()
    logits = prefill_logits(runner, ours)
    assert (logits - theirs).abs().max().item() < 1e-3
    assert runner.seqs == {}


def test_the_video_matters(runner: ModelRunner, service: Tokenizer) -> None:
    a = Ours(service, [("user", [("video", "A"), "Describe the video."])], "a")
    b = Ours(service, [("user", [("video", "B"), "Describe the video."])], "b")
    # The prompts differ only in the video: their last positions' logits must differ too.
    last_a, last_b = prefill_logits(runner, a)[-1], prefill_logits(runner, b)[-1]
    assert (last_a - last_b).abs().max().item() > 1e-2


def test_same_video_again_runs_no_encoder(model_path: Path, service: Tokenizer) -> None:
    runner = make_runner(model_path)
    first = Ours(service, CASES["one_video"], "x")
    again = Ours(service, CASES["one_video"], "y")
    assert [v.hash for v in _videos(first)] == [v.hash for v in _videos(again)]
    before = runner.images_encoded
    greedy(runner, first, "x")
    assert runner.images_encoded == before + 1
    greedy(runner, again, "y")
    assert runner.images_encoded == before + 1
