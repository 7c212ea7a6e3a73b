"""The interface every model family's image processor implements.

A processor runs in the tokenizer process (numpy + pillow, never torch): it turns one decoded
image into the array the family's vision tower takes and says how many placeholder tokens the
image occupies in the prompt; `expand_placeholders` then widens the chat template's single
placeholder per image to that many.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from fovea.common.messages import VideoRef
from fovea.tokenizer_service.media import to_rgb
from fovea.tokenizer_service.video import VideoLimits, VideoMeta

CHANNELS = 3
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN and _STD


def per_channel(value: float | Sequence[float], name: str) -> list[float]:
    values = [float(value)] * CHANNELS if isinstance(value, int | float) else list(value)
    if len(values) != CHANNELS:
        raise ValueError(f"{name} must have {CHANNELS} values, got {values}")
    return values


def value_table(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean: float | Sequence[float],
    image_std: float | Sequence[float],
) -> np.ndarray:
    """[C, 256] float32: the output value of each channel's uint8 input value, through
    transformers' rescale and normalize with their dtypes, so a lookup equals their arithmetic
    bit for bit. A scalar mean or std applies to every channel."""
    x: np.ndarray = np.broadcast_to(np.arange(256, dtype=np.uint8), (CHANNELS, 256))
    if do_rescale:
        x = (x.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        x = x.astype(np.float32)  # no-op after rescale; uint8 would wrap on subtraction
        mean = np.array(per_channel(image_mean, "image_mean"), dtype=np.float32)[:, None]
        std = np.array(per_channel(image_std, "image_std"), dtype=np.float32)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class PixelOptions:
    """The preprocessor_config.json keys every family reads the same way (transformers'
    names): RGB conversion, the resize switch and filter, rescale and normalize. Each family's
    processor class defaults are one PixelOptions; `updated` lays a checkpoint's file over them.
    Family-specific keys (sizes, tiling) are read beside these."""

    image_mean: float | Sequence[float] = IMAGENET_STANDARD
    image_std: float | Sequence[float] = IMAGENET_STANDARD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = PIL.Image.Resampling.BICUBIC

    def updated(self, pp: dict[str, Any]) -> PixelOptions:
        """These options with the values preprocessor_config.json `pp` sets (nulls skipped)."""
        return dataclasses.replace(self, **{k: pp[k] for k in PIXEL_KEYS if pp.get(k) is not None})

    @property
    def resampling(self) -> PIL.Image.Resampling:
        """The resize filter (ValueError for a value PIL does not have)."""
        return PIL.Image.Resampling(self.resample)

    def affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(scale, shift) per channel: rescale then normalize as one map, value = raw * scale +
        shift (the value_table's arithmetic up to float rounding)."""
        std = per_channel(self.image_std, "image_std") if self.do_normalize else [1.0] * CHANNELS
        mean = per_channel(self.image_mean, "image_mean") if self.do_normalize else [0.0] * CHANNELS
        rescale = self.rescale_factor if self.do_rescale else 1.0
        scale = tuple(rescale / s for s in std)
        return scale, tuple(-m / s for m, s in zip(mean, std, strict=True))

    def value_table(self) -> np.ndarray:
        """[C, 256]: the rescale and normalize lookup table (`value_table`)."""
        return value_table(
            self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )


PIXEL_KEYS = tuple(f.name for f in dataclasses.fields(PixelOptions))


def rgb_input(image: PIL.Image.Image, convert: bool) -> PIL.Image.Image:
    """The image as an RGB processor input: converted (transparency on white) if `convert`,
    else it must already be RGB."""
    if convert:
        return to_rgb(image)
    if image.mode != "RGB":
        raise ValueError(f"image mode {image.mode} is not RGB and do_convert_rgb is off")
    return image


@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the vision tower. `pixel_values` is C-contiguous because it is sent
    as a zero-copy ZMQ frame: float32 and normalized, or (where `pixel_scale` is set) the raw
    uint8 values, which the tower normalizes inside its patch embedding (Qwen2-VL still images:
    one frame instead of T copies, 1 byte a value instead of 4)."""

    pixel_values: np.ndarray  # C-contiguous; family layout (Qwen2-VL: [h*w, C*T*P*P] float32)
    grid: list[int]  # family geometry (Qwen2-VL: [t, h, w] in patches)
    num_tokens: int  # placeholder tokens this image takes in the prompt
    # Non-empty when the result depends on more than the image's bytes (LLaVA-OneVision: an
    # image among several is processed differently from one alone): mixed into the image's
    # hash, so the prefix and embedding caches tell the variants apart.
    variant: bytes = b""
    # Non-empty when the image occupies several placeholder runs, each between the family's
    # marker tokens and encoded on its own (MiniCPM-V: a global view, then its slices): the
    # runs in prompt order, each a one-run ProcessedImage. The fields above then describe the
    # whole image (num_tokens: all runs together) and are not sent to the model.
    spans: tuple[ProcessedImage, ...] = ()
    # A video's seconds per temporal grid step (Qwen2.5-VL M-RoPE); 0.0 for a still image.
    second_per_grid_t: float = 0.0
    # Set for raw uint8 pixel_values: the normalized value is raw * scale[c] + shift[c].
    pixel_scale: tuple[float, ...] = ()
    pixel_shift: tuple[float, ...] = ()

    @property
    def parts(self) -> tuple[ProcessedImage, ...]:
        """The placeholder runs of this image, in prompt order (itself when it has one)."""
        return self.spans or (self,)


# PIL filters torch's uint8 antialiased interpolation has (the others resize with PIL).
_TORCH_MODES = {PIL.Image.Resampling.BICUBIC: "bicubic", PIL.Image.Resampling.BILINEAR: "bilinear"}


def resize_uint8(
    image: PIL.Image.Image, width: int, height: int, resample: PIL.Image.Resampling, engine: str
) -> np.ndarray:
    """[height, width, C] uint8: the RGB image resized. `engine` "pil": PIL's resize, what
    transformers' PIL backend does (bit for bit). "torch": torch's antialiased uint8
    interpolation, what its default torchvision backend does (torchvision.transforms.v2 resize
    on uint8 tensors, bit for bit); about 4x faster than PIL's bicubic on one thread. The two
    differ slightly (torch's cubic uses a = -0.75, PIL's a = -0.5)."""
    mode = _TORCH_MODES.get(resample)
    if engine == "pil" or mode is None:
        return np.asarray(image.resize((width, height), resample=resample))
    import torch
    import torch.nn.functional as F

    src = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # [1, C, H, W] channels-last
    out = F.interpolate(src, (height, width), mode=mode, antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class VideoPlan:
    """How one video is sampled and sized, decided from its metadata before any frame is
    decoded (so a video over the token budget is refused or thinned for free)."""

    indices: list[int]  # frames to decode, ascending (repeats allowed)
    height: int  # every frame is resized to height x width
    width: int
    num_tokens: int  # placeholder tokens the video takes
    # Mixed into the video's hash: the same bytes sampled differently are another input.
    variant: bytes
    sampled_fps: float  # frames kept per second of video


class VideoProcessor(ABC):
    """A model family's video preprocessing (beside its ImageProcessor, `.video`)."""

    video_token_id: int  # the one placeholder the chat template renders per video

    @abstractmethod
    def plan(self, meta: VideoMeta, request: VideoRef, limits: VideoLimits) -> VideoPlan:
        """The plan for a video of `meta` under the request's sampling fields and the server's
        limits. Raises MediaError for a video the request
        cannot have (naming the field to change)."""

    @abstractmethod
    def frames_plan(self, n: int, height: int, width: int, limits: VideoLimits) -> VideoPlan:
        """The plan for a video given as `n` frames of height x width (all of them taken, as
        transformers' processors take a frame list: no sampling)."""

    @abstractmethod
    def preprocess(self, frames: np.ndarray, plan: VideoPlan) -> ProcessedImage:
        """frames [T, H, W, 3] uint8 (the plan's indices, decoded) -> the tower's input."""


class ImageProcessor(ABC):
    """A model family's image preprocessing. Subclasses set `image_token_id` and implement
    `preprocess`; the placeholder expansion is shared."""

    image_token_id: int  # the one placeholder token the chat template renders per image
    # Families that resize with `resize_uint8` read it; load_processor sets it (--image-resize).
    resize_engine: str = "pil"
    video: VideoProcessor | None = None  # set by families that take videos

    @abstractmethod
    def preprocess(self, image: PIL.Image.Image) -> ProcessedImage:
        """The image as the vision tower takes it. Raises ValueError for an image the model
        cannot take (the request is then refused, not the process)."""

    def preprocess_in_request(self, image: PIL.Image.Image, num_images: int) -> ProcessedImage:
        """preprocess for one of the `num_images` images of a request. Families whose
        processing depends on the request's image count override this."""
        return self.preprocess(image)

    def expand_placeholders(
        self, ids: list[int], images: list[ProcessedImage]
    ) -> tuple[list[int], list[int]]:
        """Replace the k-th occurrence of image_token_id in ids by images[k].num_tokens copies
        of it. Returns (new ids, offset of each image's first placeholder in the new ids; for
        images with several `parts`, of each part's, images in order, parts in order).
        Raises ValueError when placeholders and images do not pair up one to one."""
        tok = self.image_token_id
        positions = [i for i, t in enumerate(ids) if t == tok]
        if len(positions) != len(images):
            raise ValueError(
                f"the prompt has {len(positions)} image placeholders but {len(images)} "
                "images were given"
            )
        out: list[int] = []
        offsets: list[int] = []
        start = 0
        for pos, image in zip(positions, images, strict=True):
            out.extend(ids[start:pos])
            offsets.append(len(out))
            out.extend([tok] * image.num_tokens)
            start = pos + 1
        out.extend(ids[start:])
        return out, offsets
