"""A local HTTP server of generated images for benchmarks: GET /img/<i>.png is image i, random
noise of a fixed size (seeded by i, so the same i is the same bytes every time).

It runs in its own process: inside a load generator's process it would compete for the GIL
with hundreds of client streams and answer slowly enough to trip the server's fetch timeout.
"""

from __future__ import annotations

import io
import multiprocessing as mp
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from PIL import Image


@lru_cache(maxsize=1024)
def image_png(i: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (e.g. a fetch timeout) is not our error


def _serve(width: int, height: int, conn: Connection) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.removeprefix("/img/").removesuffix(".png")
            if not name.isdigit():
                self.send_error(404)
                return
            body = image_png(int(name), width, height)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
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

    def __init__(self, width: int, height: int) -> None:
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(
            target=_serve, args=(width, height, child), daemon=True
        )
        self.proc.start()
        if not parent.poll(60):
            self.proc.kill()
            raise RuntimeError("the image server did not start")
        self.port: int = parent.recv()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/img/{i}.png"

    def close(self) -> None:
        self.proc.kill()
        self.proc.join(5)
