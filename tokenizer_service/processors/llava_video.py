"""LLaVA-OneVision video preprocessing, equal to transformers' `LlavaOnevisionVideoProcessor`
with `do_sample_frames=True`: n = max(1, int(total / video_fps * fps)) frames (fewer under
max_frames or the token budget), indices `arange(n) * total // n` (uniform), each frame resized
to the processor's size (torch's antialiased uint8 bicubic, torchvision's bit for bit) and
rescaled and normalized as transformers fuses them. pixel_values [n, C, H, W]: the tower sees
each frame as one tile; the model pools each frame's patch grid 2x2 (bilinear) and appends one
image_newline, so a video takes n * ceil(p / 2)² + 1 placeholder tokens (p patches a side).
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

from fovea.common.families.llava import LlavaSpec
from fovea.common.messages import VideoRef
from fovea.tokenizer_service.media import MediaError
from fovea.tokenizer_service.processors.base import (
    CHANNELS,
    PixelOptions,
    ProcessedImage,
    VideoPlan,
    VideoProcessor,
    resize_uint8,
)
from fovea.tokenizer_service.processors.qwen2_vl_video import fused_value_table
from fovea.tokenizer_service.video import VideoLimits, VideoMeta, video_preprocessor_config

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIXELS = PixelOptions(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # the video processor's class defaults


class LlavaOnevisionVideo(VideoProcessor):
    def __init__(
        self,
        spec: LlavaSpec,
        *,
        video_token_id: int,
        height: int = 384,
        width: int = 384,
        pixels: PixelOptions = PIXELS,
    ) -> None:
        self.spec = spec
        self.video_token_id = video_token_id
        self.height, self.width = height, width
        self.pixels = pixels
        self._table = fused_value_table(pixels)  # [C, 256]
        side = spec.patches_per_side
        self.tokens_per_frame = math.ceil(side / 2) ** 2

    @classmethod
    def from_pretrained(
        cls, model_dir: str, spec: LlavaSpec, video_token_id: int
    ) -> LlavaOnevisionVideo:
        """From video_preprocessor_config.json, else preprocessor_config.json (transformers'
        fallback); the size must be the tower's image size (each frame is one tile)."""
        pp = video_preprocessor_config(model_dir)
        size = pp.get("size") or {}
        height = int(size.get("height") or size.get("shortest_edge") or 384)
        width = int(size.get("width") or size.get("shortest_edge") or 384)
        if (height, width) != (spec.image_size, spec.image_size):
            raise ValueError(
                f"the video processor's {width}x{height} frames do not fit the tower's "
                f"{spec.image_size}-pixel images"
            )
        return cls(
            spec, video_token_id=video_token_id, height=height, width=width,
            pixels=PIXELS.updated(pp),
        )  # fmt: skip

    def plan(self, meta: VideoMeta, request: VideoRef, limits: VideoLimits) -> VideoPlan:
        fps = request.fps if request.fps is not None else limits.default_fps
        if request.max_frames is not None and request.max_frames > limits.max_frames:
            raise MediaError(
                f"max_frames {request.max_frames} exceeds the server's limit of "
                f"{limits.max_frames} frames (--max-video-frames)",
                "max_frames",
            )
        n = max(1, int(meta.frames / meta.fps * fps))
        n = min(n, request.max_frames or limits.max_frames, limits.max_frames)
        per = self.tokens_per_frame
        if n * per + 1 > limits.max_tokens:
            pinned = [k for k in ("fps", "max_frames") if getattr(request, k) is not None]
            if pinned:
                raise MediaError(
                    f"the video takes {n * per + 1} tokens at the requested "
                    f"{' and '.join(pinned)} ({n} frames), more than the {limits.max_tokens}-"
                    f"token limit (--max-video-tokens); lower {' or '.join(pinned)}",
                    pinned[0],
                )
            n = (limits.max_tokens - 1) // per
            if n < 1:
                raise MediaError(
                    f"one frame takes {per + 1} tokens, more than the {limits.max_tokens}-token "
                    "limit (--max-video-tokens)"
                )
        indices = [int(i) for i in np.arange(n, dtype=np.int64) * meta.frames // n]
        return VideoPlan(
            indices,
            self.height,
            self.width,
            n * per + 1,
            f"onevision-video:{n}".encode(),
            n / meta.frames * meta.fps,
        )

    def frames_plan(self, n: int, height: int, width: int, limits: VideoLimits) -> VideoPlan:
        tokens = n * self.tokens_per_frame + 1
        if n > limits.max_frames or tokens > limits.max_tokens:
            raise MediaError(
                f"a video of {n} frames ({tokens} tokens) exceeds --max-video-frames "
                f"({limits.max_frames}) or --max-video-tokens ({limits.max_tokens})"
            )
        # No frame rate is known; the plan's rate only marks the input as a video.
        return VideoPlan(
            list(range(n)), self.height, self.width, tokens, f"onevision-frames:{n}".encode(), 1.0
        )

    def preprocess(self, frames: np.ndarray, plan: VideoPlan) -> ProcessedImage:
        """frames [n, H, W, 3] uint8 -> pixel_values [n, C, height, width] float32."""
        if (frames.shape[1], frames.shape[2]) != (plan.height, plan.width):
            frames = np.stack([
                resize_uint8(
                    PIL.Image.fromarray(f), plan.width, plan.height, self.pixels.resampling,
                    "torch",
                )
                for f in frames
            ])  # fmt: skip
        planes = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))  # [n, C, H, W] uint8
        out = np.empty(planes.shape, dtype=np.float32)
        for c in range(CHANNELS):
            np.take(self._table[c], planes[:, c], out=out[:, c], mode="clip")
        return ProcessedImage(
            pixel_values=out,
            grid=[len(frames), plan.height, plan.width],
            num_tokens=plan.num_tokens,
            variant=plan.variant,
            second_per_grid_t=1.0 / plan.sampled_fps,  # one frame per step
        )
