"""Videos in the tokenizer service: metadata probing and its limits, decoding only the planned
frames, the Qwen plan (fps sampling, the token budget: sampled down, or refused naming the
pinned field), placeholder runs, video parts in chat messages, and the media rules for videos
(data URI types, local paths, redirects re-checked)."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from hostile_videos import GOOD_MP4, GOOD_WEBM, truncated_webm
from video_helpers import decode_all, make_video

from fovea.common.messages import ChatMessage, VideoRef
from fovea.tokenizer_service.chat_templates import ChatRenderError, video_refs
from fovea.tokenizer_service.media import MediaError, MediaLoader, MediaPolicy
from fovea.tokenizer_service.processors.qwen2_vl_video import Qwen2VLVideo
from fovea.tokenizer_service.video import VideoLimits, VideoMeta, decode, probe, sample_indices
from fovea.tokenizer_service.video_input import expand_runs, load_video, run_offsets

LIMITS = VideoLimits()


def test_probe_reads_the_header() -> None:
    assert probe(GOOD_MP4, LIMITS) == VideoMeta(40, 10.0, 64, 48, 4.0, "h264", False)
    # WebM declares no frame count: duration * rate stands in for it.
    assert probe(GOOD_WEBM, LIMITS) == VideoMeta(40, 10.0, 64, 48, 4.0, "vp9", True)


def test_probe_limits() -> None:
    with pytest.raises(MediaError, match=r"^video is 4.0 s long, more than the 3-second limit"):
        probe(GOOD_MP4, VideoLimits(max_seconds=3))
    with pytest.raises(MediaError, match=r"64x48 = 3072 pixels, more than the 3000-pixel limit"):
        probe(GOOD_MP4, VideoLimits(max_pixels=3000))
    with pytest.raises(MediaError, match=r"^video file is empty$"):
        probe(b"", LIMITS)


def test_decode_returns_the_planned_frames_only() -> None:
    everything, _ = decode_all(GOOD_MP4)
    meta = probe(GOOD_MP4, LIMITS)
    frames = decode(GOOD_MP4, meta, [0, 5, 5, 39], 10.0)
    assert frames.dtype == np.uint8 and frames.shape == (4, 48, 64, 3)
    assert np.array_equal(frames, everything[[0, 5, 5, 39]])


def test_decode_refuses_a_file_that_ends_early() -> None:
    data = truncated_webm()
    meta = probe(data, LIMITS)  # the header is intact
    assert meta.frames == 40 and meta.estimated
    with pytest.raises(MediaError, match=r"^video is truncated or corrupt: it declares 40 frames"):
        decode(data, meta, [0, 10, 20, 35], 10.0)


def test_sample_indices_are_transformers() -> None:
    # torch.arange(0, total, total / n).int(), checked by hand.
    assert sample_indices(23, 4) == [0, 5, 11, 17]
    assert sample_indices(200, 24)[:6] == [0, 8, 16, 25, 33, 41]
    assert sample_indices(7, 6) == [0, 1, 2, 3, 4, 5]


def _meta(frames: int, fps: float, w: int = 64, h: int = 48) -> VideoMeta:
    return VideoMeta(frames, fps, w, h, frames / fps, "h264")


# The tiny checkpoints' pixel range: 64x48 frames resize to 56x56, 4 tokens per 2 frames.
QWEN = Qwen2VLVideo(min_pixels=56 * 56, max_pixels=28 * 28 * 64)


def test_qwen_plan_samples_at_fps() -> None:
    plan = QWEN.plan(_meta(40, 10), VideoRef(url="v"), LIMITS)  # 4 s at 2 fps: 8 frames
    assert plan.indices == [0, 5, 10, 15, 20, 25, 30, 35]
    assert (plan.height, plan.width, plan.num_tokens) == (56, 56, 16)
    assert plan.sampled_fps == 2.0 and plan.variant == b"qwen-video:8:56x56"
    # min_frames 4 wins over a short video's fps count; max_frames wins over both.
    assert len(QWEN.plan(_meta(23, 10), VideoRef(url="v"), LIMITS).indices) == 4
    assert len(QWEN.plan(_meta(40, 10), VideoRef(url="v", max_frames=2), LIMITS).indices) == 2


def test_qwen_plan_over_the_budget() -> None:
    limits = VideoLimits(max_tokens=48)
    long = _meta(400, 10)  # 40 s: 80 frames at 2 fps, 160 tokens
    plan = QWEN.plan(long, VideoRef(url="v"), limits)
    assert (len(plan.indices), plan.num_tokens) == (24, 48)  # sampled down to fit
    for ref, param in [
        (VideoRef(url="v", fps=2.0), "fps"),
        (VideoRef(url="v", max_frames=40), "max_frames"),
    ]:
        with pytest.raises(MediaError) as info:
            QWEN.plan(long, ref, limits)
        assert info.value.param == param
        assert "more than the 48-token limit (--max-video-tokens)" in info.value.message
    with pytest.raises(MediaError) as info:  # one step alone is over: only pixels can help
        QWEN.plan(_meta(40, 10, 640, 480), VideoRef(url="v", max_pixels=640 * 480), limits)
    assert info.value.param == "max_pixels"
    with pytest.raises(MediaError) as info:
        QWEN.plan(long, VideoRef(url="v", max_frames=800), limits)
    assert info.value.param == "max_frames" and "--max-video-frames" in info.value.message


def test_qwen_preprocess_layout() -> None:
    meta = probe(GOOD_MP4, LIMITS)
    plan = QWEN.plan(meta, VideoRef(url="v"), LIMITS)
    out = QWEN.preprocess(decode(GOOD_MP4, meta, plan.indices, 10.0), plan)
    assert out.grid == [4, 4, 4] and out.num_tokens == 16
    assert out.pixel_values.shape == (64, 3 * 2 * 14 * 14)
    assert out.pixel_values.dtype == np.float32 and out.pixel_values.flags.c_contiguous
    assert out.second_per_grid_t == 1.0  # 2 frames per step at 2 sampled frames a second


def test_placeholder_runs() -> None:
    V = 9
    assert expand_runs([1, V, 2, V], V, [3, 2]) == [1, V, V, V, 2, V, V]
    assert run_offsets([1, V, V, V, V, V, 2], V, [3, 2]) == [1, 4]  # touching runs
    with pytest.raises(ValueError):
        expand_runs([1, V], V, [3, 2])


def test_video_parts_in_messages() -> None:
    msgs = [
        ChatMessage("user", [
            {"type": "video_url", "video_url": {"url": "a.mp4", "fps": 1, "max_frames": 8}},
            {"type": "text", "text": "hi"},
            {"type": "video_url", "video_url": "b.mp4", "max_pixels": 1000.0},
        ]),
    ]  # fmt: skip
    assert video_refs(msgs) == [
        VideoRef(url="a.mp4", fps=1.0, max_frames=8),
        VideoRef(url="b.mp4", max_pixels=1000),
    ]
    for bad, message in [
        ({"fps": "x"}, "video fps must be a positive number, got 'x'"),
        ({"max_frames": 2.5}, "video max_frames must be a positive integer, got 2.5"),
        ({"min_pixels": 0}, "video min_pixels must be a positive integer, got 0"),
    ]:
        part = {"type": "video_url", "video_url": {"url": "a.mp4", **bad}}
        with pytest.raises(ChatRenderError) as info:
            video_refs([ChatMessage("user", [part])])
        assert info.value.message == message


def _read(policy: MediaPolicy, url: str, client: httpx.AsyncClient | None = None) -> bytes:
    async def main() -> bytes:
        loader = MediaLoader(policy, client=client)
        try:
            return await loader.read_bytes(url, None, policy.video)
        finally:
            await loader.aclose()

    return asyncio.run(main())


def _refusal(policy: MediaPolicy, url: str, client: httpx.AsyncClient | None = None) -> str:
    with pytest.raises(MediaError) as info:
        _read(policy, url, client)
    return info.value.message


def test_media_rules_for_videos(tmp_path: Path) -> None:
    policy = MediaPolicy(allowed_local_path=str(tmp_path), max_video_bytes=len(GOOD_MP4))
    encoded = base64.b64encode(GOOD_MP4).decode()
    assert _read(policy, f"data:video/mp4;base64,{encoded}") == GOOD_MP4
    assert _refusal(policy, f"data:image/png;base64,{encoded}") == (
        "data URI media type 'image/png' is not a video type; expected video/mp4, video/webm, "
        "video/quicktime, video/x-matroska, video/x-msvideo, video/mpeg or video/ogg"
    )
    (tmp_path / "v.mp4").write_bytes(GOOD_MP4)
    assert _read(policy, str(tmp_path / "v.mp4")) == GOOD_MP4
    assert _read(policy, f"file://{tmp_path}/v.mp4") == GOOD_MP4
    assert _refusal(policy, "/etc/hostname") == (
        "video path /etc/hostname is outside --allowed-local-media-path"
    )
    (tmp_path / "big.mp4").write_bytes(GOOD_MP4 + b"x")
    assert _refusal(policy, str(tmp_path / "big.mp4")) == (
        f"video file {tmp_path}/big.mp4 is larger than the {len(GOOD_MP4)}-byte limit "
        "(--max-video-bytes)"
    )


def test_each_redirect_hop_of_a_video_url_is_rechecked() -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://10.0.0.7/v.mp4"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    assert _refusal(MediaPolicy(), "http://1.1.1.1/v.mp4", client) == (
        "video URL host 10.0.0.7 resolves to a private or local address (10.0.0.7); start the "
        "server with --allow-private-media-urls to allow it"
    )
    assert seen == ["http://1.1.1.1/v.mp4"]


def test_decoding_runs_in_the_pool_not_on_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import fovea.tokenizer_service.video_input as video_input

    threads: list[str] = []
    real = video_input.decode

    def spy(*args: object) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(video_input, "decode", spy)
    loader = MediaLoader(MediaPolicy())
    data = make_video(12, fps=4)
    file_hash, processed = asyncio.run(load_video(loader, QWEN, VideoRef(data=data), LIMITS))
    assert threads and threads[0].startswith("video-decode")
    assert processed.grid == [3, 4, 4] and len(file_hash) == 32


def test_frames_marked_video_are_one_video() -> None:
    from fovea.tokenizer_service.chat_templates import image_refs, messages_to_dicts

    def frame(url: str) -> dict[str, object]:
        return {"type": "image_url", "image_url": {"url": url}, "modalities": "video"}

    still = {"type": "image_url", "image_url": {"url": "s.png"}}
    msgs = [
        ChatMessage("user", [
            frame("f1"), frame("f2"), {"type": "text", "text": "and"}, still, frame("g1"),
        ]),
    ]  # fmt: skip
    assert video_refs(msgs) == [VideoRef(frames=["f1", "f2"]), VideoRef(frames=["g1"])]
    assert [r.url for r in image_refs(msgs)] == ["s.png"]
    (rendered,) = messages_to_dicts(msgs, None, None)
    assert [p["type"] for p in rendered["content"]] == [
        "video", "text", "image_url", "video"
    ]  # fmt: skip
