"""Accuracy of the built-in demo VLM on held-out pictures (bench/demo_vlm_data.py's "eval"
split, never trained on): shape, colour and count, each picture asked all three.

    python -m fovea.bench.demo_vlm_eval --pictures 200 --hf                       # transformers
    python -m fovea.bench.demo_vlm_eval --pictures 200 --server http://127.0.0.1:30000 \
        --images data-uri url                                                     # Fovea

The server is a running `launch_server --model-path fovea-demo-vlm`; with `url` the pictures
are served from a local HTTP server this script starts. transformers runs greedy `generate`
one prompt at a time on the same model directory, processor and template. Prints one JSON
object: per route, the accuracy of each kind and every answer; and how many answers each
route shares with the first.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from fovea.bench.demo_vlm_data import QUESTIONS, Picture, picture

KINDS = ("shape", "colour", "count")
COUNT_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4"}
Ask = Callable[[Image.Image, int, str], str]  # (picture, index, question) -> answer


def eval_pictures(n: int) -> list[Picture]:
    """The first n pictures of the eval split that show shapes (every one answers KINDS)."""
    return [picture("eval", i, word_share=0.0) for i in range(n)]


def questions(n: int) -> list[tuple[int, str, str]]:
    """(picture index, kind, question): each picture asked each kind, phrasing seeded."""
    rng = random.Random("eval-questions")
    return [(i, kind, rng.choice(QUESTIONS[kind])) for i in range(n) for kind in KINDS]


def is_right(reply: str, expected: str) -> bool:
    """The reply's first word, lower-cased without punctuation (a count may be spelled)."""
    words = reply.strip().lower().replace(".", " ").replace(",", " ").split()
    first = words[0] if words else ""
    return COUNT_WORDS.get(first, first) == expected.lower()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def hf_asker(model_dir: Path) -> Ask:
    """transformers' LlavaForConditionalGeneration and LlavaProcessor (PIL image processor)."""
    import torch
    import transformers as tf
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    processor = tf.LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=LlavaImageProcessorPil.from_pretrained(model_dir), tokenizer=tok,
        patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    model = tf.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]

    def ask(image: Image.Image, index: int, question: str) -> str:
        parts = [{"type": "image"}, {"type": "text", "text": question}]
        messages: Any = [{"role": "user", "content": parts}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=text, images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        reply = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return str(reply)

    return ask


def http_asker(base: str, image_url: Callable[[Image.Image, int], str]) -> Ask:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)

    def ask(image: Image.Image, index: int, question: str) -> str:
        parts = [
            {"type": "image_url", "image_url": {"url": image_url(image, index)}},
            {"type": "text", "text": question},
        ]
        r = client.chat.completions.create(
            model="fovea-demo-vlm",
            messages=[{"role": "user", "content": parts}],  # type: ignore[list-item,misc]
            temperature=0,
            max_tokens=4,
        )
        return r.choices[0].message.content or ""

    return ask


def data_uri(image: Image.Image, index: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@contextmanager
def picture_server(pictures: list[Picture]) -> Iterator[str]:
    """A local HTTP server of the pictures as PNG files: yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                body = png_bytes(pictures[int(self.path.strip("/").removesuffix(".png"))].image)
            except (ValueError, IndexError):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_route(ask: Ask, pictures: list[Picture], concurrency: int) -> dict[str, Any]:
    qs = questions(len(pictures))

    def one(q: tuple[int, str, str]) -> str:
        return ask(pictures[q[0]].image, q[0], q[2])

    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, qs))
    right = {kind: 0 for kind in KINDS}
    for (i, kind, _), reply in zip(qs, replies, strict=True):
        right[kind] += is_right(reply, pictures[i].answer(kind))
    return {"accuracy": {k: v / len(pictures) for k, v in right.items()}, "replies": replies}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pictures", type=int, default=200)
    ap.add_argument("--hf", action="store_true", help="also run transformers' generate")
    ap.add_argument("--model-dir", type=Path, help="default: the alias's directory")
    ap.add_argument("--server", help="a running Fovea server's base URL")
    ap.add_argument("--images", nargs="+", choices=["data-uri", "url"], default=["data-uri"])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    pictures = eval_pictures(args.pictures)
    routes: dict[str, dict[str, Any]] = {}
    if args.server:
        for how in args.images:
            if how == "data-uri":
                routes["http data-uri"] = run_route(
                    http_asker(args.server, data_uri), pictures, args.concurrency
                )
            else:
                with picture_server(pictures) as base:

                    def url(image: Image.Image, index: int, base: str = base) -> str:
                        return f"{base}/{index}.png"

                    ask = http_asker(args.server, url)
                    routes["http url"] = run_route(ask, pictures, args.concurrency)
    if args.hf:
        import torch

        from fovea.launcher.builtin_models import resolve_model_path
        from fovea.launcher.demo_vlm import DEMO_VLM

        torch.set_num_threads(args.threads)
        model_dir = args.model_dir or Path(resolve_model_path(DEMO_VLM))
        routes["transformers"] = run_route(hf_asker(model_dir), pictures, 1)
    first = next(iter(routes.values()), None)
    same = {
        name: sum(a == b for a, b in zip(r["replies"], first["replies"], strict=True))
        for name, r in routes.items()
    } if first else {}  # fmt: skip
    print(json.dumps({"pictures": len(pictures), "routes": routes, "same_replies": same}))


if __name__ == "__main__":
    main()
