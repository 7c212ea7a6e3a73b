"""Synthetic videos for the video workload (W7), and Fovea's own decode path timed on them.

Video n is `seconds` long at `fps`, `width`x`height`, H.264 in MP4: a square moving over a
gradient whose colours depend on n (so distinct ids are distinct files and none is a cache hit
of another). Sent inline as `data:video/mp4;base64,` URIs.
"""

from __future__ import annotations

import base64
import functools
import io
import time

import numpy as np


@functools.lru_cache(maxsize=64)
def video_bytes(n: int, seconds: float, width: int, height: int, fps: int) -> bytes:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    side = max(8, min(width, height) // 5)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for i in range(round(seconds * fps)):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = (xx + 7 * n + i) % 256
            img[..., 1] = (yy + 13 * n) % 256
            img[..., 2] = (xx + yy + 29 * n - 2 * i) % 256
            x0, y0 = (5 * i) % (width - side), (3 * i) % (height - side)
            img[y0 : y0 + side, x0 : x0 + side] = (250, 250, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_uri(n: int, seconds: float, width: int, height: int, fps: int) -> str:
    data = video_bytes(n, seconds, width, height, fps)
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def decode_ms_per_video_second(
    seconds: float, width: int, height: int, fps: int, sample_fps: float = 2.0, repeats: int = 3
) -> float:
    """Fovea's probe + decode of the frames a Qwen2-VL plan samples at `sample_fps` (the server's
    path, tokenizer_service/video.py), best of `repeats`, in ms per second of video."""
    from fovea.tokenizer_service.video import (
        VideoLimits,
        decode,
        probe,
        qwen_num_frames,
        sample_indices,
    )

    data = video_bytes(-1, seconds, width, height, fps)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        meta = probe(data, VideoLimits())
        n = qwen_num_frames(meta, sample_fps, 768, 4, 2)
        decode(data, meta, sample_indices(meta.frames, n), 600.0)
        best = min(best, time.perf_counter() - t)
    return round(best * 1000 / seconds, 3)
