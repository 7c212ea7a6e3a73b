from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from fovea.common.config import ServerArgs
from fovea.common.messages import ImageRef
from fovea.tokenizer_service.media import (
    LoadedImage,
    MediaError,
    MediaLoader,
    MediaPolicy,
    decode_image,
)


def _encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))


PNG = _encode(Image.new("RGB", (12, 8), (200, 10, 30)), "PNG")
JPEG = _encode(_noise((64, 48)), "JPEG", quality=90)
BIG = b"x" * 5000


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose IDAT holds almost nothing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@dataclass
class Server:
    port: int
    paths: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        return self.paths.count(path)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {"Content-Length": str(len(body))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            server.paths.append(self.path)
            route = self.path.split("?")[0]
            try:
                if route == "/png":
                    self._send(200, PNG)
                elif route == "/jpeg":
                    self._send(200, JPEG)
                elif route.startswith("/hops/"):
                    left = int(route.removeprefix("/hops/"))
                    if left == 0:
                        self._send(200, PNG)
                    else:
                        self._send(302, b"", {"Location": f"/hops/{left - 1}"})
                elif route == "/absolute-hop":
                    self._send(302, b"", {"Location": server.url("/png")})
                elif route == "/big":
                    self._send(200, BIG)
                elif route == "/big-stream":
                    # HTTP/1.0 without Content-Length: the body ends when the connection does.
                    self._send(200, b"", {"Content-Type": "image/png"})
                    for _ in range(200):
                        self.wfile.write(b"y" * 65536)
                elif route == "/drip":
                    self._send(200, b"", {"Content-Length": "1000"})
                    while not server.stop.wait(0.05):
                        self.wfile.write(b"z")
                        self.wfile.flush()
                elif route == "/stall":
                    self._send(200, b"", {"Content-Length": "1000"})
                    server.stop.wait(5)
                else:
                    self._send(404, b"not found")
            except OSError:
                pass  # the client hung up, as it should on refusing a body

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = Server(port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(state)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    state.stop.set()
    httpd.shutdown()
    httpd.server_close()


def _load(policy: MediaPolicy, refs: list[ImageRef], client: httpx.AsyncClient | None = None):
    async def main() -> list[LoadedImage]:
        loader = MediaLoader(policy, client=client)
        try:
            return await loader.load_all(refs)
        finally:
            await loader.aclose()

    return asyncio.run(main())


def _refusal(policy: MediaPolicy, ref: ImageRef, client: httpx.AsyncClient | None = None) -> str:
    with pytest.raises(MediaError) as info:
        _load(policy, [ref], client)
    assert info.value.message == str(info.value)
    return info.value.message


PRIVATE = MediaPolicy(allow_private=True)
PRIVATE_MSG = (
    "image URL host {} resolves to a private or local address ({}); "
    "start the server with --allow-private-media-urls to allow it"
)


def _recording_client(responses: dict[str, httpx.Response]) -> tuple[httpx.AsyncClient, list]:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return responses[str(request.url)]

    return httpx.AsyncClient(transport=httpx.MockTransport(handle)), seen


# ---------------------------------------------------------------- http(s)


def test_fetch_png_and_jpeg_with_hashes(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would connect on our behalf, past the address rule: the environment's is ignored.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    png, jpeg = _load(
        PRIVATE, [ImageRef(url=server.url("/png")), ImageRef(url=server.url("/jpeg"))]
    )
    assert (png.image.mode, png.image.size, png.image.getpixel((0, 0))) == (
        "RGB",
        (12, 8),
        (200, 10, 30),
    )
    assert png.hash == hashlib.blake2b(PNG, digest_size=32).digest()
    assert (jpeg.image.mode, jpeg.image.size) == ("RGB", (64, 48))
    assert jpeg.hash == hashlib.blake2b(JPEG, digest_size=32).digest()


def test_same_url_fetched_once(server: Server) -> None:
    url = server.url("/png?dedupe")
    a, b, c = _load(PRIVATE, [ImageRef(url=url), ImageRef(url=url), ImageRef(data=PNG)])
    assert a is b and a is not c
    assert server.hits("/png?dedupe") == 1
    assert a.hash == c.hash and a.image.tobytes() == c.image.tobytes()


def test_http_errors(server: Server) -> None:
    url = server.url("/missing")
    assert _refusal(PRIVATE, ImageRef(url=url)) == f"fetching image {url} failed: HTTP 404"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/x.png"
    assert (
        _refusal(PRIVATE, ImageRef(url=closed)) == f"fetching image {closed} failed: ConnectError"
    )


def test_redirects_are_followed_up_to_the_limit(server: Server) -> None:
    policy = MediaPolicy(allow_private=True, max_redirects=2)
    two, absolute = _load(
        policy, [ImageRef(url=server.url("/hops/2")), ImageRef(url=server.url("/absolute-hop"))]
    )
    assert two.hash == absolute.hash == hashlib.blake2b(PNG, digest_size=32).digest()
    url = server.url("/hops/3")
    assert (
        _refusal(policy, ImageRef(url=url)) == f"fetching image {url} failed: more than 2 redirects"
    )
    assert server.hits("/hops/1") == 2 and server.hits("/hops/0") == 1


def test_dripping_server_hits_the_overall_deadline(server: Server) -> None:
    url = server.url("/drip")
    start = time.monotonic()
    assert _refusal(MediaPolicy(allow_private=True, timeout_s=0.3), ImageRef(url=url)) == (
        f"fetching image {url} timed out"
    )
    # Each byte arrives within the 0.3 s read timeout: only the 0.9 s deadline stops it.
    assert 0.85 <= time.monotonic() - start < 2.0


def test_stalled_server_hits_the_read_timeout(server: Server) -> None:
    url = server.url("/stall")
    start = time.monotonic()
    assert _refusal(MediaPolicy(allow_private=True, timeout_s=0.3), ImageRef(url=url)) == (
        f"fetching image {url} timed out"
    )
    assert time.monotonic() - start < 0.8


def test_body_over_the_byte_limit(server: Server) -> None:
    policy = MediaPolicy(allow_private=True, max_bytes=1000)
    big, stream = server.url("/big"), server.url("/big-stream")
    assert _refusal(policy, ImageRef(url=big)) == (
        f"image {big} (5000 bytes) is larger than the 1000-byte limit (--max-image-bytes)"
    )
    start = time.monotonic()
    assert _refusal(policy, ImageRef(url=stream)) == (
        f"image {stream} is larger than the 1000-byte limit (--max-image-bytes)"
    )
    assert time.monotonic() - start < 2.0  # stopped early, not after the 13 MB body


def test_one_failure_cancels_the_other_fetches(server: Server) -> None:
    missing = server.url("/missing")

    async def main() -> tuple[str, set[asyncio.Task[Any]]]:
        loader = MediaLoader(MediaPolicy(allow_private=True, timeout_s=5.0))
        with pytest.raises(MediaError) as info:
            await loader.load_all([ImageRef(url=server.url("/drip?cancel")), ImageRef(url=missing)])
        await loader.aclose()
        return info.value.message, asyncio.all_tasks() - {asyncio.current_task()}

    start = time.monotonic()
    message, left = asyncio.run(main())
    assert message == f"fetching image {missing} failed: HTTP 404"
    assert left == set()
    assert time.monotonic() - start < 1.0  # did not wait for the 15 s drip deadline


# ---------------------------------------------------------------- address rule


@pytest.mark.parametrize(
    ("url", "host", "address"),
    [
        ("http://127.0.0.1/a.png", "127.0.0.1", "127.0.0.1"),
        ("http://[::1]/a.png", "::1", "::1"),
        ("http://10.0.0.1/a.png", "10.0.0.1", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254", "169.254.169.254"),
        ("http://0.0.0.0:8080/a.png", "0.0.0.0", "0.0.0.0"),
        ("http://[::ffff:127.0.0.1]/a.png", "::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("http://100.64.0.1/a.png", "100.64.0.1", "100.64.0.1"),
        ("https://224.0.0.1/a.png", "224.0.0.1", "224.0.0.1"),
        ("http://[64:ff9b::a00:1]/a.png", "64:ff9b::a00:1", "64:ff9b::a00:1"),
        ("http://[2002:a00:1::1]/a.png", "2002:a00:1::1", "2002:a00:1::1"),
        ("http://[::7f00:1]/a.png", "::7f00:1", "::7f00:1"),
        ("http://localhost/a.png", "localhost", None),
        ("http://2130706433/a.png", "2130706433", "127.0.0.1"),
    ],
)
def test_private_addresses_refused_without_a_connection(
    url: str, host: str, address: str | None
) -> None:
    client, seen = _recording_client({})
    message = _refusal(MediaPolicy(), ImageRef(url=url), client)
    if address is None:  # localhost may resolve to 127.0.0.1 or ::1 first
        assert message in {PRIVATE_MSG.format(host, "127.0.0.1"), PRIVATE_MSG.format(host, "::1")}
    else:
        assert message == PRIVATE_MSG.format(host, address)
    assert seen == []


def test_public_addresses_in_ipv6_forms_are_fetched() -> None:
    urls = [
        "http://8.8.8.8/a.png",
        "http://[::ffff:8.8.8.8]/a.png",
        "http://[64:ff9b::808:808]/a.png",
        "http://[2002:808:808::1]/a.png",
        "http://[2606:4700::1111]/a.png",
    ]
    client, seen = _recording_client({u: httpx.Response(200, content=PNG) for u in urls})
    loaded = _load(MediaPolicy(), [ImageRef(url=u) for u in urls], client)
    assert [image.image.size for image in loaded] == [(12, 8)] * 5
    assert sorted(seen) == sorted(urls)


def test_private_refusal_reaches_no_server(server: Server) -> None:
    for host in ("127.0.0.1", "localhost", "0.0.0.0", "[::ffff:127.0.0.1]"):
        message = _refusal(MediaPolicy(), ImageRef(url=server.url("/png?refused", host)))
        assert message.startswith(f"image URL host {host.strip('[]')} resolves to a private")
    assert server.hits("/png?refused") == 0


def _fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
    def getaddrinfo(host: str, port: Any, *args: Any, **kw: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_names_are_resolved_and_every_address_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(
        monkeypatch, {"public.test": ["93.184.215.14"], "mixed.test": ["8.8.8.8", "10.1.2.3"]}
    )
    client, seen = _recording_client({"http://public.test/a.png": httpx.Response(200, content=PNG)})
    (image,) = _load(MediaPolicy(), [ImageRef(url="http://public.test/a.png")], client)
    assert image.image.size == (12, 8)
    assert _refusal(MediaPolicy(), ImageRef(url="http://mixed.test/a.png"), client) == (
        PRIVATE_MSG.format("mixed.test", "10.1.2.3")
    )
    assert _refusal(MediaPolicy(), ImageRef(url="http://gone.test/a.png"), client) == (
        "image URL host gone.test could not be resolved"
    )
    assert seen == ["http://public.test/a.png"]


def test_each_redirect_hop_is_rechecked() -> None:
    client, seen = _recording_client(
        {
            "http://1.1.1.1/a.png": httpx.Response(
                302, headers={"Location": "http://169.254.169.254/latest"}
            ),
            "http://1.1.1.2/a.png": httpx.Response(302, headers={"Location": "ftp://1.1.1.3/a"}),
        }
    )
    assert _refusal(MediaPolicy(), ImageRef(url="http://1.1.1.1/a.png"), client) == (
        PRIVATE_MSG.format("169.254.169.254", "169.254.169.254")
    )
    assert _refusal(MediaPolicy(), ImageRef(url="http://1.1.1.2/a.png"), client) == (
        "image URL http://1.1.1.2/a.png redirects to unsupported scheme 'ftp'"
    )
    assert seen == ["http://1.1.1.1/a.png", "http://1.1.1.2/a.png"]


# ---------------------------------------------------------------- requests, data URIs, bytes


def test_request_shape_errors(server: Server) -> None:
    refs = [ImageRef(url=server.url("/png?toomany"))] * 3
    with pytest.raises(MediaError, match=r"^too many images: 3 given, at most 2 per request$"):
        _load(MediaPolicy(allow_private=True, max_images=2), refs)
    assert server.hits("/png?toomany") == 0
    expected = "an image must have exactly one of url and data"
    assert _refusal(PRIVATE, ImageRef()) == expected
    assert _refusal(PRIVATE, ImageRef(url="/a.png", data=PNG)) == expected
    assert _refusal(PRIVATE, ImageRef(url="")) == "image URL is empty"
    assert _refusal(PRIVATE, ImageRef(url="http://[::1/a.png")) == (
        "image URL http://[::1/a.png is not a valid URL"
    )
    for url, scheme in [
        ("ftp://x/a.png", "ftp"),
        ("gopher://x/", "gopher"),
        ("javascript:1", "javascript"),
    ]:
        assert _refusal(PRIVATE, ImageRef(url=url)) == (
            f"unsupported image URL scheme {scheme!r}: use http(s), a data: URI or a local path"
        )


def test_data_uris() -> None:
    payload = base64.b64encode(PNG).decode()
    good, jpg_mime = _load(
        MediaPolicy(),
        [
            ImageRef(url=f"data:image/png;base64,{payload}"),
            ImageRef(url=f"DATA:image/JPG;base64,{payload}"),
        ],
    )
    assert good.hash == jpg_mime.hash == hashlib.blake2b(PNG, digest_size=32).digest()
    not_image = (
        "is not an image type; expected image/png, image/jpeg, image/webp, image/gif or image/bmp"
    )
    bad = {
        "data:image/png;base64,@@@@": "data URI payload is not valid base64",
        "data:image/png;base64,iVBORw0KGgo": "data URI payload is not valid base64",
        "data:text/plain;base64,aGk=": f"data URI media type 'text/plain' {not_image}",
        "data:image/svg+xml;base64,aGk=": f"data URI media type 'image/svg+xml' {not_image}",
        f"data:image/png,{payload}": (
            "data URI image must be base64-encoded (data:image/...;base64,...)"
        ),
        "data:image/png;base64,": "data URI has an empty payload",
        "data:image/png;base64": "malformed data URI: no ',' before the payload",
    }
    for url, message in bad.items():
        assert _refusal(MediaPolicy(), ImageRef(url=url)) == message


def test_byte_limit_is_exact_for_data_uris_and_bytes() -> None:
    uri = ImageRef(url="data:image/png;base64," + base64.b64encode(PNG).decode())
    (image,) = _load(MediaPolicy(max_bytes=len(PNG)), [uri])
    assert image.image.size == (12, 8)
    limit = f"is larger than the {len(PNG) - 1}-byte limit (--max-image-bytes)"
    assert _refusal(MediaPolicy(max_bytes=len(PNG) - 1), uri) == f"data URI image {limit}"
    assert (
        _refusal(MediaPolicy(max_bytes=len(PNG) - 1), ImageRef(data=PNG)) == f"image data {limit}"
    )
    # Refused on the encoded length: this payload is not even valid base64.
    huge = ImageRef(url="data:image/png;base64," + "!" * 2000)
    assert _refusal(MediaPolicy(max_bytes=1000), huge) == (
        "data URI image is larger than the 1000-byte limit (--max-image-bytes)"
    )


# ---------------------------------------------------------------- local files


def test_local_paths(tmp_path: Path) -> None:
    root, sibling = tmp_path / "allowed", tmp_path / "allowed2"
    root.mkdir()
    sibling.mkdir()
    (root / "a.png").write_bytes(PNG)
    (root / "sub").mkdir()
    (sibling / "b.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "inner.png").symlink_to(root / "a.png")
    assert _refusal(MediaPolicy(), ImageRef(url=str(root / "a.png"))) == (
        "local image paths are disabled; start the server with "
        "--allowed-local-media-path DIR to allow them"
    )
    policy = MediaPolicy(allowed_local_path=str(root))
    plain, as_url, linked = _load(
        policy,
        [
            ImageRef(url=str(root / "a.png")),
            ImageRef(url=(root / "a.png").as_uri()),
            ImageRef(url=str(root / "inner.png")),
        ],
    )
    assert plain.hash == as_url.hash == linked.hash == hashlib.blake2b(PNG, digest_size=32).digest()
    for path in (f"{root}/../secret.png", str(root / "escape.png"), str(sibling / "b.png")):
        assert _refusal(policy, ImageRef(url=path)) == (
            f"image path {path} is outside --allowed-local-media-path"
        )
    missing = str(root / "missing.png")
    assert _refusal(policy, ImageRef(url=missing)) == f"image file {missing} does not exist"
    assert _refusal(policy, ImageRef(url=str(root / "sub"))) == (
        f"image path {root / 'sub'} is not a regular file"
    )
    assert _refusal(policy, ImageRef(url="file://example.com/a.png")) == (
        "file URL file://example.com/a.png names a remote host"
    )
    assert _refusal(
        MediaPolicy(allowed_local_path=str(root), max_bytes=10), ImageRef(url=str(root / "a.png"))
    ) == (f"image file {root / 'a.png'} is larger than the 10-byte limit (--max-image-bytes)")


# ---------------------------------------------------------------- decoding


def test_pixel_limit_is_checked_before_decoding() -> None:
    start = time.monotonic()
    with pytest.raises(MediaError) as info:
        decode_image(_png_header(100_000, 100_000), 50_000_000)
    assert info.value.message.startswith(
        "image refused as a decompression bomb: Image size (10000000000 pixels) exceeds limit"
    )
    # Below PIL's own limit our check runs; decoding would fail on the empty IDAT instead.
    with pytest.raises(MediaError) as info:
        decode_image(_png_header(9000, 9000), 50_000_000)
    assert info.value.message == (
        "image is 9000x9000 = 81000000 pixels, more than the 50000000-pixel limit "
        "(--max-image-pixels)"
    )
    assert time.monotonic() - start < 1.0
    # Above our cap but in PIL's warning band: the warning is an error too.
    with pytest.raises(MediaError) as info:
        decode_image(_png_header(10_000, 10_000), 200_000_000)
    assert info.value.message.startswith(
        "image refused as a decompression bomb: Image size (100000000 pixels) exceeds limit"
    )
    assert decode_image(PNG, 96).size == (12, 8)
    with pytest.raises(MediaError, match=r"^image is 12x8 = 96 pixels, more than the 95-pixel"):
        decode_image(PNG, 95)


def test_broken_files_are_refused() -> None:
    big_png = _encode(_noise((64, 64)), "PNG")
    unknown = "image could not be decoded: not a PNG, JPEG, WebP, GIF or BMP image"
    for data in (big_png[: len(big_png) // 2], JPEG[: len(JPEG) // 2]):
        with pytest.raises(MediaError) as info:
            decode_image(data, 50_000_000)
        assert info.value.message.startswith("image could not be decoded: ")
        assert info.value.message != unknown
    tiff = _encode(Image.new("RGB", (4, 4)), "TIFF")
    for data in (random.Random(1).randbytes(4096), b"", tiff):
        with pytest.raises(MediaError) as info:
            decode_image(data, 50_000_000)
        assert info.value.message == unknown


def test_animated_gif_gives_its_first_frame() -> None:
    colors = [(255, 0, 0)] + [(0, (7 * i) % 256, 255) for i in range(199)]
    frames = [Image.new("RGB", (40, 30), c) for c in colors]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    assert Image.open(io.BytesIO(gif)).n_frames == 200
    image = decode_image(gif, 50_000_000)
    assert (image.mode, image.size, image.getpixel((5, 5))) == ("RGB", (40, 30), (255, 0, 0))


def test_modes_become_rgb_and_exif_rotation_applies() -> None:
    cases = {
        # Transparency is composited onto white, as transformers' convert_to_rgb does.
        "RGBA": (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), (255, 255, 255)),
        "L": (Image.new("L", (3, 2), 77), (77, 77, 77)),
        "LA": (Image.new("LA", (3, 2), (90, 128)), (172, 172, 172)),  # 90*128/255 + 255*127/255
        "P": (Image.new("RGB", (3, 2), (0, 0, 255)).convert("P"), (0, 0, 255)),
        "I;16": (Image.new("I;16", (3, 2), 200), (200, 200, 200)),
    }
    for mode, (source, pixel) in cases.items():
        assert source.mode == mode
        image = decode_image(_encode(source, "PNG"), 100)
        assert (image.mode, image.size, image.getpixel((2, 1))) == ("RGB", (3, 2), pixel)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = decode_image(_encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif), 10_000)
    assert rotated.size == (20, 40)
    webp = decode_image(_encode(Image.new("RGB", (5, 4), (0, 255, 0)), "WEBP", lossless=True), 20)
    bmp = decode_image(_encode(Image.new("RGB", (5, 4), (0, 255, 0)), "BMP"), 20)
    assert webp.getpixel((4, 3)) == bmp.getpixel((4, 3)) == (0, 255, 0)


def test_policy_from_args(tmp_path: Path) -> None:
    args = ServerArgs(
        model_path="unused",
        allowed_local_media_path=str(tmp_path),
        allow_private_media_urls=True,
        max_images_per_request=3,
        media_fetch_timeout=2.5,
        max_image_bytes=1234,
        max_image_pixels=5678,
        media_url_ttl=7.5,
        media_url_cache_mb=3,
    )
    assert MediaPolicy.from_args(args) == MediaPolicy(
        allowed_local_path=str(tmp_path),
        allow_private=True,
        max_images=3,
        timeout_s=2.5,
        max_bytes=1234,
        max_pixels=5678,
        max_redirects=5,
        url_ttl_s=7.5,
        url_cache_bytes=3 << 20,
    )
