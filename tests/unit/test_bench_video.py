"""The video workload (W7) of bench/serving.py: request bodies, video ids (cold vs repeat), the
synthetic videos' metadata, and the report's video fields."""

from __future__ import annotations

from fovea.bench.prompts import Prompt
from fovea.bench.serving import Result, parse_args, report, request_body, video_of
from fovea.bench.video_source import video_bytes
from fovea.tokenizer_service.video import VideoLimits, probe

ARGS = [
    "--model", "m", "--tokenizer", "t", "--videos", "1", "--video-seconds", "1",
    "--video-size", "64x48", "--video-fps", "8", "--distinct-videos", "2", "--num-prompts", "4",
]  # fmt: skip


def test_request_body_and_video_ids() -> None:
    args = parse_args(ARGS)
    assert args.endpoint == "chat" and args.video_wh == (64, 48)
    assert [video_of(args, i)[1] for i in range(4)] == [0, 1, 0, 1]
    assert video_of(args, -1)[1] == -1  # warm-up videos are none of the timed ones
    url, _ = video_of(args, 0)
    assert url.startswith("data:video/mp4;base64,")
    body = request_body(args, Prompt("hi", [1]), 8, (), url)
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "hi"},
    ]}]  # fmt: skip


def test_synthetic_video_metadata() -> None:
    meta = probe(video_bytes(3, 1.0, 64, 48, 8), VideoLimits())
    assert (meta.frames, meta.fps, meta.width, meta.height) == (8, 8.0, 64, 48)
    assert video_bytes(3, 1.0, 64, 48, 8) != video_bytes(4, 1.0, 64, 48, 8)


def test_report_splits_cold_and_repeat_ttft() -> None:
    args = parse_args(ARGS)
    results = [
        Result(ok=True, ttft_s=t, e2e_s=1.0, output_tokens=8, first_video=first)
        for t, first in [(0.4, True), (0.6, True), (0.1, False), (0.1, False)]
    ]
    out = report(args, "x", results, 2.0)
    assert out["ttft_cold_ms"]["p50"] == 500.0 and out["ttft_repeat_ms"]["p50"] == 100.0
    assert out["repeat_over_cold_ttft_p50"] == 0.2
    assert out["ttft_p50_ms_per_video_second"] == 250.0
    assert out["decode_ms_per_video_second"] > 0
