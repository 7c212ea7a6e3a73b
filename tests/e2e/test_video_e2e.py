"""Videos against a real server (tiny Qwen2-VL, --chat-template qwen2-vl): a good video is
answered, the same video again is a prefix hit that runs no encoder, each of the hostile
videos in BAD_VIDEOS gets a 4xx naming what to change, and the server keeps serving with no
KV slot leaked. The offline Engine takes video_data= beside image_data=."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from hostile_cases import CHAT, chat
from hostile_videos import (
    GOOD_MP4,
    GOOD_WEBM,
    audio_only,
    bomb_rate,
    frames_8k,
    garbage,
    ten_hours,
    truncated_mp4,
    truncated_webm,
    unknown_codec,
)
from server_harness import Server, serve_module
from video_helpers import make_video

pytestmark = pytest.mark.slow

MAX_VIDEO_BYTES = 200_000
FLAGS = (
    "--chat-template", "qwen2-vl", "--served-model-name", "tiny-vl", "--context-length", "512",
    "--max-image-pixels", "16000000", "--max-video-bytes", str(MAX_VIDEO_BYTES),
    "--max-video-tokens", "48", "--max-video-frames", "32", "--max-video-seconds", "60",
)  # fmt: skip


def uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video(url: str, **fields: Any) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url, **fields}}


def with_video(url: str, **fields: Any) -> dict[str, Any]:
    return chat([video(url, **fields), {"type": "text", "text": "What happens?"}])


class BadVideo(NamedTuple):
    body: dict[str, Any]
    message: str  # a substring of the error message
    param: str = "messages"
    status: int = 400


BAD_VIDEOS: dict[str, BadVideo] = {
    "truncated_mp4": BadVideo(with_video(uri(truncated_mp4())), "video could not be read"),
    "truncated_webm": BadVideo(
        with_video(uri(truncated_webm(), "video/webm")), "video is truncated or corrupt"
    ),
    "zero_length": BadVideo(with_video("data:video/mp4;base64,"), "data URI has an empty payload"),
    "garbage": BadVideo(with_video(uri(garbage())), "video could not be read"),
    "ten_hours": BadVideo(with_video(uri(ten_hours())), "more than the 60-second limit"),
    "8k_frames": BadVideo(with_video(uri(frames_8k())), "7680x4320 = 33177600 pixels"),
    "bomb_frame_rate": BadVideo(with_video(uri(bomb_rate())), "frame rate 10000 is not in"),
    "audio_only": BadVideo(with_video(uri(audio_only())), "no video stream"),
    "unknown_codec": BadVideo(with_video(uri(unknown_codec())), "codec is unknown"),
    "one_frame": BadVideo(with_video(uri(make_video(1))), "video has 1 frame(s)"),
    "wrong_mime_image": BadVideo(
        with_video(uri(GOOD_MP4, "image/png")), "'image/png' is not a video type"
    ),
    "wrong_mime_text": BadVideo(
        with_video(uri(GOOD_MP4, "text/plain")), "'text/plain' is not a video type"
    ),
    "video_as_image": BadVideo(
        chat([{"type": "image_url", "image_url": {"url": uri(GOOD_MP4, "image/png")}}]),
        "image could not be decoded",
    ),
    "over_max_video_bytes": BadVideo(
        with_video(uri(garbage(MAX_VIDEO_BYTES + 1))), "--max-video-bytes"
    ),
    "private_address": BadVideo(
        with_video("http://127.0.0.1:9/v.mp4"), "resolves to a private or local address"
    ),
    "cloud_metadata_address": BadVideo(
        with_video("http://169.254.169.254/latest/v.mp4"), "private or local address"
    ),
    "local_path_not_allowed": BadVideo(with_video("/etc/passwd"), "local video paths are disabled"),
    "unsupported_scheme": BadVideo(
        with_video("ftp://example.com/v.mp4"), "unsupported video URL scheme 'ftp'"
    ),
    "pinned_fps_over_token_budget": BadVideo(
        with_video(uri(GOOD_MP4), fps=10), "more than the 48-token limit", "fps"
    ),
    "max_frames_over_the_cap": BadVideo(
        with_video(uri(GOOD_MP4), max_frames=33), "--max-video-frames", "max_frames"
    ),
    "min_pixels_over_max_pixels": BadVideo(
        with_video(uri(GOOD_MP4), min_pixels=9000, max_pixels=4000),
        "exceeds max_pixels",
        "min_pixels",
    ),
    "negative_fps": BadVideo(
        with_video(uri(GOOD_MP4), fps=-1), "fps: Input should be greater than 0", "-"
    ),
}


@pytest.fixture(scope="module")
def server(tiny_qwen2_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_module(tiny_qwen2_vl, *FLAGS, logs=tmp_path_factory)


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base + CHAT, json=body, timeout=120)


def ask(server: Server, url: str, **fields: Any) -> dict[str, Any]:
    body = {**with_video(url, **fields), "temperature": 0, "ignore_eos": True}
    r = post(server, body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    return out


def test_a_video_is_answered_and_again_is_a_hit_without_encoding(server: Server) -> None:
    server.wait_idle()
    encoded = server.stats()["images_encoded"]
    first = ask(server, uri(GOOD_MP4))
    assert server.stats()["images_encoded"] == encoded + 1
    again = ask(server, uri(GOOD_MP4))
    # Everything but the last prompt token is cached; the video is not encoded again.
    prompt = first["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt - 1
    assert server.stats()["images_encoded"] == encoded + 1
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    # Sampled differently (1 fps instead of 2), the same bytes are another input.
    ask(server, uri(GOOD_MP4), fps=1)
    assert server.stats()["images_encoded"] == encoded + 2


def test_webm_and_body_level_fields(server: Server) -> None:
    out = ask(server, uri(GOOD_WEBM, "video/webm"))
    body = {**with_video(uri(GOOD_MP4)), "fps": 10, "temperature": 0}
    r = post(server, body)  # the body's fps reaches the part: over the budget, pinned
    assert r.status_code == 400 and r.json()["error"]["param"] == "fps", r.text
    assert out["usage"]["prompt_tokens"] > 0


def test_over_the_budget_unpinned_is_sampled_down(server: Server) -> None:
    # 40 frames of 64x48 at 2 fps: 8 frames, 4 steps of 4 tokens = 16; a 20-second video at
    # 2 fps wants 40 frames, 32 under --max-video-frames = 64 tokens > 48: sampled down to
    # 24 frames (48 tokens).
    long = make_video(200, fps=10)
    short = ask(server, uri(GOOD_MP4))["usage"]["prompt_tokens"]
    thinned = ask(server, uri(long))["usage"]["prompt_tokens"]
    assert thinned - short == 48 - 16


@pytest.mark.parametrize("case", list(BAD_VIDEOS.values()), ids=list(BAD_VIDEOS))
def test_hostile_video_gets_a_4xx_and_the_server_goes_on(server: Server, case: BadVideo) -> None:
    r = post(server, case.body)
    assert r.status_code == case.status, r.text
    err = r.json()["error"]
    assert case.message in err["message"], err["message"]
    if case.param != "-":
        assert err["param"] == case.param
    ask(server, uri(GOOD_MP4))


def test_the_table_is_large_and_no_slot_leaks(server: Server) -> None:
    assert len(BAD_VIDEOS) >= 20
    s = server.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]
