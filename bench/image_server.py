"""A local HTTP server of generated images for benchmarks: GET /img/<i>.<ext> is image i, of the
size `sizes[i % len(sizes)]`, seeded by i (the same i is the same bytes every time).

The pictures are smooth colour fields with fine grain, so that JPEG compresses them about as
much as a photograph (pure noise would make every JPEG several times the size of a real one).
Responses carry an ETag (the bytes' hash) and answer If-None-Match with 304, as a CDN would.

It runs in its own process: inside a load generator's process it would compete for the GIL
with hundreds of client streams and answer slowly enough to trip the server's fetch timeout.
The count of image requests it answered is read with `requests()`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import multiprocessing as mp
from collections.abc import Sequence
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from PIL import Image

FORMATS = {"jpeg": ("jpg", "image/jpeg"), "png": ("png", "image/png")}


@lru_cache(maxsize=256)
def image_bytes(i: int, width: int, height: int, fmt: str = "jpeg") -> bytes:
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, (max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    pixels = np.clip(smooth.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Sizes from text like 448x448,1024x768 (ValueError on anything else)."""
    sizes = []
    for wh in text.lower().split(","):
        w, h = (int(v) for v in wh.split("x", 1))
        if w <= 0 or h <= 0:
            raise ValueError(wh)
        sizes.append((w, h))
    return sizes


def size_of(i: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return sizes[i % len(sizes)]


def data_uri(i: int, sizes: Sequence[tuple[int, int]], fmt: str = "jpeg") -> str:
    data = base64.b64encode(image_bytes(i, *size_of(i, sizes), fmt)).decode()
    return f"data:{FORMATS[fmt][1]};base64,{data}"


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (e.g. a fetch timeout) is not our error


def _serve(sizes: list[tuple[int, int]], fmt: str, conn: Connection) -> None:
    ext, mime = FORMATS[fmt]
    answered = 0

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            nonlocal answered
            name = self.path.removeprefix("/img/").removesuffix(f".{ext}")
            if not name.isdigit():
                self.send_error(404)
                return
            answered += 1
            body = image_bytes(int(name), *size_of(int(name), sizes), fmt)
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # POST /count: how many image GETs were answered
            body = str(answered).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = _Quiet(("127.0.0.1", 0), Handler)
    conn.send(httpd.server_address[1])
    httpd.serve_forever()


class ImageServer:
    """Serves on 127.0.0.1 from a child process; `url(i)` names image i."""

    def __init__(self, sizes: Sequence[tuple[int, int]], fmt: str = "jpeg") -> None:
        self.sizes, self.fmt = list(sizes), fmt
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(
            target=_serve, args=(self.sizes, fmt, child), daemon=True
        )
        self.proc.start()
        if not parent.poll(60):
            self.proc.kill()
            raise RuntimeError("the image server did not start")
        self.port: int = parent.recv()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/img/{i}.{FORMATS[self.fmt][0]}"

    def requests(self) -> int:
        """Image GETs answered so far (304s included)."""
        import urllib.request

        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{self.port}/count", method="POST"), timeout=10
        ) as r:
            return int(r.read())

    def close(self) -> None:
        self.proc.kill()
        self.proc.join(5)
