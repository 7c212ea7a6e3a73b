"""The per-request log line: exact fields, the text form, and content only with --log-requests."""

from __future__ import annotations

import logging

import pytest

from fovea.common.messages import ChatMessage, GenerateRequest, ImageRef, TextDelta
from fovea.common.sampling import SamplingParams
from fovea.server.request_log import RequestRecord, count_images


def delta(text: str, ids: list[int], done: str | None = None) -> TextDelta:
    return TextDelta("r1", 0, text, ids, None, done, None, 5, 2, 0)


def test_log_line_fields(caplog: pytest.LogCaptureFixture) -> None:
    msgs = [
        ChatMessage(
            "user",
            [{"type": "image_url", "image_url": {"url": "a"}}, {"type": "text", "text": "hi"}],
        )
    ]
    req = GenerateRequest(rid="r1", sampling=SamplingParams(), messages=msgs)
    assert count_images(req) == 1
    assert (
        count_images(
            GenerateRequest(
                rid="x", sampling=SamplingParams(), text="t", images=[ImageRef(url="u")] * 2
            )
        )
        == 2
    )
    for log_content in (False, True):
        caplog.clear()
        rec = RequestRecord(req, log_content)
        d1 = delta("Hel", [7])
        d2 = delta("lo", [8, 9], "stop")
        d2.completion_tokens = 3
        rec.on_delta(d1)
        rec.on_delta(d2)
        with caplog.at_level(logging.INFO, logger="fovea.requests"):
            rec.finish("stop")
        [r] = caplog.records
        fields = r.fields  # type: ignore[attr-defined]
        assert {k: fields[k] for k in ("rid", "prompt_tokens", "completion_tokens", "cached_tokens", "images", "finish_reason")} == {
            "rid": "r1", "prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 2, "images": 1, "finish_reason": "stop",
        }  # fmt: skip
        assert fields["ttft_ms"] <= fields["total_ms"]
        text = r.getMessage()
        assert text.startswith(
            "request done rid=r1 prompt_tokens=5 completion_tokens=3 cached_tokens=2 images=1 ttft_ms="
        )
        if log_content:
            assert fields["output"] == "Hello"
            assert fields["prompt"] == [{"role": "user", "content": msgs[0].content}]
            assert text.endswith(f" prompt={fields['prompt']!r} output='Hello'")
        else:
            assert "output" not in fields and "prompt" not in fields
