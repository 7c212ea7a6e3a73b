"""Prompt (input) token logprobs, for sequences whose SamplingParams.prompt_logprobs is set.

A step that computes prompt positions [start, end) of such a sequence reports the entries of
prompt tokens start+1 .. min(end, P - 1) (P = prompt length): entry i is log p(token i |
tokens < i), from the raw model logits at position i - 1 (no penalties, bias or temperature),
with the top `top_logprobs` alternatives. Entry 0 has no context and is never computed; the
token after position P - 1 is the sampled one, reported as the first output logprob. The
runner knows every prompt token, so a chunk's last position gets the first token of the next
chunk as its target.

Only these rows go through the LM head beyond the sampled ones, in blocks of BLOCK_ROWS so
that a long chunk never holds [chunk, vocab] logits at once. Every tensor-parallel rank runs
the same blocks (the LM head gathers the vocabulary across ranks); only rank 0 turns them into
logprobs, since only its results are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fovea.common.messages import TokenLogprobs
from fovea.common.sampling import SamplingParams

BLOCK_ROWS = 512  # [512, vocab] float32 logits at a time: 300 MiB at a 150k vocabulary


@dataclass
class PromptSpan:
    """Consecutive batch rows of one chunk whose next prompt token's logprob is wanted."""

    key: str
    first_row: int  # row of the step's hidden states holding position `start`
    targets: list[int]  # the next prompt token of each row: prompt[start + 1 : end + 1]
    top_k: int


def prompt_span(
    key: str,
    params: SamplingParams,
    token_ids: list[int],
    num_prompt: int,
    start: int,
    n: int,
    first_row: int,
) -> PromptSpan | None:
    """The span of a chunk computing positions [start, start + n) at batch rows
    [first_row, first_row + n), or None when it has no position with a next prompt token
    (or the sequence does not want prompt logprobs)."""
    end = min(start + n, num_prompt - 1)  # positions [start, end) have a next prompt token
    if not params.prompt_logprobs or end <= start:
        return None
    return PromptSpan(key, first_row, token_ids[start + 1 : end + 1], params.top_logprobs)


def prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    spans: list[PromptSpan],
    report: bool,
) -> dict[str, list[TokenLogprobs]]:
    """hidden [T, hidden] of the step -> each span's entries by key (empty unless `report`).
    `compute_logits` ([m, hidden] -> [m, vocab] float32) runs once per block on every rank."""
    device = hidden.device
    ranges = [torch.arange(s.first_row, s.first_row + len(s.targets)) for s in spans]
    rows = torch.cat(ranges).to(device)  # [R] batch rows, span after span
    targets = torch.tensor([t for s in spans for t in s.targets], device=device)  # [R]
    ks = [s.top_k for s in spans for _ in s.targets]  # [R]
    chosen: list[float] = []
    top_ids: list[list[int]] = []
    top_vals: list[list[float]] = []
    for b in range(0, len(ks), BLOCK_ROWS):
        logits = compute_logits(hidden[rows[b : b + BLOCK_ROWS]])  # [m, vocab] float32
        if not report:
            continue
        lp = torch.log_softmax(logits.float(), dim=-1)  # [m, vocab]
        chosen += lp.gather(1, targets[b : b + BLOCK_ROWS, None])[:, 0].tolist()
        block_ks = ks[b : b + BLOCK_ROWS]
        k = max(block_ks)
        if k == 0:
            top_ids += [[]] * len(block_ks)
            top_vals += [[]] * len(block_ks)
            continue
        vals, ids = lp.topk(k, dim=-1)  # [m, k], descending
        for kr, id_row, val_row in zip(block_ks, ids.tolist(), vals.tolist(), strict=True):
            top_ids.append(id_row[:kr])
            top_vals.append(val_row[:kr])
    out: dict[str, list[TokenLogprobs]] = {}
    if not report:
        return out
    i = 0
    for s in spans:
        m = len(s.targets)
        out.setdefault(s.key, []).extend(
            TokenLogprobs(chosen[j], top_ids[j], top_vals[j]) for j in range(i, i + m)
        )
        i += m
    return out
