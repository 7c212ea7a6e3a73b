"""Qwen2-VL / Qwen2.5-VL video preprocessing, equal to transformers' `Qwen2VLVideoProcessor`
with `do_sample_frames=True` (frames sampled at `fps`, as qwen-vl-utils and the model cards do).

Sampling (sample_frames): n = total / video_fps * fps frames, clamped to [min_frames,
min(max_frames, total)] (max_frames wins), floored to a multiple of temporal_patch_size; frame
indices `arange(0, total, total / n)`. Every frame is resized to one `smart_resize` size with
torch's antialiased uint8 bicubic (torchvision's, bit for bit), padded to a multiple of
temporal_patch_size with the last frame, then cut into patches: grid [n / T, h / P, w / P],
each patch holding T consecutive frames. Rescale and normalize are fused as transformers fuses
them ((x - mean * 255) / (std * 255) in float32), which is a per-channel lookup table on uint8.

The token budget (--max-video-tokens) is enforced here, from the metadata alone: a plan over it
samples fewer frames, or is refused when the request pinned fps or max_frames.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image

from fovea.common.messages import VideoRef
from fovea.tokenizer_service.media import MediaError
from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    PixelOptions,
    ProcessedImage,
    VideoPlan,
    VideoProcessor,
    per_channel,
    resize_uint8,
)
from fovea.tokenizer_service.processors.qwen2_vl import PIXELS, smart_resize
from fovea.tokenizer_service.video import (
    VideoLimits,
    VideoMeta,
    qwen_num_frames,
    sample_indices,
    video_preprocessor_config,
)

QWEN2_VL_VIDEO_TOKEN_ID = 151656  # <|video_pad|>


def fused_value_table(pixels: PixelOptions) -> np.ndarray:
    """[C, 256] float32: transformers' torchvision-backend rescale_and_normalize of each uint8
    value. With both steps on, they fuse: mean and std are scaled by 1 / rescale_factor in
    float32 and (x - mean) / std runs in float32 (not the image processors' two steps)."""
    if not (pixels.do_rescale and pixels.do_normalize):
        return pixels.value_table()
    scale = np.float32(1.0 / pixels.rescale_factor)
    mean = np.array(per_channel(pixels.image_mean, "image_mean"), np.float32) * scale
    std = np.array(per_channel(pixels.image_std, "image_std"), np.float32) * scale
    x = np.arange(256, dtype=np.float32)[None, :]
    return np.ascontiguousarray((x - mean[:, None]) / std[:, None], dtype=np.float32)


class Qwen2VLVideo(VideoProcessor):
    def __init__(
        self,
        *,
        video_token_id: int = QWEN2_VL_VIDEO_TOKEN_ID,
        min_pixels: int = 128 * 28 * 28,
        max_pixels: int = 28 * 28 * 768,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_frames: int = 4,
        max_frames: int = 768,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        self.video_token_id = video_token_id
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.min_frames, self.max_frames = min_frames, max_frames
        self.pixels = pixels
        self._table = fused_value_table(pixels)  # [C, 256]

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: dict[str, Any]) -> Qwen2VLVideo:
        """From video_preprocessor_config.json, else preprocessor_config.json (as transformers
        falls back), and config.json's video_token_id (top level or text_config)."""
        pp = video_preprocessor_config(model_dir)
        size = pp.get("size") or {}
        token = hf_config.get("video_token_id")
        if token is None:
            token = (hf_config.get("text_config") or {}).get("video_token_id")
        kwargs: dict[str, Any] = {
            "video_token_id": token,
            # min_pixels / max_pixels keys win over size, as in the processor's __init__.
            "min_pixels": pp.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": pp.get("max_pixels", size.get("longest_edge")),
            **{
                key: pp.get(key)
                for key in (
                    "patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"
                )
            },
        }  # fmt: skip
        return cls(**{k: v for k, v in kwargs.items() if v is not None}, pixels=PIXELS.updated(pp))

    def _size(self, meta: VideoMeta, min_pixels: int, max_pixels: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        if min_pixels > max_pixels:
            raise MediaError(
                f"min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels})", "min_pixels"
            )
        try:
            return smart_resize(meta.height, meta.width, factor, min_pixels, max_pixels)
        except ValueError as e:
            raise MediaError(f"video could not be processed: {e}") from None

    def plan(self, meta: VideoMeta, request: VideoRef, limits: VideoLimits) -> VideoPlan:
        T = self.temporal_patch_size
        fps = request.fps if request.fps is not None else limits.default_fps
        if request.max_frames is not None and request.max_frames > limits.max_frames:
            raise MediaError(
                f"max_frames {request.max_frames} exceeds the server's limit of "
                f"{limits.max_frames} frames (--max-video-frames)",
                "max_frames",
            )
        max_frames = min(
            self.max_frames, limits.max_frames, request.max_frames or limits.max_frames
        )
        height, width = self._size(
            meta,
            request.min_pixels if request.min_pixels is not None else self.min_pixels,
            request.max_pixels if request.max_pixels is not None else self.max_pixels,
        )
        per_step = (height // self.patch_size) * (width // self.patch_size) // self.merge_size**2
        n = qwen_num_frames(meta, fps, max_frames, self.min_frames, T)
        if n // T * per_step > limits.max_tokens:
            pinned = [k for k in ("fps", "max_frames") if getattr(request, k) is not None]
            if pinned:
                raise MediaError(
                    f"the video takes {n // T * per_step} tokens at the requested "
                    f"{' and '.join(pinned)} ({n} frames of {width}x{height}), more than the "
                    f"{limits.max_tokens}-token limit (--max-video-tokens); lower "
                    f"{' or '.join(pinned)} or max_pixels",
                    pinned[0],
                )
            max_frames = min(max_frames, limits.max_tokens // per_step * T)
            n = qwen_num_frames(meta, fps, max_frames, self.min_frames, T)
        if n < T:
            if meta.frames < T:
                raise MediaError(f"video has {meta.frames} frame(s); at least {T} are needed")
            raise MediaError(
                f"one step of {T} frames of {width}x{height} takes {per_step} tokens, more "
                f"than the {limits.max_tokens}-token limit (--max-video-tokens); lower max_pixels",
                "max_pixels",
            )
        variant = f"qwen-video:{n}:{height}x{width}".encode()
        # transformers' VideoMetadata.sampled_fps: frames kept per second of the source.
        sampled_fps = n / meta.frames * meta.fps
        return VideoPlan(
            sample_indices(meta.frames, n), height, width, n // T * per_step, variant, sampled_fps
        )

    def frames_plan(self, n: int, height: int, width: int, limits: VideoLimits) -> VideoPlan:
        T = self.temporal_patch_size
        meta = VideoMeta(n, 0.0, width, height, 0.0, "frames")
        h, w = self._size(meta, self.min_pixels, self.max_pixels)
        tokens = -(-n // T) * (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2
        if n > limits.max_frames or tokens > limits.max_tokens:
            raise MediaError(
                f"a video of {n} frames ({tokens} tokens) exceeds --max-video-frames "
                f"({limits.max_frames}) or --max-video-tokens ({limits.max_tokens})"
            )
        # No frame rate is known: transformers' VideoMetadata.sampled_fps then says 24.
        return VideoPlan(list(range(n)), h, w, tokens, f"qwen-frames:{n}:{h}x{w}".encode(), 24.0)

    def preprocess(self, frames: np.ndarray, plan: VideoPlan) -> ProcessedImage:
        """frames [n, H, W, 3] uint8 -> pixel_values [t*h*w, C*T*P*P], grid [t, h, w]."""
        P, M, T = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width = plan.height, plan.width
        if (frames.shape[1], frames.shape[2]) != (height, width):
            resized = [
                resize_uint8(PIL.Image.fromarray(f), width, height, self.pixels.resampling, "torch")
                for f in frames
            ]
            frames = np.stack(resized)
        if pad := -len(frames) % T:  # the last frame repeated, as transformers pads
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        gt, gh, gw = len(frames) // T, height // P, width // P
        # uint8 [gt, T, gh/M, M, P, gw/M, M, P, C] -> patch order [gt, gh/M, gw/M, M, M] with
        # each patch laid out (C, T, P, P), the Conv3d's input order.
        u8 = frames.reshape(gt, T, gh // M, M, P, gw // M, M, P, CHANNELS)
        u8 = np.ascontiguousarray(u8.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7))
        n = gt * gh * gw
        u8 = u8.reshape(n, CHANNELS, T * P * P)
        out = np.empty((n, CHANNELS, T * P * P), dtype=np.float32)
        for c in range(CHANNELS):
            np.take(self._table[c], u8[:, c], out=out[:, c], mode="clip")
        return ProcessedImage(
            pixel_values=out.reshape(n, CHANNELS * T * P * P),
            grid=[gt, gh, gw],
            num_tokens=n // (M * M),
            variant=plan.variant,
            second_per_grid_t=T / plan.sampled_fps,
        )
