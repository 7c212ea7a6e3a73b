"""Shared by the LLaVA tests: the transformers reference for tiny LLaVA checkpoints. A chat is
rendered with the kind's built-in template (its golden strings are tested on their own), then
transformers' processor expands the placeholders and makes the pixel tensors: `LlavaProcessor`
and `LlavaNextProcessor` on the PIL-backend image processors, and for OneVision (whose
processor needs torchvision) `LlavaOnevisionProcessor`'s own placeholder count on its PIL image
processor's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tiny_models import LLAVA_KINDS

from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES

N_NEW = 32
IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def random_image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class LlavaReference:
    def __init__(self, model_dir: Path, kind: str) -> None:
        import transformers as tf
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        self.cfg = json.loads((model_dir / "config.json").read_text())
        self.family = self.cfg["model_type"]
        self.template = BUILTIN_TEMPLATES[LLAVA_KINDS[kind][1]].source
        self.tok = tf.AutoTokenizer.from_pretrained(model_dir)
        arch = self.cfg["architectures"][0]
        self.model = getattr(tf, arch).from_pretrained(model_dir, dtype=torch.float32).eval()
        self.image_token = self.cfg["image_token_index"]
        strategy = self.cfg["vision_feature_select_strategy"]
        common = dict(
            tokenizer=self.tok, patch_size=14, vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,
        )  # fmt: skip
        if self.family == "llava":
            ip: Any = LlavaImageProcessorPil.from_pretrained(model_dir)
            self.processor: Any = tf.LlavaProcessor(image_processor=ip, **common)
        elif self.family == "llava_next":
            ip = LlavaNextImageProcessorPil.from_pretrained(model_dir)
            self.processor = tf.LlavaNextProcessor(image_processor=ip, **common)
        else:
            ip = LlavaOnevisionImageProcessorPil.from_pretrained(model_dir)
            # Its placeholder count without __init__ (which builds a video processor).
            counter = tf.LlavaOnevisionProcessor.__new__(tf.LlavaOnevisionProcessor)
            side = self.cfg["vision_config"]["image_size"] // 14
            counter.image_processor, counter.num_image_tokens = ip, side * side
            counter.vision_aspect_ratio = self.cfg["vision_aspect_ratio"]
            counter.vision_feature_select_strategy = strategy
            counter.image_token = "<image>"
            self.ov_counter = counter
        self.image_processor = ip

    def render(self, messages: list[dict[str, Any]]) -> str:
        text: str = self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        return text

    def prompt(
        self, messages: list[dict[str, Any]], images: list[Image.Image]
    ) -> tuple[list[int], dict[str, Any]]:
        """Expanded prompt ids and transformers' image inputs (images in message order)."""
        text = self.render(messages)
        if not images:
            return list(self.tok.encode(text, add_special_tokens=False)), {}
        if self.family != "llava_onevision":
            out = self.processor(
                images=images, text=[text], add_special_tokens=False, return_tensors="np"
            )
            kw = {"pixel_values": torch.from_numpy(out["pixel_values"])}
            if "image_sizes" in out:
                kw["image_sizes"] = torch.from_numpy(out["image_sizes"])
            return [int(t) for t in out["input_ids"][0]], kw
        feats = self.image_processor(images=[images], return_tensors="np")
        # Each image's count, in order (replace_image_token returns the token string).
        counts = [
            len(self.ov_counter.replace_image_token(feats, i)) // len("<image>")
            for i in range(len(images))
        ]
        expanded: list[int] = []
        k = 0
        for t in self.tok.encode(text, add_special_tokens=False):
            if t == self.image_token:
                expanded.extend([t] * counts[k])
                k += 1
            else:
                expanded.append(t)
        kw = {
            "pixel_values": torch.from_numpy(feats["pixel_values"]),
            "image_sizes": torch.from_numpy(np.asarray(feats["image_sizes"])),
            "batch_num_images": torch.tensor(feats["batch_num_images"]),
        }
        return expanded, kw

    def greedy(self, ids: list[int], kw: dict[str, Any]) -> list[int]:
        """transformers' greedy continuation (eos does not stop it)."""
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None,
                pad_token_id=0, **kw,
            )  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]

    def logits(self, ids: list[int], kw: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([ids]), **kw).logits[0]  # type: ignore[no-any-return]
