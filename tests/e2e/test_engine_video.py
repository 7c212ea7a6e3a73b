"""The offline Engine with video_data= (bytes, an allowed local path, a dict with sampling
fields): the same greedy tokens as the tokenizer service's output run on a ModelRunner
(tests/models/test_qwen2_vl_video.py holds that path equal to transformers); refusals are
ValueErrors naming what to change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from video_helpers import make_video
from worker_driver import greedy, make_runner

from fovea.common.messages import GenerateRequest, NewSequence, VideoRef
from fovea.common.model_config import read_model_info
from fovea.common.sampling import SamplingParams
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.media import MediaLoader, MediaPolicy
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.tokenizer import Tokenizer, load_hf_tokenizer

pytestmark = pytest.mark.slow

GREEDY = {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
VIDEO = make_video(30, fps=10)


class Expected:
    def __init__(self, model: Path, ref: VideoRef) -> None:
        import json

        hf = load_hf_tokenizer(str(model))
        processor = load_processor(str(model), json.loads((model / "config.json").read_text()))
        svc = Tokenizer(
            hf, read_model_info(str(model)), ChatRenderer(hf, None), processor,
            media=MediaLoader(MediaPolicy()),
        )  # fmt: skip
        req = GenerateRequest(
            rid="r", sampling=SamplingParams(temperature=0.0, max_new_tokens=32), text=PROMPT,
            videos=[ref],
        )  # fmt: skip
        (seq,) = asyncio.run(svc.tokenize_async(req))
        self.ids, self.images = seq.input_ids, seq.images

    def new_seq(self, key: str) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), SamplingParams(temperature=0.0), [],
                           self.images)  # fmt: skip


def test_engine_generate_with_videos(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    from fovea import Engine

    runner = make_runner(tiny_qwen2_vl)
    at_2fps = greedy(runner, Expected(tiny_qwen2_vl, VideoRef(data=VIDEO)), "a")
    at_1fps = greedy(runner, Expected(tiny_qwen2_vl, VideoRef(data=VIDEO, fps=1.0)), "b")
    (tmp_path / "v.mp4").write_bytes(VIDEO)
    with Engine(
        dtype="float32",
        model_path=str(tiny_qwen2_vl),
        max_total_tokens=3000,
        chat_template="qwen2-vl",
        allowed_local_media_path=str(tmp_path),
        max_video_tokens=40,
    ) as llm:
        outs = llm.generate(
            [PROMPT] * 3,
            GREEDY,
            video_data=[VIDEO, str(tmp_path / "v.mp4"), {"data": VIDEO, "fps": 1.0}],
        )
        assert [o["output_ids"] for o in outs] == [at_2fps, at_2fps, at_1fps]
        with pytest.raises(ValueError, match="more than the 40-token limit"):
            llm.generate(PROMPT, GREEDY, video_data={"data": VIDEO, "fps": 10.0})
        with pytest.raises(ValueError, match="the prompt has 0 video placeholders but 1 videos"):
            llm.generate("no placeholder", GREEDY, video_data=VIDEO)
        with pytest.raises(ValueError, match="a video dict is malformed"):
            llm.generate(PROMPT, GREEDY, video_data={"data": VIDEO, "fps": "fast"})
        stats = llm.get_server_info()["scheduler"]
        assert stats["free_slots"] + stats["tree_slots"] == stats["total_slots"]
