"""Output grammars in the worker: each constrained sequence's xgrammar matcher, and the token
masks applied to its logits before sampling.

Lifecycle of one sequence's `SeqGrammar`:
- admitted (NewSequence): its grammar starts compiling on this rank's compile thread
  (`WorkerGrammars.start`; the tokenizer service already proved the spec compiles, within
  --grammar-compile-timeout). Prefill chunks run meanwhile.
- first sampling step: the step waits for the compile, then builds the matcher and replays
  the sequence's output tokens into it. A sequence re-sent after a retraction carries its
  earlier outputs after the prompt (NewSequence.input_ids[num_prompt_tokens:]): replaying them
  rebuilds the exact state it had. A prefix-cache hit changes nothing: the matcher only ever
  sees outputs.
- each step: `apply_masks` fills the rows' bitmasks and sets every token the grammar forbids to
  -inf; after sampling, `accept` advances the matcher by the sampled token.
- dropped (finish, abort, retraction): the object goes with the sequence.

Stop tokens (the model's EOS ids) are masked until the grammar is complete; an EOS sampled then
ends the sequence in the scheduler (scheduler/scheduler.py, even under ignore_eos), so a
matcher is never asked for a mask after it terminated.

Tensor parallelism: every rank compiles the same spec and sees the same logits and tokens, so
every rank applies the same masks and samples the same token.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fovea.common.grammar_compiler import compile_grammar, import_xgrammar, make_compiler
from fovea.common.sampling import Grammar

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)

_BITS = torch.arange(32, dtype=torch.int32)  # bit j of a mask word: token 32 * word + j


class WorkerGrammars:
    """This rank's compiler (built on the first grammar, from the served tokenizer) and its
    one compile thread, so compiles never run on the step loop."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size  # the logits' width
        self.eos_token_ids = list(eos_token_ids)
        # One thread: jobs run in order, and the first builds the compiler.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._compiler: xgrammar.GrammarCompiler | None = None

    def _compile(self, grammar: Grammar) -> xgrammar.CompiledGrammar:
        if self._compiler is None:
            t0 = time.perf_counter()
            import_xgrammar()  # first, under its lock: it imports transformers too
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(self.tokenizer_path)
            self._compiler = make_compiler(hf, self.vocab_size, self.eos_token_ids, 1)
            log.info("grammar compiler ready in %.1f s", time.perf_counter() - t0)
        return compile_grammar(self._compiler, grammar)

    def start(self, grammar: Grammar, outputs: list[int]) -> SeqGrammar:
        """A sequence's grammar, compiling in the background; `outputs`: tokens it already
        generated (a re-admission after a retraction), replayed when its matcher is built."""
        return SeqGrammar(self._pool.submit(self._compile, grammar), outputs)


class SeqGrammar:
    """One sequence's matcher (single-threaded: only the step loop touches it)."""

    def __init__(self, compiled: Future[Any], replay: list[int]) -> None:
        self._compiled = compiled
        self._replay = list(replay)
        self._matcher: xgrammar.GrammarMatcher | None = None

    @property
    def matcher(self) -> xgrammar.GrammarMatcher:
        """The matcher, built on first use (waits for the compile; a compile that fails here
        passed the tokenizer service's, so it is a worker fault and raises)."""
        if self._matcher is None:
            xgr = import_xgrammar()
            matcher = xgr.GrammarMatcher(self._compiled.result())
            for token in self._replay:
                if not matcher.accept_token(token):
                    raise RuntimeError(f"grammar refused replayed output token {token}")
            self._matcher = matcher
        return self._matcher

    def accept(self, token: int) -> None:
        """Advance by the token just sampled (the mask allowed only tokens it accepts)."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"grammar refused sampled token {token}")


def apply_masks(logits: torch.Tensor, rows: list[tuple[int, SeqGrammar]]) -> torch.Tensor:
    """Set to -inf, in place, every token row i's grammar forbids next, for each (i, grammar)
    in `rows`; other rows are untouched. Returns the bitmasks, int32 [logits rows, ceil(V / 32)]
    (bit j of word w of row i: token 32w + j is allowed for row i; rows not in `rows` unset)."""
    xgr = import_xgrammar()
    bitmask: torch.Tensor = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for i, g in rows:
        if g.matcher.is_terminated():
            raise RuntimeError("sampling a sequence whose grammar has terminated")
        g.matcher.fill_next_token_bitmask(bitmask, i)
    indices = [i for i, _ in rows]
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)  # C++ kernel
    else:  # GPUs: xgrammar's kernel needs triton, which is not installed
        mask_rows_torch(logits, bitmask, indices)
    return bitmask


def mask_rows_torch(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int]) -> None:
    """apply_token_bitmask_inplace(logits, bitmask, indices=indices) in torch ops, on any
    device: logits [n, V], bitmask int32 [n, ceil(V / 32)] on the CPU."""
    rows_t = torch.tensor(indices, device=logits.device)
    allowed = unpack_bitmask(bitmask[indices].to(logits.device), logits.shape[1])
    logits[rows_t] = logits[rows_t].masked_fill(~allowed, float("-inf"))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [n, words] -> bool [n, vocab]: token t allowed where bit t % 32 of word t // 32."""
    bits = (bitmask[:, :, None] >> _BITS.to(bitmask.device)) & 1  # [n, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def allows_only(bitmask_row: torch.Tensor, tokens: list[int]) -> bool:
    """Whether a mask row (int32 [words]) allows no token outside `tokens`."""
    words = bitmask_row.numpy().view(np.uint32).copy()
    for t in tokens:
        if t >> 5 < words.shape[0]:
            words[t >> 5] &= ~np.uint32(1 << (t & 31))
    return not words.any()
