"""Gemma 3 with its sliding-window layers' K/V in a local pool (freed as it leaves each
window), against transformers: the tiny text checkpoint with its window cut to 8 tokens, a
local pool far smaller than the tokens served (so freed slots are handed out again), the real
scheduler driving the real runner. Prompts several windows long in chunks, generation past
the window, a prefix-cache hit on a long prompt and a continued conversation: greedy tokens
identical, every token's logits close, and exact slot accounting in both pools when idle."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from worker_driver import make_runner

from fovea.common.messages import StepPlan, StepResult, TokenizedRequest
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.worker.model_runner import ModelRunner

WINDOW = 8
N_NEW = 24
GLOBAL_SLOTS, RATIO = 512, 0.1  # a local pool of 51 slots
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def small_window(tiny_gemma3_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gemma3-window8") / "model"
    shutil.copytree(tiny_gemma3_text, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["sliding_window"] = WINDOW
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def hf(small_window: Path) -> Any:
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(str(small_window)).float().eval()
    assert model.config.sliding_window == WINDOW
    return model


def _runner(path: Path, page_size: int) -> ModelRunner:
    runner = make_runner(
        path, max_total_tokens=GLOBAL_SLOTS, swa_full_tokens_ratio=RATIO, page_size=page_size
    )
    assert (runner.num_slots, runner.sliding_window) == (GLOBAL_SLOTS, WINDOW)
    assert runner.num_local_slots == 51 - 51 % page_size
    return runner


@pytest.fixture(scope="module", params=[1, 4], ids=["page1", "page4"])
def runner(request: pytest.FixtureRequest, small_window: Path) -> ModelRunner:
    return _runner(small_window, request.param)


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 512) for _ in range(n)]


def _scheduler(runner: ModelRunner, chunk: int = 16) -> Scheduler:
    cfg = SchedulerConfig(
        context_length=runner.context_length, page_size=runner.pool.page_size,
        max_prefill_tokens=64, chunked_prefill_size=chunk, sliding_window=runner.sliding_window,
    )  # fmt: skip
    return Scheduler(cfg, runner.num_slots, num_local_slots=runner.num_local_slots)


def _request(rid: str, ids: list[int], n_new: int = N_NEW) -> TokenizedRequest:
    sp = SamplingParams(temperature=0.0, max_new_tokens=n_new, ignore_eos=True)
    return TokenizedRequest(rid=rid, index=0, input_ids=ids, sampling=sp)


def serve(
    runner: ModelRunner, sched: Scheduler, reqs: list[TokenizedRequest]
) -> dict[str, tuple[list[int], torch.Tensor]]:
    """The scheduler's plans run on the runner until idle, sampling greedily from the logits
    of every token; per request its tokens and the logits [prompt + new - 1, vocab] of every
    position it computed last (a prefix hit's positions are not computed)."""
    for r in reqs:
        sched.handle(r)
    rows: dict[str, list[torch.Tensor]] = {}
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None
        for key in plan.dropped:
            runner._drop(key)
            if key in sched.seqs:  # retracted, not finished: it starts again when re-admitted
                rows.pop(key, None)
        for new in plan.new:
            runner._admit(new)
        logits, _ = runner.forward(plan, every_token=True)
        keys, tokens, at = [], [], 0
        for c in plan.chunks:
            n = len(c.new_slots)
            rows.setdefault(c.key, []).append(logits[at : at + n])
            at += n
            if c.sample:
                token = int(logits[at - 1].argmax())
                runner.seqs[c.key].token_ids.append(token)
                keys.append(c.key)
                tokens.append(token)
        sched.process_result(StepResult(plan.step, keys, tokens, [None] * len(keys), 0.0))
    runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
    assert runner.seqs == {}
    out = {}
    for r in reqs:
        toks = [t for o in sched.outputs if o.rid == r.rid for t in o.new_token_ids]
        out[r.rid] = (toks, torch.cat(rows[f"{r.rid}#0"]))
    return out


def reference(hf: Any, ids: list[int], n_new: int = N_NEW) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens, and its logits [len(ids) + n_new - 1, vocab] over the
    whole sequence in one forward (no cache)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        full = out[0].tolist()
        logits = hf(torch.tensor([full[:-1]])).logits[0].float()
    return full[len(ids) :], logits


def assert_idle_accounting(sched: Scheduler) -> None:
    """Every slot of each pool is free or held by the tree; a flush frees them all."""
    assert not sched.running and not sched.waiting and sched.local is not None
    assert sched.allocator.available + sched.cache.total_size == sched.total_slots
    assert sched.local.available + sched.cache.local_size == sched.local.total_slots
    freed, freed_local = sched.cache.evict_pages(sched.total_slots, sched.local.total_slots)
    sched.allocator.free(freed)
    sched.local.free(freed_local)
    assert sched.allocator.available == sched.total_slots
    assert sched.local.available == sched.local.total_slots


def test_long_prompt_in_chunks_and_generation_past_the_window(runner: ModelRunner, hf: Any) -> None:
    """A 70-token prompt (about 9 windows) in chunks of 16, then 24 tokens: 94 tokens through
    a local pool of 51 (48 with pages of 4), so local slots are freed and handed out again."""
    ids = _prompt(1, 70)
    sched = _scheduler(runner)
    ((tokens, logits),) = serve(runner, sched, [_request("a", ids)]).values()
    want_tokens, want_logits = reference(hf, ids)
    assert tokens == want_tokens
    assert logits.shape == want_logits.shape == (70 + N_NEW - 1, 512)
    assert (logits - want_logits).abs().max().item() < TOL
    assert sched.local is not None and sched.local.freed_early >= 94 - 51
    assert_idle_accounting(sched)


def test_prefix_hit_on_a_long_prompt_gives_the_cold_runs_tokens(
    runner: ModelRunner, hf: Any
) -> None:
    """The same 60-token prompt twice: the second is served from the tree up to its last
    token but one (rounded down to a page), whose window the first request kept. Then the
    conversation goes on: prompt + answer + 10 more tokens hits everything computed."""
    ids = _prompt(2, 60)
    ps = runner.pool.page_size
    sched = _scheduler(runner)
    cold = serve(runner, sched, [_request("cold", ids)])["cold"]
    want_tokens, want_logits = reference(hf, ids)
    assert cold[0] == want_tokens
    hot = serve(runner, sched, [_request("hot", ids)])["hot"]
    hit = [o.cached_tokens for o in sched.outputs if o.rid == "hot"][-1]
    assert hit == 59 - 59 % ps
    assert hot[0] == cold[0]
    # The hit's positions are not computed again: the logits of the rest.
    assert (hot[1] - want_logits[hit:]).abs().max().item() < TOL
    more = ids + cold[0] + _prompt(3, 10)
    follow = serve(runner, sched, [_request("next", more, 8)])["next"]
    computed = 60 + N_NEW - 1
    assert [o.cached_tokens for o in sched.outputs if o.rid == "next"][-1] == computed - (
        computed % ps
    )
    assert follow[0] == reference(hf, more, 8)[0]
    assert_idle_accounting(sched)


def test_two_sequences_share_the_small_local_pool(runner: ModelRunner, hf: Any) -> None:
    """Two long prompts at once in a local pool that holds about one and a half: both give
    transformers' tokens (a retraction, if memory runs out, re-admits from the tree)."""
    a, b = _prompt(4, 40), _prompt(5, 44)
    sched = _scheduler(runner, chunk=8)
    out = serve(runner, sched, [_request("a", a, 16), _request("b", b, 16)])
    assert out["a"][0] == reference(hf, a, 16)[0]
    assert out["b"][0] == reference(hf, b, 16)[0]
    assert_idle_accounting(sched)
