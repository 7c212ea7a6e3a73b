"""Loading a request's images safely: data URIs, http(s) URLs, local files and raw bytes, each
turned into a decoded RGB image and the blake2b hash of its file's bytes.

Every refusal is a `MediaError` (an HTTP 400 carrying its message); nothing else escapes for bad
input. The limits, all from `MediaPolicy`:

- at most `max_images` per request, counted before anything is fetched;
- at most `max_bytes` per file: checked on a data URI's encoded length before base64 decoding,
  on a Content-Length before reading and on every streamed chunk, on a local file's size;
- at most `max_pixels` per image: checked on the header's size before any pixel is decoded;
- per URL, `timeout_s` for each connect/read/write/pool wait and `3 * timeout_s` for the whole
  fetch (DNS, redirects and body), so a server dripping a byte a second cannot hold a request;
- at most `max_redirects` hops, each re-checked like the first URL;
- local files only under `allowed_local_path` (after resolving symlinks and `..`).

An http(s) URL's bytes are kept for `url_ttl_s` (tokenizer_service/url_cache.py): a repeated URL
is served from memory with no request, then revalidated with a conditional GET. Every request
that does go out takes the path below; data URIs and local files are never cached.

Address rule (SSRF): unless `allow_private`, every address a URL's host resolves to must be
globally routable (tokenizer_service/address_check.py says which and why).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import urllib.parse
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from fovea.common.config import ServerArgs
from fovea.common.messages import ImageRef
from fovea.tokenizer_service.address_check import host_refusal
from fovea.tokenizer_service.url_cache import Fetched, UrlCache

_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_SHOWN_URL_CHARS = 200


class MediaError(ValueError):
    """A refused image or video: becomes an HTTP 400 with this message, naming `param` (the
    request field to change) when it is not the messages themselves."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: str | None = None
    allow_private: bool = False
    max_images: int = 16
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_redirects: int = 5
    url_ttl_s: float = 60.0
    url_cache_bytes: int = 128 << 20
    max_video_bytes: int = 64 * 1024 * 1024

    @property
    def image(self) -> MediaKind:
        return MediaKind("image", self.max_bytes, "--max-image-bytes", IMAGE_TYPES)

    @property
    def video(self) -> MediaKind:
        return MediaKind("video", self.max_video_bytes, "--max-video-bytes", VIDEO_TYPES)

    @classmethod
    def from_args(cls, args: ServerArgs) -> MediaPolicy:
        return cls(
            allowed_local_path=args.allowed_local_media_path,
            allow_private=args.allow_private_media_urls,
            max_images=args.max_images_per_request,
            timeout_s=args.media_fetch_timeout,
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            url_ttl_s=args.media_url_ttl,
            url_cache_bytes=args.media_url_cache_mb << 20,
            max_video_bytes=args.max_video_bytes,
        )


@dataclass(frozen=True)
class MediaKind:
    """What a fetched file is meant to be: named in errors, with its byte cap (and the flag that
    sets it) and the data-URI media types it may carry."""

    noun: str  # "image" | "video"
    max_bytes: int
    bytes_flag: str
    mime_types: tuple[str, ...]  # "image/png", ...


IMAGE_TYPES = tuple(f"image/{t}" for t in ("png", "jpeg", "jpg", "webp", "gif", "bmp"))
VIDEO_TYPES = tuple(
    f"video/{t}" for t in ("mp4", "webm", "quicktime", "x-matroska", "x-msvideo", "mpeg", "ogg")
)


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # decoded, RGB
    hash: bytes  # blake2b(file bytes, digest_size=32)


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency is composited onto white, not dropped."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode the first frame of a PNG, JPEG, WebP, GIF or BMP file into an RGB image, refusing
    one whose header claims more than `max_pixels` before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than raises) between 1x and 2x its own pixel limit. The filter
            # is process-global, so concurrent decodes can race on it; that matters only if
            # max_pixels exceeds PIL's MAX_IMAGE_PIXELS, and then our own cap still holds.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"image is {width}x{height} = {width * height} pixels, more than the "
                    f"{max_pixels}-pixel limit (--max-image-pixels)"
                )
            # load() decodes the current frame only: animated files are never iterated.
            image.load()
            # As transformers' load_image does: camera photos carry their rotation in EXIF.
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(
            "image could not be decoded: not a PNG, JPEG, WebP, GIF or BMP image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"image refused as a decompression bomb: {e}") from None
    except Exception as e:
        # PIL's decoders raise an open-ended set of types on malformed input (OSError,
        # SyntaxError, struct.error, EOFError, ValueError, IndexError, ...).
        raise MediaError(f"image could not be decoded: {str(e) or type(e).__name__}") from None


def _load_bytes(data: bytes, max_pixels: int) -> LoadedImage:
    return LoadedImage(
        decode_image(data, max_pixels), hashlib.blake2b(data, digest_size=32).digest()
    )


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN_URL_CHARS else url[:_SHOWN_URL_CHARS] + "..."


def _too_big(what: str, kind: MediaKind) -> MediaError:
    return MediaError(f"{what} is larger than the {kind.max_bytes}-byte limit ({kind.bytes_flag})")


def _either(names: Iterable[str]) -> str:
    *rest, last = names
    return f"{', '.join(rest)} or {last}"


def _decode_data_uri(url: str, kind: MediaKind) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    noun = kind.noun
    if not comma:
        raise MediaError("malformed data URI: no ',' before the payload")
    mime, *params = header.lower().split(";")
    if mime not in kind.mime_types:
        raise MediaError(
            f"data URI media type {mime or '(none)'!r} is not {'an' if noun == 'image' else 'a'} "
            f"{noun} type; expected "
            f"{_either(t for t in kind.mime_types if t != 'image/jpg')}"
        )
    if not params or params[-1] != "base64":
        raise MediaError(f"data URI {noun} must be base64-encoded (data:{noun}/...;base64,...)")
    if not payload:
        raise MediaError("data URI has an empty payload")
    # The encoded length of a max_bytes file, so nothing over the limit is ever decoded.
    if len(payload) > 4 * -(-kind.max_bytes // 3):
        raise _too_big(f"data URI {noun}", kind)
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise MediaError("data URI payload is not valid base64") from None
    if len(data) > kind.max_bytes:
        raise _too_big(f"data URI {noun}", kind)
    return data


def _read_local_file(path: str, allowed: str | None, kind: MediaKind) -> bytes:
    noun, max_bytes = kind.noun, kind.max_bytes
    if allowed is None:
        raise MediaError(
            f"local {noun} paths are disabled; start the server with "
            "--allowed-local-media-path DIR to allow them"
        )
    root = os.path.realpath(allowed)
    real = os.path.realpath(path)
    # commonpath, not startswith: /srv/img2 is not inside /srv/img.
    try:
        inside = os.path.commonpath([root, real]) == root
    except ValueError:
        inside = False
    if not inside:
        raise MediaError(f"{noun} path {path} is outside --allowed-local-media-path")
    if not os.path.exists(real):
        raise MediaError(f"{noun} file {path} does not exist")
    if not os.path.isfile(real):
        raise MediaError(f"{noun} path {path} is not a regular file")
    if os.path.getsize(real) > max_bytes:
        raise _too_big(f"{noun} file {path}", kind)
    try:
        with open(real, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since getsize
    except OSError as e:
        raise MediaError(f"{noun} file {path} could not be read: {e.strerror}") from None
    if len(data) > max_bytes:
        raise _too_big(f"{noun} file {path}", kind)
    return data


class MediaLoader:
    """Loads a request's images under one `MediaPolicy`. Owns its httpx client unless given
    one; `aclose` closes only an owned client. `url_cache` (default: one from the policy's
    TTL and capacity) is shared by every request the loader serves."""

    def __init__(
        self,
        policy: MediaPolicy,
        *,
        client: httpx.AsyncClient | None = None,
        url_cache: UrlCache | None = None,
    ) -> None:
        self._policy = policy
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(trust_env=False)
        self._timeout = httpx.Timeout(policy.timeout_s)
        if url_cache is None:  # not `or`: an empty cache is falsy (len 0)
            url_cache = UrlCache(policy.url_ttl_s, policy.url_cache_bytes)
        self.url_cache = url_cache

    @property
    def policy(self) -> MediaPolicy:
        return self._policy

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def load_all(self, refs: list[ImageRef], count: bool = True) -> list[LoadedImage]:
        """The images of `refs`, in order. The first refusal cancels the other loads and
        propagates; identical URLs are loaded once and their `LoadedImage` shared. `count`:
        refuse more than max_images (off for a video's frames, which video limits cap)."""
        if count and len(refs) > self._policy.max_images:
            raise MediaError(
                f"too many images: {len(refs)} given, at most {self._policy.max_images} per request"
            )
        for ref in refs:
            if (ref.url is None) == (ref.data is None):
                raise MediaError("an image must have exactly one of url and data")
        by_url: dict[str, int] = {}
        slots: list[int] = []  # position in `unique` of each ref
        unique: list[ImageRef] = []
        for ref in refs:
            if ref.url is not None and ref.url in by_url:
                slots.append(by_url[ref.url])
                continue
            if ref.url is not None:
                by_url[ref.url] = len(unique)
            slots.append(len(unique))
            unique.append(ref)
        tasks = [asyncio.create_task(self._load_one(ref)) for ref in unique]
        try:
            loaded = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [loaded[slot] for slot in slots]

    async def _load_one(self, ref: ImageRef) -> LoadedImage:
        data = await self.read_bytes(ref.url, ref.data, self._policy.image)
        return await asyncio.to_thread(_load_bytes, data, self._policy.max_pixels)

    async def read_bytes(self, url: str | None, data: bytes | None, kind: MediaKind) -> bytes:
        """The file's bytes from exactly one of `url` (http(s), data URI, local path or file://
        URL) and `data`, under the policy and `kind`'s byte cap."""
        if (url is None) == (data is None):
            raise MediaError(f"{kind.noun} must have exactly one of url and data")
        if data is not None:
            if len(data) > kind.max_bytes:
                raise _too_big(f"{kind.noun} data", kind)
            return data
        return await self._read_url(url or "", kind)

    async def _read_url(self, url: str, kind: MediaKind) -> bytes:
        policy = self._policy
        noun = kind.noun
        if not url:
            raise MediaError(f"{noun} URL is empty")
        if url[:5].lower() == "data:":
            return await asyncio.to_thread(_decode_data_uri, url, kind)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            raise MediaError(f"{noun} URL {_shown(url)} is not a valid URL") from None
        if parts.scheme == "":
            path = url
        elif parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise MediaError(f"file URL {_shown(url)} names a remote host")
            path = urllib.parse.unquote(parts.path)
        elif parts.scheme in ("http", "https"):
            data = await self.url_cache.get(url, lambda headers: self._fetch(url, headers, kind))
            # The cache may hold this URL's bytes from a fetch under another kind's cap.
            if len(data) > kind.max_bytes:
                raise _too_big(f"{noun} {_shown(url)}", kind)
            return data
        else:
            raise MediaError(
                f"unsupported {noun} URL scheme {parts.scheme!r}: "
                "use http(s), a data: URI or a local path"
            )
        return await asyncio.to_thread(_read_local_file, path, policy.allowed_local_path, kind)

    async def _fetch(self, url: str, conditional: dict[str, str], kind: MediaKind) -> Fetched:
        """GET `url` (with `conditional`'s If-None-Match / If-Modified-Since, if any)."""
        shown = _shown(url)
        try:
            async with asyncio.timeout(self._policy.timeout_s * 3):
                return await self._fetch_following_redirects(url, conditional, kind)
        except (TimeoutError, httpx.TimeoutException):
            raise MediaError(f"fetching {kind.noun} {shown} timed out") from None
        except httpx.HTTPError as e:
            raise MediaError(f"fetching {kind.noun} {shown} failed: {type(e).__name__}") from None

    async def _fetch_following_redirects(
        self, url: str, conditional: dict[str, str], kind: MediaKind
    ) -> Fetched:
        policy = self._policy
        shown = _shown(url)
        noun = kind.noun
        hop = url
        for _ in range(policy.max_redirects + 1):
            try:
                target = httpx.URL(hop)
            except httpx.InvalidURL:
                raise MediaError(f"{noun} URL {_shown(hop)} is not a valid URL") from None
            if target.scheme not in ("http", "https"):
                raise MediaError(
                    f"{noun} URL {shown} redirects to unsupported scheme {target.scheme!r}"
                )
            if not self._policy.allow_private and (why := await host_refusal(target.host, noun)):
                raise MediaError(why)
            async with self._client.stream(
                "GET",
                target,
                # identity: a compressed body would decompress past the byte limit per chunk.
                headers={"Accept-Encoding": "identity", **conditional},
                follow_redirects=False,
                timeout=self._timeout,
            ) as response:
                if response.has_redirect_location:
                    try:
                        hop = str(response.url.join(response.headers["location"]))
                    except httpx.InvalidURL:
                        raise MediaError(
                            f"{noun} URL {shown} redirects to an invalid URL"
                        ) from None
                    continue
                headers = response.headers
                # Only a conditional request may be answered 304 (RFC 9110 section 15.4.5).
                not_modified = response.status_code == 304 and bool(conditional)
                if not response.is_success and not not_modified:
                    raise MediaError(f"fetching {noun} {shown} failed: HTTP {response.status_code}")
                return Fetched(
                    None if not_modified else await self._read_body(response, shown, kind),
                    headers.get("etag"),
                    headers.get("last-modified"),
                    headers.get("cache-control", ""),
                )
        raise MediaError(
            f"fetching {noun} {shown} failed: more than {policy.max_redirects} redirects"
        )

    async def _read_body(self, response: httpx.Response, shown: str, kind: MediaKind) -> bytes:
        max_bytes = kind.max_bytes
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise _too_big(f"{kind.noun} {shown} ({length} bytes)", kind)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise _too_big(f"{kind.noun} {shown}", kind)
        return bytes(body)
