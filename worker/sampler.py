"""Turn logits into next tokens, one row per sampling sequence, each with its own params.

Order: repetition penalty (HF semantics, over prompt + output), then frequency/presence
penalties (OpenAI, over output), then the grammar mask (worker/grammar.py: tokens the row's
grammar forbids become -inf), then logit_bias (added as given: -inf stays -inf), then
min_new_tokens masking (skipped for a row whose grammar allows nothing else: it must end).
Logprobs are log_softmax of those processed logits (before temperature), so a forbidden token
has logprob -inf. Then: all rows greedy
-> argmax; otherwise temperature, top_k, top_p, min_p and an exponential race (argmax p / E,
E ~ Exp(1)), which samples from p.
A row with a seed draws E from a generator re-seeded from (seed, output position), so its
tokens do not depend on its batch mates or on retraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fovea.common.messages import TokenLogprobs
from fovea.common.sampling import SamplingParams
from fovea.worker.attention.cpu_kernels import argmax_rows
from fovea.worker.grammar import SeqGrammar, allows_only, apply_masks

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position) pairs


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    grammar: SeqGrammar | None = None  # params.grammar's matcher state


def seed_for(seed: int, position: int) -> int:
    return (seed * _SEED_MIX + position) % (2**63)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], random_seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(random_seed)

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [n, vocab] float32 (modified in place) -> (token ids, logprobs per row)."""
        self._apply_penalties(logits, rows)
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        bitmask = apply_masks(logits, constrained) if constrained else None
        self._apply_logit_bias(logits, rows)
        self._mask_min_tokens(logits, rows, bitmask)
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs]
        lp = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
        if all(r.params.greedy for r in rows):
            tokens = argmax_rows(logits)
        else:
            tokens = self._sample_random(logits, rows)
        token_list: list[int] = tokens.tolist()
        if lp is not None:
            for j, i in enumerate(want_logprobs):
                logprobs[i] = _logprobs(lp[j], token_list[i], rows[i].params.top_logprobs)
        return token_list, logprobs

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        for i, r in enumerate(rows):
            p = r.params
            if not p.has_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0 and (r.prompt_ids or r.output_ids):
                seen = torch.tensor(sorted(set(r.prompt_ids + r.output_ids)), device=row.device)
                vals = row[seen]
                row[seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if (p.frequency_penalty or p.presence_penalty) and r.output_ids:
                out = torch.tensor(r.output_ids, device=row.device)
                counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _apply_logit_bias(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        for i, r in enumerate(rows):
            # Ids past the logits (tokenizer-only added tokens) cannot be sampled anyway.
            bias = {t: v for t, v in r.params.logit_bias.items() if t < logits.shape[1]}
            if bias:
                ids = torch.tensor(list(bias), device=logits.device)
                vals = torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
                logits[i, ids] += vals

    def _mask_min_tokens(
        self, logits: torch.Tensor, rows: list[SamplingRow], bitmask: torch.Tensor | None = None
    ) -> None:
        """Ban stop tokens before min_new_tokens. `bitmask`: apply_masks' grammar masks."""
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_ids) >= p.min_new_tokens:
                continue
            banned = list(p.stop_token_ids)
            if not p.ignore_eos or r.grammar is not None:
                banned += self.eos_token_ids
            banned = [t for t in banned if t < logits.shape[1]]
            if r.grammar is not None and bitmask is not None and allows_only(bitmask[i], banned):
                continue  # the grammar is complete: banning its stop tokens would ban all
            if banned:
                logits[i, banned] = float("-inf")

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        n, device = logits.shape[0], logits.device
        greedy = torch.tensor([r.params.greedy for r in rows], device=device)
        temps = [1.0 if r.params.greedy else r.params.temperature for r in rows]
        scaled = logits / torch.tensor(temps, device=device, dtype=logits.dtype)[:, None]
        top_ks = [r.params.top_k if r.params.top_k > 0 else 0 for r in rows]
        top_ps = [r.params.top_p for r in rows]
        if any(top_ks) or any(t < 1.0 for t in top_ps):
            scaled = _top_k_top_p(scaled, top_ks, top_ps)
        probs = torch.softmax(scaled, dim=-1)
        min_ps = [r.params.min_p for r in rows]
        if any(min_ps):
            floor = torch.tensor(min_ps, device=device)[:, None] * probs.amax(-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (p need not sum to 1).
        noise = torch.empty(n, logits.shape[1], device="cpu")
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            draw = torch.empty(len(unseeded), logits.shape[1]).exponential_(
                generator=self.generator
            )
            noise[unseeded] = draw
        gen = torch.Generator()
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                gen.manual_seed(seed_for(r.params.seed, len(r.output_ids)))
                noise[i].exponential_(generator=gen)
        sampled = argmax_rows(probs / noise.to(device))
        return torch.where(greedy, argmax_rows(logits), sampled)


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Mask (-inf) tokens outside each row's top_k (0: off) and top_p nucleus: the smallest
    set of highest-probability tokens whose probabilities sum to at least top_p."""
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, vocab]
    ranks = torch.arange(logits.shape[1], device=device)[None, :]
    ks = torch.tensor([k if k > 0 else logits.shape[1] for k in top_ks], device=device)
    drop = ranks >= ks[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    ps = torch.tensor(top_ps, device=device, dtype=logits.dtype)[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly higher-ranked tokens
    drop |= (before >= ps) & (ps < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _logprobs(lp: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    if k == 0:
        return TokenLogprobs(float(lp[token]), [], [])
    vals, ids = lp.topk(k)
    return TokenLogprobs(float(lp[token]), ids.tolist(), vals.tolist())
