"""Shared by the vision end-to-end tests: generated images, a local HTTP host for them, and the
transformers reference for Qwen2-VL-family checkpoints."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
# (width, height); fox and elk are used by one test only, so they start cold there.
SIZES = {"cat": (64, 48), "dog": (40, 90), "owl": (56, 56), "fox": (50, 60), "elk": (50, 60)}
N_NEW = 32


def png(name: str) -> bytes:
    w, h = SIZES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_part(url: str) -> dict[str, Any]:
    """An OpenAI chat content part naming an image by URL (http(s) or data:)."""
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


class ImageHost:
    """GET /<name>.png from a thread; counts requests per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.hits[self.path] = host.hits.get(self.path, 0) + 1
                name = self.path.strip("/").removesuffix(".png")
                if name not in SIZES:
                    self.send_error(404)
                    return
                body = png(name)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}.png"


class Reference:
    """transformers on the same checkpoint: the fixture tokenizer's own chat template, its PIL
    image processor, greedy generate on M-RoPE positions."""

    def __init__(self, model_dir: Path) -> None:
        import json

        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
        self.model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32)
        self.pad = self.tok.convert_tokens_to_ids("<|image_pad|>")

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
        """Expanded prompt ids and the image tensors; image parts name SIZES keys."""
        names = [
            p["image_url"]["url"].rsplit("/", 1)[-1].removesuffix(".png")
            for m in messages if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"
        ]  # fmt: skip
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        pixels, grids = [], []
        for t in self.tok.encode(text, add_special_tokens=False):
            if t != self.pad:
                ids.append(t)
                continue
            image = Image.open(io.BytesIO(png(names[len(grids)])))
            feats = self.proc(images=[image], return_tensors="np")
            pixels.append(feats["pixel_values"])
            grids.append([int(g) for g in feats["image_grid_thw"][0]])
            ids.extend([self.pad] * (int(np.prod(grids[-1])) // 4))
        kw: dict[str, Any] = {}
        if grids:
            kw = {
                "pixel_values": torch.from_numpy(np.concatenate(pixels)),
                "image_grid_thw": torch.tensor(grids),
                "mm_token_type_ids": torch.tensor([[int(t == self.pad) for t in ids]]),
            }
        return ids, kw

    def greedy(self, messages: list[dict[str, Any]]) -> list[int]:
        ids, kw = self.prompt(messages)
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                eos_token_id=None, pad_token_id=0, **kw,
            )  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]
