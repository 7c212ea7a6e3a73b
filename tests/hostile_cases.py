"""The bad requests of test_hostile_inputs.py, as a table, and what builds them: hostile images
(truncated, bombs, huge, animated) and a slow-loris image host."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from PIL import Image

MAX_BODY = 1_000_000  # --max-request-bytes of the first server
CONTEXT = 256  # --context-length: bounds what the fuzzer can make the model generate


# ---------------------------------------------------------------------------- images


def _encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(w: int = 32, h: int = 24) -> bytes:
    return _encode(Image.new("RGB", (w, h), (200, 40, 90)), "PNG")


def jpeg(w: int = 32, h: int = 24) -> bytes:
    return _encode(Image.effect_noise((w, h), 50).convert("RGB"), "JPEG")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated_gif(frames: int) -> bytes:
    images = [Image.new("P", (32, 32), i % 256) for i in range(frames)]
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- requests


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(content: Any, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def with_image(url: str) -> dict[str, Any]:
    return chat([image(url), {"type": "text", "text": "What is this?"}])


class Bad(NamedTuple):
    path: str
    body: Any  # JSON-encoded, unless bytes (sent as is)
    status: int
    message: str  # a substring of the error message
    param: str | None = "-"  # "-": not checked
    method: str = "POST"


CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
NAN = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}'
PRIVATE = "resolves to a private or local address"
UNDECODABLE = "image could not be decoded"

BAD: dict[str, Bad] = {
    # --- the body itself
    "malformed_json": Bad(
        CHAT, b'{"messages": [', 400, "invalid JSON in the request body at position 14: "
    ),
    "empty_body": Bad(CHAT, b"", 400, "the request body is empty: a JSON object is needed"),
    "body_is_a_list": Bad(CHAT, b"[1, 2]", 400, "valid dictionary or object"),
    "nested_100k_deep": Bad(CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "error parsing the body"),
    "lone_surrogate": Bad(
        CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
        "not valid Unicode: surrogates not allowed",
    ),
    # --- wrong shapes and types
    "messages_not_a_list": Bad(
        CHAT, {"messages": "hi"}, 400, "messages: Input should be a valid list"
    ),
    "messages_empty": Bad(
        CHAT, {"messages": []}, 400, "List should have at least 1 item", "messages"
    ),
    "unknown_role": Bad(
        CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
        "Input should be 'system', 'developer', 'user', 'assistant' or 'tool'",
        "messages.0.role",
    ),
    "missing_role": Bad(CHAT, {"messages": [{"content": "hi"}]}, 400, "role: Field required"),
    "content_is_a_number": Bad(CHAT, chat(42), 400, "Input should be a valid string"),
    "unknown_part_type": Bad(
        CHAT, chat([{"type": "video", "video": "x"}]), 400,
        "Input tag 'video' found using 'type' does not match any of the expected tags",
    ),
    "text_part_without_text": Bad(CHAT, chat([{"type": "text"}]), 400, "text: Field required"),
    "image_part_without_image_url": Bad(
        CHAT, chat([{"type": "image_url"}]), 400, "image_url.image_url: Field required"
    ),
    "image_url_without_url": Bad(
        CHAT, chat([{"type": "image_url", "image_url": {}}]), 400, "image_url.url: Field required"
    ),
    "image_url_empty": Bad(
        CHAT, with_image(""), 400, "image_url.url: String should have at least 1 character"
    ),
    "temperature_a_string": Bad(
        CHAT, chat("hi", temperature="hot"), 400, "temperature: Input should be a valid number"
    ),
    "max_tokens_a_float": Bad(
        CHAT, chat("hi", max_tokens=1.5), 400, "max_tokens: Input should be a valid integer"
    ),
    "unknown_model": Bad(
        CHAT, chat("hi", model="gpt-9"), 404, "The model `gpt-9` does not exist.", "model"
    ),
    # --- sampling parameters
    "temperature_nan": Bad(
        CHAT, NAN % (b"temperature", b"NaN"), 400,
        "temperature must be a finite number, got nan", "temperature",
    ),
    "top_p_infinity": Bad(
        CHAT, NAN % (b"top_p", b"Infinity"), 400, "top_p must be a finite number, got inf", "top_p"
    ),
    "frequency_penalty_minus_infinity": Bad(
        CHAT, NAN % (b"frequency_penalty", b"-Infinity"), 400,
        "frequency_penalty must be a finite number, got -inf", "frequency_penalty",
    ),
    "temperature_negative": Bad(
        CHAT, chat("hi", temperature=-1), 400, "temperature must be in [0, 100], got -1.0"
    ),
    "logit_bias_nan": Bad(
        CHAT, NAN % (b"logit_bias", b'{"5": NaN}'), 400,
        "logit_bias values must be in [-100, 100], got nan for token 5", "logit_bias",
    ),
    "logit_bias_key_not_an_id": Bad(
        CHAT, chat("hi", logit_bias={"hello": 1}), 400,
        "logit_bias.hello.[key]: Input should be a valid integer",
    ),
    "logit_bias_key_past_the_vocabulary": Bad(
        CHAT, chat("hi", logit_bias={"99999": 1}), 400,
        "logit_bias key 99999 is not a token id: the vocabulary has 512 tokens", "logit_bias",
    ),
    "logit_bias_value_over_100": Bad(
        CHAT, chat("hi", logit_bias={"5": 101}), 400,
        "logit_bias values must be in [-100, 100], got 101.0 for token 5",
    ),
    "max_tokens_absurd": Bad(
        CHAT, chat("hi", max_tokens=10**30), 400,
        f"max_tokens is {10**30}, more than this model's maximum context length of {CONTEXT}",
        "max_tokens",
    ),
    "max_tokens_past_the_room_left": Bad(
        CHAT, chat("hi", max_tokens=CONTEXT - 5), 400,
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested",
        "max_tokens",
    ),
    "max_tokens_zero": Bad(CHAT, chat("hi", max_tokens=0), 400, "max_tokens must be at least 1"),
    "n_too_large": Bad(CHAT, chat("hi", n=1000), 400, "n must be in [1, 128], got 1000", "n"),
    "stop_list_too_long": Bad(
        CHAT, chat("hi", stop=[f"s{i}" for i in range(17)]), 400, "at most 16 stop strings, got 17"
    ),
    "stop_string_too_long": Bad(
        CHAT, chat("hi", stop=["x" * 5000]), 400,
        "a stop string may have at most 1024 characters, got 5000",
    ),
    "stop_token_id_past_64_bits": Bad(
        CHAT, chat("hi", stop_token_ids=[2**64]), 400, "stop_token_ids must be token ids"
    ),
    "top_k_past_64_bits": Bad(CHAT, chat("hi", top_k=2**70), 400, "top_k must be -1 (off)"),
    "top_logprobs_over_20": Bad(
        CHAT, chat("hi", logprobs=True, top_logprobs=21), 400,
        "top_logprobs: Input should be less than or equal to 20",
    ),
    "prompt_over_the_context": Bad(
        CHAT, chat("word " * (CONTEXT + 50)), 400,
        f"This model's maximum context length is {CONTEXT} tokens. However, your prompt is",
        "messages",
    ),
    # --- images
    "data_uri_bad_base64": Bad(
        CHAT, with_image("data:image/png;base64,@@@"), 400, "data URI payload is not valid base64"
    ),
    "data_uri_wrong_mime": Bad(
        CHAT, with_image(data_uri(png(), "text/html")), 400,
        "data URI media type 'text/html' is not an image type",
    ),
    "data_uri_empty": Bad(
        CHAT, with_image("data:image/png;base64,"), 400, "data URI has an empty payload"
    ),
    "data_uri_not_base64": Bad(
        CHAT, with_image("data:image/png,abc"), 400, "data URI image must be base64-encoded"
    ),
    "non_image_bytes": Bad(
        CHAT, with_image(data_uri(b"%PDF-1.4 not an image at all")), 400,
        f"{UNDECODABLE}: not a PNG, JPEG, WebP, GIF or BMP image", "messages",
    ),
    "truncated_png": Bad(CHAT, with_image(data_uri(png(64, 48)[:60])), 400, UNDECODABLE),
    "truncated_jpeg": Bad(
        CHAT, with_image(data_uri(jpeg(64, 48)[:400], "image/jpeg")), 400, UNDECODABLE
    ),
    "bomb_100k_by_100k": Bad(
        CHAT, with_image(data_uri(png_header_only(100_000, 100_000))), 400,
        "image refused as a decompression bomb",
    ),
    "dimensions_over_the_pixel_limit": Bad(
        CHAT, with_image(data_uri(png_header_only(8000, 8000))), 400,
        "image is 8000x8000 = 64000000 pixels, more than the 50000000-pixel limit",
    ),
    "aspect_ratio_400_to_1": Bad(
        CHAT, with_image(data_uri(png(8000, 20))), 400, "image aspect ratio must be at most 200:1"
    ),
    "too_many_images": Bad(
        CHAT, chat([image(data_uri(png()))] * 5), 400,
        "too many images: 5 given, at most 4 per request",
    ),
    "url_loopback": Bad(CHAT, with_image("http://127.0.0.1:9/cat.png"), 400, PRIVATE),
    "url_localhost_name": Bad(
        CHAT, with_image("http://localhost:9/cat.png"), 400,
        f"image URL host localhost {PRIVATE} (127.0.0.1); start the server with "
        "--allow-private-media-urls",
    ),
    "url_ipv6_loopback": Bad(CHAT, with_image("http://[::1]:9/cat.png"), 400, PRIVATE),
    "url_private_10": Bad(CHAT, with_image("http://10.1.2.3/cat.png"), 400, PRIVATE),
    "url_link_local": Bad(CHAT, with_image("http://[fe80::1]/cat.png"), 400, PRIVATE),
    "url_cloud_metadata": Bad(
        CHAT, with_image("http://169.254.169.254/latest/meta-data/"), 400,
        f"image URL host 169.254.169.254 {PRIVATE}",
    ),
    "url_ftp": Bad(
        CHAT, with_image("ftp://1.1.1.1/cat.png"), 400, "unsupported image URL scheme 'ftp'"
    ),
    "local_path": Bad(CHAT, with_image("/etc/passwd"), 400, "local image paths are disabled"),
    "file_url": Bad(CHAT, with_image("file:///etc/passwd"), 400, "local image paths are disabled"),
    # --- /v1/completions
    "completions_without_prompt": Bad(
        COMPLETIONS, {"max_tokens": 2}, 400, "prompt: Field required", "prompt"
    ),
    "completions_token_id_past_64_bits": Bad(
        COMPLETIONS, {"prompt": [1, 2**64]}, 400, f"token id {2**64} is out of range", "prompt"
    ),
    "completions_token_id_past_the_vocabulary": Bad(
        COMPLETIONS, {"prompt": [1, 100_000]}, 400,
        "token id 100000 is out of range: the vocabulary has", "prompt",
    ),
    "completions_suffix": Bad(
        COMPLETIONS, {"prompt": "hi", "suffix": "end"}, 400,
        "unsupported parameter: suffix (Fovea does not implement it", "suffix",
    ),
    "completions_logprobs_over_5": Bad(
        COMPLETIONS, {"prompt": "hi", "logprobs": 6}, 400,
        "logprobs: Input should be less than or equal to 5",
    ),
    # --- fields Fovea does not implement: named, never silently ignored
    "chat_tools": Bad(
        CHAT, chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400,
        "unsupported parameter: tools (Fovea does not implement it; fields accepted and "
        "ignored: metadata, service_tier, store, user)", "tools",
    ),
    "chat_response_format_json_schema": Bad(
        CHAT, chat("hi", response_format={"type": "json_schema"}), 400,
        "unsupported parameter: response_format.type='json_schema'", "response_format.type",
    ),
    "chat_history_tool_calls": Bad(
        CHAT,
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]},
        400, "unsupported parameter: messages.0.tool_calls", "messages.0.tool_calls",
    ),
    "chat_continue_final_message_after_user": Bad(
        CHAT, chat("hi", continue_final_message=True), 400,
        "continue_final_message needs the last message to be the assistant's",
        "continue_final_message",
    ),
    # --- /generate
    "generate_text_and_input_ids": Bad(
        GENERATE, {"text": "hi", "input_ids": [1]}, 400, "give exactly one of text and input_ids"
    ),
    "generate_no_prompt": Bad(GENERATE, {}, 400, "give exactly one of text and input_ids"),
    "generate_unknown_sampling_key": Bad(
        GENERATE, {"text": "hi", "sampling_params": {"temprature": 0}}, 400,
        "unknown sampling parameter 'temprature'", "sampling_params",
    ),
    "generate_sampling_wrong_type": Bad(
        GENERATE, {"text": "hi", "sampling_params": {"temperature": "hot"}}, 400,
        "sampling_params: Expected `float`, got `str` - at `$.temperature`",
    ),
    "generate_temperature_nan": Bad(
        GENERATE, b'{"text": "hi", "sampling_params": {"temperature": NaN}}', 400,
        "temperature must be a finite number, got nan",
    ),
    "generate_logit_bias_key_not_an_id": Bad(
        GENERATE, {"text": "hi", "sampling_params": {"logit_bias": {"x": 1}}}, 400,
        "Expected `int`, got `str` - at `key` in `$.logit_bias`",
    ),
    "generate_image_data_misaligned": Bad(
        GENERATE, {"text": ["a", "b"], "image_data": "x"}, 400,
        "image_data must be a list with one entry for each of the 2 prompts", "image_data",
    ),
    "generate_image_without_placeholder": Bad(
        GENERATE, {"text": "hi", "image_data": data_uri(png())}, 400,
        "the prompt has 0 image placeholders but 1 images were given",
    ),
    # --- routing
    "unknown_route": Bad("/v1/nope", {}, 404, "Not Found: POST /v1/nope"),
    "wrong_method": Bad(
        CHAT, None, 405, "Method Not Allowed: GET /v1/chat/completions", method="GET"
    ),
    "body_over_the_limit": Bad(
        CHAT, chat("x" * MAX_BODY), 413,
        f"request body is larger than the {MAX_BODY}-byte limit (--max-request-bytes)",
    ),
}  # fmt: skip


class MediaHost:
    """GET /cat.png: a PNG. GET /drip.png: headers, then one byte every 0.4 s, forever (a
    slow-loris image server: every read returns within the read timeout)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = png() if self.path == "/cat.png" else png() * 1000
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/cat.png":
                    self.wfile.write(body)
                    return
                for b in body:
                    if host.stop.wait(0.4):
                        return
                    try:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
