"""Per-request accounting at the server: timing (TTFT, inter-token, end to end), one log line
when a request ends, and the request metrics.

The log line carries id, prompt/completion/cached tokens, images, TTFT, total time and finish
reason; with --log-requests also the prompt and output text. With --log-format json the same
fields are keys of the JSON line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fovea.common import metrics as fovea_metrics
from fovea.common.messages import GenerateRequest, TextDelta

log = logging.getLogger("fovea.requests")


def count_images(req: GenerateRequest) -> int:
    n = len(req.images)
    for m in req.messages or []:
        if isinstance(m.content, list):
            n += sum(1 for p in m.content if p.get("type") in ("image_url", "image", "input_image"))
    return n


class RequestRecord:
    __slots__ = (
        "cached", "completion", "first", "last", "log_content", "metrics", "output", "prompt",
        "req", "start",
    )  # fmt: skip

    def __init__(self, req: GenerateRequest, log_content: bool) -> None:
        self.req = req
        self.start = time.monotonic()
        self.first: float | None = None  # when the first token arrived
        self.last = self.start
        self.prompt = 0
        self.cached = 0
        self.completion: dict[int, int] = {}  # per sequence index
        self.log_content = log_content
        self.output: list[str] = []
        self.metrics = fovea_metrics.get()

    def on_delta(self, d: TextDelta) -> None:
        now = time.monotonic()
        n = len(d.token_ids)
        if n and self.metrics is not None:
            # Every token after the first gets one inter-token sample: the tokens of one delta
            # share the gap since the previous delta (0 for those riding with the first token).
            if self.first is None:
                self.metrics.time_to_first_token.observe(now - self.start)
                gaps = [0.0] * (n - 1)
            else:
                gaps = [(now - self.last) / n] * n
            for gap in gaps:
                self.metrics.inter_token_latency.observe(gap)
        if n:
            self.first = self.first if self.first is not None else now
            self.last = now
        self.prompt, self.cached = d.prompt_tokens, max(self.cached, d.cached_tokens)
        self.completion[d.index] = d.completion_tokens
        if self.log_content and d.text:
            self.output.append(d.text)

    def finish(self, reason: str) -> None:
        """reason: the sequences' finish reason(s), "error" or "abort"."""
        now = time.monotonic()
        fields: dict[str, Any] = {
            "rid": self.req.rid,
            "prompt_tokens": self.prompt,
            "completion_tokens": sum(self.completion.values()),
            "cached_tokens": self.cached,
            "images": count_images(self.req),
            "ttft_ms": round((self.first - self.start) * 1e3, 1) if self.first else None,
            "total_ms": round((now - self.start) * 1e3, 1),
            "finish_reason": reason,
        }
        if self.log_content:
            fields["prompt"] = (
                self.req.text
                or self.req.input_ids
                or [{"role": m.role, "content": m.content} for m in self.req.messages or []]
            )
            fields["output"] = "".join(self.output)
        if self.metrics is not None:
            self.metrics.e2e_request_latency.observe(now - self.start)
            self.metrics.requests.labels(reason).inc()
        text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("prompt", "output"))
        if self.log_content:
            text += f" prompt={fields['prompt']!r} output={fields['output']!r}"
        log.info("request done %s", text, extra={"fields": fields})
