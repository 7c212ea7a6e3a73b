"""SGLang's /generate answers: cumulative text and ids with meta_info, and its logprob
entries."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fovea.common.messages import TextDelta, TextLogprob, TopLogprob
from fovea.common.sampling import SamplingParams
from fovea.server.responses import Renderer


def _native_logprob(x: TextLogprob | TopLogprob, text: bool) -> list[Any]:
    """SGLang's entry: [logprob, token id, token text or null]; a prompt's first token has no
    logprob (nan on the wire, null here)."""
    value = x.logprob if x.logprob == x.logprob else None
    return [value, x.token_id, x.token if text else None]


class NativeRenderer(Renderer):
    """SGLang's /generate: cumulative text and ids, meta_info; one dict for one prompt (not
    given as a list) and n = 1, else a list in choice order (prompt * n + sample).

    With `return_logprob`: meta_info's output_token_logprobs (and output_top_logprobs when
    `top_logprobs_num` > 0), and input_token_logprobs for the prompt tokens from
    `logprob_start_len` on (-1: none), so that prompt_tokens == start + len(input entries)."""

    def __init__(
        self,
        rids: list[str],
        sampling: SamplingParams,
        *,
        batch: bool = False,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        return_text_in_logprobs: bool = False,
    ) -> None:
        super().__init__(rids[0], "", sampling, False, n_prompts=len(rids))
        self.rids = rids
        self.many = batch or len(rids) * sampling.n > 1
        self.return_logprob, self.start = return_logprob, logprob_start_len
        self.with_text = return_text_in_logprobs
        self._text: dict[int, str] = {}
        self._ids: dict[int, list[int]] = {}
        self._out_lps: dict[int, list[TextLogprob]] = {}
        self._in_lps: dict[int, list[TextLogprob]] = {}
        self.started = time.monotonic()

    async def collect(self, deltas: AsyncIterator[TextDelta]) -> Any:
        outs: dict[int, dict[str, Any]] = {}
        async for d in deltas:
            outs[d.index] = self._accumulate(d)
        items = [outs[i] for i in sorted(outs)]
        return items if self.many else items[0]

    def _id(self, index: int) -> str:
        rid = self.rids[index // self.sampling.n]
        sample = index % self.sampling.n
        return rid if sample == 0 else f"{rid}#{sample}"

    def _accumulate(self, d: TextDelta) -> dict[str, Any]:
        text = self._text.get(d.index, "") + d.text
        ids = self._ids.setdefault(d.index, [])
        ids.extend(d.token_ids)
        self._text[d.index] = text
        reason: dict[str, Any] | None = None
        if d.finish_reason == "length":
            reason = {"type": "length", "length": d.completion_tokens}
        elif d.finish_reason is not None:
            reason = {"type": d.finish_reason, "matched": d.matched_stop}
        meta: dict[str, Any] = {
            "id": self._id(d.index),
            "finish_reason": reason,
            "prompt_tokens": d.prompt_tokens,
            "completion_tokens": d.completion_tokens,
            "cached_tokens": d.cached_tokens,
        }
        if d.finish_reason is not None:
            meta["e2e_latency"] = time.monotonic() - self.started
        if self.return_logprob:
            self._logprobs(d, meta)
        out: dict[str, Any] = {"text": text, "output_ids": list(ids), "meta_info": meta}
        if self.many:
            out["index"] = d.index
        return out

    def _logprobs(self, d: TextDelta, meta: dict[str, Any]) -> None:
        outs = self._out_lps.setdefault(d.index, [])
        outs.extend(d.logprobs or [])
        if d.prompt_logprobs is not None and self.start >= 0:
            self._in_lps[d.index] = list(d.prompt_logprobs[self.start :])
        ins = self._in_lps.get(d.index, [])
        meta["input_token_logprobs"] = [_native_logprob(x, self.with_text) for x in ins]
        meta["output_token_logprobs"] = [_native_logprob(x, self.with_text) for x in outs]
        if self.sampling.top_logprobs > 0:
            meta["input_top_logprobs"] = [self._top(x) for x in ins]
            meta["output_top_logprobs"] = [self._top(x) for x in outs]

    def _top(self, x: TextLogprob) -> list[list[Any]] | None:
        if x.logprob != x.logprob:  # a prompt's first token: nothing before it
            return None
        return [_native_logprob(t, self.with_text) for t in x.top]

    def chunks(self, d: TextDelta) -> list[dict[str, Any]]:
        return [self._accumulate(d)]


def kv_pools(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Usage of each KV pool: "global" (every layer, or the global layers of a model with
    sliding-window layers) and "local" (those layers' own pool, when there is one). `kind`
    is what a slot holds ("kv": K and V rows; "mla_latent": one MLA latent row) and
    `bytes_per_token` what a token takes in that pool on each rank, all its layers. Used
    slots are held by running sequences or the prefix tree."""
    pools: dict[str, dict[str, Any]] = {
        "global": {
            "kind": stats["kv_kind"],
            "bytes_per_token": stats["kv_bytes_per_token"],
            "total_slots": stats["total_slots"],
            "free_slots": stats["free_slots"],
            "tree_slots": stats["tree_slots"],
            "used_slots": stats["total_slots"] - stats["free_slots"],
        }
    }
    if stats["local_slots"]:
        pools["local"] = {
            "kind": stats["kv_kind"],
            "bytes_per_token": stats["local_kv_bytes_per_token"],
            "total_slots": stats["local_slots"],
            "free_slots": stats["local_free_slots"],
            "tree_slots": stats["local_tree_slots"],
            "used_slots": stats["local_slots"] - stats["local_free_slots"],
            "freed_early": stats["local_freed_early"],
            "sliding_window": stats["sliding_window"],
        }
    return pools
