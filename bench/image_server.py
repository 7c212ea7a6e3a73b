"""A local HTTP server of generated images for benchmarks: GET /img/<i>.png is image i, random
noise of a fixed size (seeded by i, so the same i is the same bytes every time)."""

from __future__ import annotations

import io
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@lru_cache(maxsize=1024)
def image_png(i: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer:
    """Serves on 127.0.0.1 from a daemon thread; `url(i)` names image i."""

    def __init__(self, width: int, height: int) -> None:
        size = (width, height)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.removeprefix("/img/").removesuffix(".png")
                if not name.isdigit():
                    self.send_error(404)
                    return
                body = image_png(int(name), *size)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/img/{i}.png"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
