"""A request's videos, from reference to tower input, and their placeholder runs in the prompt.

Per video: the bytes are read under the media policy (--max-video-bytes; the same SSRF-safe
fetcher, data URI and local-path rules as images), hashed, probed for metadata, planned by the
family's VideoProcessor (frame indices, frame size, token count: the budget is enforced here,
before decoding), decoded in video.DECODE_POOL and preprocessed in a thread. A video's cache key
is its bytes' hash mixed with the plan's variant (tokenizer.image_hash), so the prefix cache
and the encoder cache treat a video exactly like an image.
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from fovea.common.messages import ImageRef, VideoRef
from fovea.tokenizer_service.media import MediaError, MediaLoader
from fovea.tokenizer_service.processors.base import ProcessedImage, VideoProcessor
from fovea.tokenizer_service.video import DECODE_POOL, VideoLimits, decode, probe


async def load_video(
    media: MediaLoader, processor: VideoProcessor, ref: VideoRef, limits: VideoLimits
) -> tuple[bytes, ProcessedImage]:
    """(the file's blake2b hash, the processed video). Raises MediaError for a bad video."""
    if ref.frames is not None:
        return await _load_frames(media, processor, ref.frames, limits)
    data = await media.read_bytes(ref.url, ref.data, media.policy.video)
    file_hash = hashlib.blake2b(data, digest_size=32).digest()
    loop = asyncio.get_running_loop()
    meta = await loop.run_in_executor(DECODE_POOL, probe, data, limits)
    plan = processor.plan(meta, ref, limits)
    work = loop.run_in_executor(
        DECODE_POOL, decode, data, meta, plan.indices, limits.decode_timeout_s
    )
    try:
        # decode checks its own deadline between frames; this one also covers a decoder
        # stuck inside one FFmpeg call (its thread is left to finish; the request is not).
        frames = await asyncio.wait_for(work, limits.decode_timeout_s + 5)
    except TimeoutError:
        raise MediaError(f"decoding the video took over {limits.decode_timeout_s:g} s") from None
    processed = await asyncio.to_thread(processor.preprocess, frames, plan)
    return file_hash, processed


async def _load_frames(
    media: MediaLoader, processor: VideoProcessor, urls: list[str], limits: VideoLimits
) -> tuple[bytes, ProcessedImage]:
    """A video given as image URLs, one per frame: each loaded as an image (image rules), all
    of one size; keyed by the hash of the frames' hashes."""
    if not urls:
        raise MediaError("a video given as frames has none")
    if len(urls) > limits.max_frames:
        raise MediaError(
            f"a video of {len(urls)} frames exceeds --max-video-frames ({limits.max_frames})"
        )
    loaded = await media.load_all([ImageRef(url=u) for u in urls], count=False)
    sizes = {im.image.size for im in loaded}
    if len(sizes) != 1:
        raise MediaError(f"the frames of a video differ in size: {sorted(sizes)}")
    ((width, height),) = sizes
    plan = processor.frames_plan(len(loaded), height, width, limits)
    frames = np.stack([np.asarray(im.image) for im in loaded])  # [n, H, W, 3] uint8
    processed = await asyncio.to_thread(processor.preprocess, frames, plan)
    digest = hashlib.blake2b(b"frames" + b"".join(im.hash for im in loaded), digest_size=32)
    return digest.digest(), processed


async def load_videos(
    media: MediaLoader, processor: VideoProcessor, refs: list[VideoRef], limits: VideoLimits
) -> list[tuple[bytes, ProcessedImage]]:
    """load_video for each ref, concurrently; the first refusal cancels the rest."""
    tasks = [asyncio.create_task(load_video(media, processor, r, limits)) for r in refs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def expand_runs(ids: list[int], token: int, counts: list[int]) -> list[int]:
    """The k-th `token` in ids widened to counts[k] copies (counts pair one to one)."""
    out: list[int] = []
    k = 0
    for t in ids:
        if t == token:
            out.extend([token] * counts[k])
            k += 1
        else:
            out.append(t)
    if k != len(counts):
        raise ValueError(f"{k} placeholders for {len(counts)} videos")
    return out


def run_offsets(ids: list[int], token: int, counts: list[int]) -> list[int]:
    """Where each of the runs of counts[k] `token`s starts, in order (runs may touch)."""
    offsets: list[int] = []
    at = 0
    for n in counts:
        at = ids.index(token, at)
        offsets.append(at)
        at += n
    return offsets
