"""Grammars in the worker (worker/grammar.py, worker/sampler.py) driven by the real scheduler
core on a tiny random Llama: random weights can produce schema-valid JSON only if every step's
mask is right. Constrained and unconstrained sequences in one batch, retraction and
re-admission, prefix-cache hits, n > 1, min_tokens and ignore_eos against a complete grammar,
logprobs under the mask, and the two mask kernels agreeing."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from fake_worker import assert_idle_invariant
from worker_driver import make_runner

from fovea.common.messages import AbortRequest, StepPlan, TokenizedRequest
from fovea.common.sampling import Grammar, SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.worker.grammar import WorkerGrammars, apply_masks, mask_rows_torch
from fovea.worker.model_runner import ModelRunner

pytest.importorskip("xgrammar")

EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"enum": ["x", "yz", "w"]},
        "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["a", "b", "c"],
}
JSON = Grammar("json_schema", json.dumps(SCHEMA))
PROMPT = [5, 17, 99, 300, 42, 7, 8, 250, 11]


@pytest.fixture(scope="module")
def runner(tiny_llama: Path) -> ModelRunner:
    return make_runner(tiny_llama)


@pytest.fixture(scope="module")
def tok(tiny_llama: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def sampling(grammar: Grammar | None = JSON, **kw: Any) -> SamplingParams:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_new_tokens", 48)
    return SamplingParams(grammar=grammar, **kw)


def run(
    runner: ModelRunner,
    reqs: list[tuple[str, list[int], SamplingParams]],
    num_slots: int = 512,
    plans: list[StepPlan] | None = None,
    **config: Any,
) -> tuple[Scheduler, dict[str, list[int]]]:
    """Every request through a fresh scheduler core (SchedulerConfig `config`) and `runner`
    until idle: each sequence's output tokens by rid (when some n > 1: by rid#index)."""
    cfg = SchedulerConfig(context_length=1024, eos_token_ids=(EOS,), **config)
    sched = Scheduler(cfg, num_slots)
    for rid, ids, sp in reqs:
        for i in range(sp.n):
            sched.handle(TokenizedRequest(rid=rid, index=i, input_ids=ids, sampling=sp))
    run_to_idle(sched, runner, plans)
    by_index = any(sp.n > 1 for *_, sp in reqs)
    out: dict[str, list[int]] = {}
    for o in sched.outputs:
        out.setdefault(f"{o.rid}#{o.index}" if by_index else o.rid, []).extend(o.new_token_ids)
    return sched, out


def run_to_idle(sched: Scheduler, runner: ModelRunner, plans: list[StepPlan] | None = None) -> None:
    """Step until idle (the plans sent go to `plans`), then let the runner forget the
    sequences that finished last."""
    for _ in range(2000):
        if not sched.has_work:
            runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
            assert not runner.seqs
            return
        plan = sched.schedule()
        assert plan is not None
        if plans is not None:
            plans.append(plan)
        sched.process_result(runner.step(plan))
    raise AssertionError("no progress")


def valid_json(tok: Any, tokens: list[int]) -> dict[str, Any]:
    assert tokens[-1] == EOS, "the grammar completed and the sequence stopped on EOS"
    value = json.loads(tok.decode(tokens[:-1]))
    jsonschema.validate(value, SCHEMA)
    return value  # type: ignore[no-any-return]


def test_constrained_and_unconstrained_in_one_batch(runner: ModelRunner, tok: Any) -> None:
    _, alone = run(runner, [("free", PROMPT, sampling(None, max_new_tokens=24))])
    _, mixed = run(
        runner,
        [
            ("greedy", PROMPT, sampling()),
            ("free", PROMPT, sampling(None, max_new_tokens=24)),
            ("hot", PROMPT[:5], sampling(temperature=1.0, seed=7)),
        ],
    )
    assert mixed["free"] == alone["free"]  # the masks touch only their own rows
    valid_json(tok, mixed["greedy"])
    valid_json(tok, mixed["hot"])
    # Unconstrained, this model does not write JSON: the grammar made the difference.
    with pytest.raises(ValueError):
        json.loads(tok.decode(alone["free"]))


def test_many_seeds_at_temperature_one_all_valid(runner: ModelRunner, tok: Any) -> None:
    reqs = [(f"s{i}", PROMPT[: 3 + i % 6], sampling(temperature=1.0, seed=i)) for i in range(12)]
    _, out = run(runner, reqs)
    values = [valid_json(tok, out[f"s{i}"]) for i in range(12)]
    assert len({json.dumps(v) for v in values}) > 1  # sampled, not one forced path


def test_n_samples_each_their_own_matcher(runner: ModelRunner, tok: Any) -> None:
    _, out = run(runner, [("n", PROMPT, sampling(temperature=1.0, n=4, seed=None))])
    assert sorted(out) == ["n#0", "n#1", "n#2", "n#3"]
    for key in out:
        valid_json(tok, out[key])


def test_retraction_rebuilds_the_matcher_exactly(runner: ModelRunner, tok: Any) -> None:
    reqs = [(f"r{i}", [10 + i, 20, 30 + i], sampling(temperature=1.0, seed=i)) for i in range(3)]
    _, alone = run(runner, reqs)
    plans: list[StepPlan] = []
    sched, tight = run(runner, reqs, num_slots=64, plans=plans)
    # Re-admitted with outputs after the prompt: the worker replays them into the matcher.
    replayed = [n for p in plans for n in p.new if len(n.input_ids) > n.num_prompt_tokens + 1]
    assert sched.num_retractions > 0 and replayed
    assert tight == alone  # seeded: identical tokens after re-admission
    for rid in alone:
        valid_json(tok, tight[rid])
    assert_idle_invariant(sched)


def test_chunked_prefill_samples_only_at_the_end(runner: ModelRunner, tok: Any) -> None:
    prompt = [7 + i % 50 for i in range(40)]
    reqs = [("c", prompt, sampling(temperature=1.0, seed=5)), ("d", PROMPT, sampling())]
    _, whole = run(runner, reqs)
    plans: list[StepPlan] = []
    _, chunked = run(runner, reqs, plans=plans, chunked_prefill_size=6, max_prefill_tokens=8)
    assert max(len(c.new_slots) for p in plans for c in p.chunks) == 6
    assert chunked == whole
    valid_json(tok, chunked["c"])


def test_prefix_cache_hit_then_exact_slots(runner: ModelRunner, tok: Any) -> None:
    sched = Scheduler(SchedulerConfig(context_length=1024, eos_token_ids=(EOS,)), 512)
    outs = []
    for rid in ("first", "again"):
        sched.handle(TokenizedRequest(rid=rid, index=0, input_ids=PROMPT, sampling=sampling()))
        run_to_idle(sched, runner)
        outs.append([t for o in sched.outputs if o.rid == rid for t in o.new_token_ids])
    final = [o for o in sched.outputs if o.rid == "again"][-1]
    assert final.cached_tokens == len(PROMPT) - 1
    assert outs[0] == outs[1]
    valid_json(tok, outs[1])
    assert_idle_invariant(sched)


def test_abort_drops_the_matcher(runner: ModelRunner, tok: Any) -> None:
    sched = Scheduler(SchedulerConfig(context_length=1024, eos_token_ids=(EOS,)), 512)
    for rid in ("gone", "kept"):
        sched.handle(TokenizedRequest(rid=rid, index=0, input_ids=PROMPT, sampling=sampling()))
    for _ in range(3):
        plan = sched.schedule()
        assert plan is not None
        sched.process_result(runner.step(plan))
    assert runner.seqs["gone#0"].row_sampling.grammar is not None
    sched.handle(AbortRequest("gone"))
    run_to_idle(sched, runner)  # asserts the runner holds no sequence at the end
    valid_json(tok, [t for o in sched.outputs if o.rid == "kept" for t in o.new_token_ids])
    assert_idle_invariant(sched)


def test_complete_grammar_ends_despite_min_tokens_and_ignore_eos(runner: ModelRunner) -> None:
    regex = Grammar("regex", "(ab|cd)")
    sched, out = run(
        runner,
        [
            ("min", PROMPT, sampling(regex, min_new_tokens=10)),
            ("ign", PROMPT, sampling(regex, ignore_eos=True)),
        ],
    )
    finals = {o.rid: o for o in sched.outputs if o.finish_reason is not None}
    for rid in ("min", "ign"):
        assert (finals[rid].finish_reason, finals[rid].matched_stop) == ("stop", EOS)
        assert out[rid][-1] == EOS and len(out[rid]) <= 3


def test_logprobs_see_the_mask(runner: ModelRunner, tok: Any) -> None:
    greedy = sampling(Grammar("regex", "(yes|no)"), logprobs=True, top_logprobs=5)
    sched, out = run(runner, [("lp", PROMPT, greedy)])
    assert tok.decode(out["lp"][:-1]) in ("yes", "no")
    lps = [o.logprobs[0] for o in sched.outputs if o.logprobs]
    # First token: 'y' or 'n' (this tokenizer has no longer piece of either word); every
    # other token is -inf, so the two share all the probability.
    first = {
        tok.decode([t]): lp
        for t, lp in zip(lps[0].top_ids, lps[0].top_logprobs, strict=True)
        if math.isfinite(lp)
    }
    assert sorted(first) == ["n", "y"]
    assert math.isclose(sum(math.exp(v) for v in first.values()), 1.0, rel_tol=1e-5)
    # Then each step allows one token (the word's rest, then EOS): probability 1.
    assert [lp.logprob for lp in lps[1:]] == [0.0] * (len(lps) - 1)


def test_cpu_kernel_and_torch_masks_agree(runner: ModelRunner) -> None:
    grammars = WorkerGrammars(runner.grammars.tokenizer_path, 512, [EOS])
    rows = [(0, grammars.start(JSON, [])), (2, grammars.start(Grammar("regex", "[0-9]+"), []))]
    logits = torch.randn(3, 512)
    by_kernel = logits.clone()
    bitmask = apply_masks(by_kernel, rows)
    by_torch = logits.clone()
    mask_rows_torch(by_torch, bitmask, [0, 2])
    assert torch.equal(by_kernel, by_torch)
    assert torch.equal(by_kernel[1], logits[1])  # an unconstrained row is untouched
    digits = {t for t in range(512) if re.fullmatch(r"[0-9]+", _text(runner, t))}
    assert {int(t) for t in torch.nonzero(by_kernel[2].isfinite()).flatten()} == digits


def _text(runner: ModelRunner, token: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runner.grammars.tokenizer_path)
    return str(tok.decode([token])) if token < len(tok) else ""
