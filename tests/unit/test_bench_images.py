"""bench/serving.py's image requests (W4-W6 shapes) and bench/image_server.py's answers."""

from __future__ import annotations

import base64
import io
import urllib.request

from PIL import Image

from fovea.bench import compare
from fovea.bench.image_server import ImageServer, image_bytes
from fovea.bench.prompts import Prompt
from fovea.bench.serving import images_of, parse_args, request_body, text_pieces


def _args(workload: str, *extra: str) -> object:
    return parse_args(["--model", "m", "--tokenizer", "t", *compare.WORKLOADS[workload], *extra])


def test_text_pieces_cut_at_words_and_join_back() -> None:
    assert text_pieces("a b c d e", 4) == ["a ", "b ", "c d ", "e"]
    assert text_pieces("abcdefg h", 4) == ["ab", "cd", "efg", " h"]  # few words: characters
    assert text_pieces("a b c", 1) == ["a b c"]


def test_w4_alternates_sizes_and_w5_repeats_eight_images() -> None:
    w4, w5 = _args("W4"), _args("W5")
    server = ImageServer(w4.image_sizes)  # type: ignore[attr-defined]
    try:
        urls = [images_of(w4, server, i)[0] for i in range(3)]  # type: ignore[arg-type]
        assert [u.rsplit("/", 1)[1] for u in urls] == ["0.jpg", "1.jpg", "2.jpg"]
        sizes = [Image.open(urllib.request.urlopen(u, timeout=10)).size for u in urls]
        assert sizes == [(448, 448), (1024, 768), (448, 448)]
        w5_ids = [images_of(w5, server, i)[0].rsplit("/", 1)[1] for i in range(17)]  # type: ignore[arg-type]
        assert w5_ids[:9] == [f"{100000 + k}.jpg" for k in range(8)] + ["100000.jpg"]
        assert len(set(w5_ids)) == 8
        req = urllib.request.Request(urls[0], headers={"If-None-Match": "nope"})
        etag = urllib.request.urlopen(req, timeout=10).headers["ETag"]
        assert server.requests() == 4
        assert etag.startswith('"') and len(etag) == 34
    finally:
        server.close()


def test_w6_interleaves_three_images_with_the_text() -> None:
    w6 = _args("W6", "--image-transport", "data")
    uris = images_of(w6, None, 1)  # type: ignore[arg-type]
    assert len(uris) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in uris)
    raw = base64.b64decode(uris[0].split(",", 1)[1])
    assert raw == image_bytes(200003, 448, 448) and Image.open(io.BytesIO(raw)).size == (448, 448)
    for prompt in ("one two three four five six seven eight", "onetwothree four"):
        body = request_body(w6, Prompt(prompt, []), 64, uris)  # type: ignore[arg-type]
        kinds = [p["type"] for p in body["messages"][0]["content"]]
        assert kinds == ["text", "image_url", "text", "image_url", "text", "image_url", "text"]
        texts = [p["text"] for p in body["messages"][0]["content"] if p["type"] == "text"]
        assert "".join(texts) == prompt
    assert body["max_tokens"] == 64 and body["ignore_eos"] is True
