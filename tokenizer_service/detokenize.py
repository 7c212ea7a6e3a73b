"""Incremental detokenization of the scheduler's token stream, with stop strings.

Per sequence (rid, index): an `IncrementalDecoder` turns token ids into text a token at a time
(vLLM/SGLang prefix_offset/read_offset scheme), and the sequence's unsent text is checked
against its stop strings. Invariants:
- no emitted text ends in a partial UTF-8 character (no U+FFFD for a char split across byte-level
  tokens); a partial char is emitted only by the final flush of a finished sequence;
- no emitted text contains a stop string, and text that ends with a proper prefix of a stop
  string is held back until it either completes the stop (then dropped) or cannot any more;
- prompt logprobs (SamplingParams.prompt_logprobs) arrive on each index's first SeqOutput and
  leave on its first TextDelta; the list converted for the first index is sent for every index.
  The first prompt token has no logprob: its entry carries its text and id, logprob nan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from fovea.common.messages import (
    AbortRequest,
    RequestError,
    SeqOutput,
    TextDelta,
    TextLogprob,
    TokenBatch,
    TokenLogprobs,
    TopLogprob,
)
from fovea.common.sampling import SamplingParams

log = logging.getLogger("fovea.tokenizer")

# Prompt tokens decoded ahead of the output: a SentencePiece-style tokenizer drops the leading
# space of a window's first token, so the first output token needs left context.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"

DecodeFn = Callable[[list[int]], str]


def make_decode(tokenizer: Any, skip_special_tokens: bool) -> DecodeFn:
    """ids -> text without tokenization-space cleanup (cleanup is not incremental)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: str(backend.decode(ids, skip_special_tokens=skip_special_tokens))
    return lambda ids: str(
        tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
    )


class IncrementalDecoder:
    """Decodes only the window ids[prefix_offset:] each step: text(ids[prefix:read]) is what was
    already emitted, and the new text is what decoding the window adds after it."""

    def __init__(self, decode: DecodeFn, context: list[int]) -> None:
        self._decode = decode
        if context and decode(context).endswith(_REPLACEMENT):
            context = []  # the prompt ends mid-character: no usable left context
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; "" while a character is still partial."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Everything not yet returned, a trailing partial character included (at finish)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


def find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in text (ties: the shorter one, which completed first)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
            best = (i, s)
    return best


def held_back_length(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class _Seq:
    __slots__ = ("decoder", "logprobs", "prompt_logprobs", "token_ids", "unsent")

    def __init__(self, decoder: IncrementalDecoder, want_logprobs: bool) -> None:
        self.decoder = decoder
        self.unsent = ""  # decoded text not yet emitted (held back, or new this step)
        self.token_ids: list[int] = []  # tokens not yet reported in a delta
        self.logprobs: list[TextLogprob] | None = [] if want_logprobs else None
        # Received, not yet sent: goes out on the sequence's next (first) delta.
        self.prompt_logprobs: list[TextLogprob] | None = None


class _Request:
    __slots__ = ("prompt_ids", "prompt_logprobs", "sampling", "seqs")

    def __init__(
        self, sampling: SamplingParams, seqs: dict[int, _Seq], prompt_ids: list[int] | None
    ) -> None:
        self.sampling = sampling
        self.seqs = seqs  # live sequences only: removed when they finish
        self.prompt_ids = prompt_ids  # kept only when prompt logprobs are wanted
        self.prompt_logprobs: list[TextLogprob] | None = None  # converted once


class Detokenized(NamedTuple):
    deltas: list[TextDelta]
    aborts: list[AbortRequest]  # to the scheduler: sequences finished by a stop string
    errors: list[RequestError]  # to the server: requests that failed here


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._decoders = {skip: make_decode(tokenizer, skip) for skip in (False, True)}
        self._requests: dict[str, _Request] = {}
        self._token_text: dict[int, str] = {}  # id -> its text for logprobs (vocab-bounded)

    def __contains__(self, rid: str) -> bool:
        return rid in self._requests

    def add(self, rid: str, sampling: SamplingParams, prompt_ids: list[int]) -> None:
        """Register the request's n sequences before any of their tokens can arrive."""
        decode = self._decoders[sampling.skip_special_tokens]
        context = prompt_ids[-PROMPT_CONTEXT_TOKENS:]
        seqs = {
            i: _Seq(IncrementalDecoder(decode, context), sampling.logprobs)
            for i in range(sampling.n)
        }
        kept = prompt_ids if sampling.prompt_logprobs else None
        self._requests[rid] = _Request(sampling, seqs, kept)

    def drop(self, rid: str) -> None:
        self._requests.pop(rid, None)

    def process(self, batch: TokenBatch) -> Detokenized:
        result = Detokenized([], [], [])
        for out in batch.outputs:
            req = self._requests.get(out.rid)
            seq = req.seqs.get(out.index) if req is not None else None
            if req is None or seq is None:
                continue  # already finished or aborted
            try:
                delta = self._step(req, seq, out)
            except Exception as e:
                log.exception("rid=%s index=%d: detokenization failed", out.rid, out.index)
                self.drop(out.rid)
                result.errors.append(
                    RequestError(rid=out.rid, message=f"detokenization failed: {e}", status=500)
                )
                result.aborts.append(AbortRequest(out.rid, None, "error"))
                continue
            if delta is None:
                continue
            result.deltas.append(delta)
            if delta.finish_reason is not None:
                del req.seqs[out.index]
                if not req.seqs:
                    del self._requests[out.rid]
                if isinstance(delta.matched_stop, str):
                    result.aborts.append(AbortRequest(out.rid, out.index, "stop"))
        return result

    def _step(self, req: _Request, seq: _Seq, out: SeqOutput) -> TextDelta | None:
        p = req.sampling
        ids = out.new_token_ids
        base = out.completion_tokens - len(ids)  # tokens generated before this output
        if out.prompt_logprobs is not None:
            seq.prompt_logprobs = self._prompt_logprobs(req, out.prompt_logprobs)
        # A stop token (eos / stop_token_ids) finishes the sequence but is not part of its text.
        num_text = (
            len(ids) - 1
            if out.finish_reason == "stop" and out.matched_stop is not None
            else len(ids)
        )
        for k, token_id in enumerate(ids):
            seq.token_ids.append(token_id)
            if seq.logprobs is not None and out.logprobs is not None:
                seq.logprobs.append(self._text_logprob(token_id, out.logprobs[k]))
            if k >= num_text:
                continue
            seq.unsent += seq.decoder.push(token_id)
            if p.stop and base + k + 1 >= p.min_new_tokens:
                hit = find_stop(seq.unsent, p.stop)
                if hit is not None:
                    return self._delta(out, seq, seq.unsent[: hit[0]], "stop", hit[1], base + k + 1)
        if out.finish_reason is not None:
            text = seq.unsent + seq.decoder.flush()
            return self._delta(
                out, seq, text, out.finish_reason, out.matched_stop, out.completion_tokens
            )
        end = len(seq.unsent) - held_back_length(seq.unsent, p.stop)
        if end == 0:
            return None  # nothing to say yet: the tokens ride along with the next delta
        text, seq.unsent = seq.unsent[:end], seq.unsent[end:]
        return self._delta(out, seq, text, None, None, out.completion_tokens)

    def _delta(
        self,
        out: SeqOutput,
        seq: _Seq,
        text: str,
        finish_reason: str | None,
        matched_stop: int | str | None,
        completion_tokens: int,
    ) -> TextDelta:
        token_ids, seq.token_ids = seq.token_ids, []
        logprobs = seq.logprobs
        if logprobs is not None:
            seq.logprobs = []
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return TextDelta(
            rid=out.rid,
            index=out.index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            matched_stop=matched_stop,
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens,
            completion_tokens=completion_tokens,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(
        self, req: _Request, entries: list[TokenLogprobs | None]
    ) -> list[TextLogprob]:
        """The request's prompt logprobs as text: entry i for prompt token i (entry 0: nan, no
        alternatives). Converted from
        the first index's entries; every index gets that list."""
        if req.prompt_logprobs is None:
            if req.prompt_ids is None:
                raise ValueError("prompt logprobs for a request that did not ask for them")
            req.prompt_logprobs = [
                TextLogprob(self._token_str(token_id), token_id, math.nan, [])
                if lp is None
                else self._text_logprob(token_id, lp)
                for token_id, lp in zip(req.prompt_ids, entries, strict=True)
            ]
        return req.prompt_logprobs

    def _token_str(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._decoders[False]([token_id])
        return text

    def _text_logprob(self, token_id: int, lp: TokenLogprobs) -> TextLogprob:
        top = [
            TopLogprob(self._token_str(t), t, v)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
        return TextLogprob(self._token_str(token_id), token_id, lp.logprob, top)
