"""Reading videos with PyAV: the container's metadata first (nothing decoded), then only the
frames a plan asks for, as RGB uint8 arrays.

Every refusal is a `MediaError` (HTTP 400). What bounds the work a hostile file can cause:

- its bytes were already capped by --max-video-bytes when fetched (tokenizer_service/media.py);
- `probe` reads the header only and refuses, before any frame is decoded: no video stream (an
  audio-only file), a codec this FFmpeg cannot decode, frames over --max-image-pixels (8K), a
  duration over --max-video-seconds, a frame rate over `MAX_FPS` or a frame count that the
  duration and rate cannot explain (a bomb-like count);
- `decode` stops after the last frame the plan needs, refuses a frame whose size differs from
  the header's, checks a wall-clock deadline between frames, and refuses a file that ends before
  the frames its header declared (truncated).

Decoding runs in `DECODE_POOL`, a small thread pool (PyAV releases the GIL while FFmpeg works),
never on the event loop; the caller also waits with a timeout, so a decoder stuck inside FFmpeg
costs a thread for a while but never the request.

Frame counts and indices follow transformers' PyAV reader (video_utils.read_video_pyav): the
stream's declared frame count and average rate are the metadata, and frame i is the i-th frame
the decoder yields. A container that declares no count (WebM) gets duration * rate instead.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fovea.common.config import ServerArgs
from fovea.tokenizer_service.media import MediaError

MAX_FPS = 240.0  # the fastest common capture (slow motion): a header claiming more is refused
# A declared frame count may exceed duration * rate by this factor (variable-rate files).
_COUNT_SLACK = 1.5
DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="video-decode")


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float = 600.0
    max_frames: int = 768  # most frames sampled from one video
    max_tokens: int = 16384  # most placeholder tokens one video may take
    max_pixels: int = 50_000_000  # per frame (--max-image-pixels)
    default_fps: float = 2.0
    decode_timeout_s: float = 60.0

    @classmethod
    def from_args(cls, args: ServerArgs) -> VideoLimits:
        return cls(
            max_seconds=args.max_video_seconds,
            max_frames=args.max_video_frames,
            max_tokens=args.max_video_tokens,
            max_pixels=args.max_image_pixels,
            default_fps=args.video_fps,
        )


@dataclass(frozen=True)
class VideoMeta:
    """What the container says, before decoding."""

    frames: int  # declared (or estimated from duration * fps)
    fps: float  # the stream's average rate
    width: int
    height: int
    duration_s: float
    codec: str
    estimated: bool = False  # frames came from duration * fps, not from the header


def _open(data: bytes) -> Any:
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception as e:  # FFmpeg raises a dozen error types on malformed input
        raise MediaError(f"video could not be read: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    # FFmpeg errors read "[Errno N] message: '<file>'"; the message alone says it.
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def probe(data: bytes, limits: VideoLimits) -> VideoMeta:
    """The video stream's metadata, checked against `limits`; no frame is decoded."""
    if not data:
        raise MediaError("video file is empty")
    with _open(data) as container:
        if not container.streams.video:
            raise MediaError("video has no video stream (an audio-only file?)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.is_decoder or not getattr(ctx, "name", ""):
            raise MediaError("video codec is unknown or cannot be decoded")
        width, height = int(stream.width or 0), int(stream.height or 0)
        if width <= 0 or height <= 0:
            raise MediaError(f"video frames have no size ({width}x{height})")
        if width * height > limits.max_pixels:
            raise MediaError(
                f"video frames are {width}x{height} = {width * height} pixels, more than the "
                f"{limits.max_pixels}-pixel limit (--max-image-pixels)"
            )
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if not 0 < rate <= MAX_FPS:
            raise MediaError(f"video frame rate {rate:g} is not in (0, {MAX_FPS:g}]")
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # AV_TIME_BASE
        else:
            duration = 0.0
        declared = int(stream.frames or 0)
        if duration <= 0 and declared > 0:
            duration = declared / rate
        if duration <= 0:
            raise MediaError("video declares neither a duration nor a frame count")
        if duration > limits.max_seconds:
            raise MediaError(
                f"video is {duration:.1f} s long, more than the {limits.max_seconds:g}-second "
                "limit (--max-video-seconds)"
            )
        estimated = declared <= 0
        frames = max(1, round(duration * rate)) if estimated else declared
        if frames > _COUNT_SLACK * duration * rate + 2:
            raise MediaError(
                f"video declares {frames} frames in {duration:.1f} s at {rate:g} frames/s: "
                "refused as malformed"
            )
        return VideoMeta(frames, rate, width, height, duration, ctx.name, estimated)


def decode(data: bytes, meta: VideoMeta, indices: list[int], timeout_s: float) -> np.ndarray:
    """[len(indices), H, W, 3] uint8: the frames at `indices` (ascending, repeats allowed) of
    the first video stream, in RGB. Stops after the last index is reached."""
    if not indices:
        raise ValueError("no frames to decode")
    wanted: dict[int, int] = {}  # frame index -> times it is sampled
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    last = max(wanted)
    deadline = time.monotonic() + timeout_s
    frames: list[np.ndarray] = []
    seen = 0
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if time.monotonic() > deadline:
                    raise MediaError(f"decoding the video took over {timeout_s:g} s")
                if (frame.width, frame.height) != (meta.width, meta.height):
                    raise MediaError(
                        f"video frame {i} is {frame.width}x{frame.height}, not the "
                        f"{meta.width}x{meta.height} its header declares"
                    )
                if i in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    frames.extend([rgb] * wanted[i])
                if i >= last:
                    break
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(f"video could not be decoded: {_reason(e)}") from None
    missing = len(indices) - len(frames)
    if missing:
        # An estimated count (no header count) may overshoot by a little: the missing tail
        # takes the last frame decoded. A declared count the file does not reach: truncated.
        short = meta.frames - seen  # frames the estimate promised and the file lacks
        if not meta.estimated or not frames or short > max(2, meta.frames // 20):
            raise MediaError(
                f"video is truncated or corrupt: it declares {meta.frames} frames but "
                f"{seen} could be decoded"
            )
        frames.extend([frames[-1]] * missing)
    return np.stack(frames)


def video_preprocessor_config(model_dir: str) -> dict[str, Any]:
    """video_preprocessor_config.json, else preprocessor_config.json (transformers' fallback),
    else {}."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                config: dict[str, Any] = json.load(f)
            return config
    return {}


def sample_indices(total: int, num_frames: int) -> list[int]:
    """transformers' `torch.arange(0, total, total / num_frames).int()`, in float32 as torch
    computes it (the step is a Python float; arange accumulates in the default dtype)."""
    import torch

    return [int(i) for i in torch.arange(0, total, total / num_frames).int().tolist()]


def qwen_num_frames(
    meta: VideoMeta, fps: float, max_frames: int, min_frames: int, temporal_patch: int
) -> int:
    """Qwen2VLVideoProcessor.sample_frames' frame count for sampling at `fps`."""
    cap = math.floor(min(max_frames, meta.frames) / temporal_patch) * temporal_patch
    n = meta.frames / meta.fps * fps
    n = min(max(n, min_frames), cap, meta.frames)
    return math.floor(n / temporal_patch) * temporal_patch
