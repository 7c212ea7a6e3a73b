"""Fovea's model code against transformers on the same tiny checkpoints: greedy tokens
identical, prefill logits close, and batching / chunking / prefix reuse change nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from worker_driver import GREEDY, Driver, generate_together, make_runner

from fovea.common.messages import NewSequence, ScheduledChunk, StepPlan
from fovea.common.sampling import SamplingParams
from fovea.worker.model_runner import ModelRunner

PROMPTS = {
    "a": [5, 17, 99, 300, 42, 7, 8, 250, 11, 3, 77],
    "b": [400, 401, 12],
    "c": [9, 8, 7, 6, 5, 4, 3, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53],
}
N_NEW = 32


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_path(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf_model: Any) -> dict[str, list[int]]:
    """transformers' greedy continuation of each prompt (eos does not stop it)."""
    out = {}
    for key, prompt in PROMPTS.items():
        ids = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            eos_token_id=None,
            pad_token_id=0,
        )
        out[key] = ids[0, len(prompt) :].tolist()
        assert len(out[key]) == N_NEW
    return out


@pytest.fixture(scope="module")
def runner(model_path: Path) -> ModelRunner:
    return make_runner(model_path)


def test_greedy_matches_transformers_alone(
    runner: ModelRunner, reference: dict[str, list[int]]
) -> None:
    for key, prompt in PROMPTS.items():
        got = generate_together(Driver(runner), {key: prompt}, N_NEW)
        assert got[key] == reference[key], key
        runner.step(StepPlan(0, [], [], [key]))
    assert runner.seqs == {}


def test_prefill_logits_match_transformers(runner: ModelRunner, hf_model: Any) -> None:
    prompt = PROMPTS["c"]
    driver = Driver(runner)
    runner._admit(NewSequence("p", prompt, len(prompt), GREEDY, []))
    plan = StepPlan(0, [], [ScheduledChunk("p", driver.alloc("p", len(prompt)), True)], [])
    ours, keys = runner.forward(plan, every_token=True)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([prompt])).logits[0]
    assert keys == ["p"]
    assert ours.shape == (len(prompt), 512)
    assert (ours - theirs).abs().max().item() < 1e-3
    runner.step(StepPlan(1, [], [], ["p"]))


def test_batch_of_three_matches_alone(runner: ModelRunner, reference: dict[str, list[int]]) -> None:
    got = generate_together(Driver(runner), PROMPTS, N_NEW)
    assert got == reference
    runner.step(StepPlan(0, [], [], list(PROMPTS)))


def test_prefill_joining_running_decodes(
    runner: ModelRunner, reference: dict[str, list[int]]
) -> None:
    """'c' is prefilled while 'a' and 'b' decode: one step mixes q_len 1 and q_len > 1."""
    d = Driver(runner)
    first = {k: PROMPTS[k] for k in ("a", "b")}
    out = generate_together(d, first, 5)
    c = PROMPTS["c"]
    res = d.step(
        [NewSequence("c", c, len(c), GREEDY, [])],
        [("a", 1, True), ("c", len(c), True), ("b", 1, True)],
    )
    assert res.keys == ["a", "c", "b"]
    out["c"] = []
    for k, t in zip(res.keys, res.token_ids, strict=True):
        out[k].append(t)
    for _ in range(N_NEW - 6):
        res = d.step([], [(k, 1, True) for k in ("a", "b", "c")])
        for k, t in zip(res.keys, res.token_ids, strict=True):
            out[k].append(t)
    assert out["a"] == reference["a"]
    assert out["b"] == reference["b"]
    assert out["c"] == reference["c"][: N_NEW - 5]
    runner.step(StepPlan(0, [], [], list(PROMPTS)))


def test_chunked_prefill_matches(runner: ModelRunner, reference: dict[str, list[int]]) -> None:
    prompt = PROMPTS["c"]  # 19 tokens -> chunks of 7, 7, 5
    d = Driver(runner)
    res = d.step([NewSequence("c", prompt, len(prompt), GREEDY, [])], [("c", 7, False)])
    assert res.keys == [] and res.token_ids == []
    d.step([], [("c", 7, False)])
    tokens = d.step([], [("c", 5, True)]).token_ids
    for _ in range(N_NEW - 1):
        tokens += d.step([], [("c", 1, True)]).token_ids
    assert tokens == reference["c"]
    runner.step(StepPlan(0, [], [], ["c"]))


def test_prefix_reuse_matches(runner: ModelRunner, reference: dict[str, list[int]]) -> None:
    """'x' computes prompt c; 'y' (the same prompt) gets x's first 12 slots as a cache hit and
    computes only the last 7 tokens, attending over x's KV."""
    prompt = PROMPTS["c"]
    d = Driver(runner)
    generate_together(d, {"x": prompt}, 1)
    hit = d.slots_of["x"][:12]
    res = d.step([NewSequence("y", prompt, len(prompt), GREEDY, hit)], [("y", 7, True)])
    tokens = list(res.token_ids)
    for _ in range(N_NEW - 1):
        tokens += d.step([], [("y", 1, True)]).token_ids
    assert tokens == reference["c"]
    # y's KV went only to its own 7 + 31 new slots; x's slots were read, not rewritten.
    assert len(d.slots_of["y"]) == 7 + N_NEW - 1
    runner.step(StepPlan(0, [], [], ["x", "y"]))


def test_page_size_4_uses_scratch_page_for_padding(
    model_path: Path, reference: dict[str, list[int]]
) -> None:
    runner = make_runner(model_path, page_size=4)
    assert runner.num_slots % 4 == 0
    assert runner.pool.k[0].shape[0] == runner.num_slots + 4
    d = Driver(runner)
    assert d.next_slot == 4
    got = generate_together(d, {k: PROMPTS[k] for k in ("a", "b")}, 8)
    assert got == {k: reference[k][:8] for k in ("a", "b")}


def test_seeded_sampling_with_penalties_through_the_runner(runner: ModelRunner) -> None:
    """The non-greedy path end to end: seeded rows repeat exactly whatever their batch mates,
    logprobs come back, eos (id 2) is never sampled before min_new_tokens."""
    sp = SamplingParams(
        temperature=1.5,
        seed=42,
        min_new_tokens=8,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        logprobs=True,
        top_logprobs=3,
        max_new_tokens=8,
    )
    other = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=1.0)
    alone = generate_together(Driver(runner), {"s": PROMPTS["a"]}, 8, sp)["s"]
    runner.step(StepPlan(0, [], [], ["s"]))
    d = Driver(runner)
    new = [
        NewSequence("m", PROMPTS["b"], 3, other, []),
        NewSequence("s", PROMPTS["a"], 11, sp, []),
    ]
    res = d.step(new, [("m", 3, True), ("s", 11, True)])
    assert res.keys == ["m", "s"]
    lp = res.logprobs[1]
    assert res.logprobs[0] is None and lp is not None
    assert len(lp.top_ids) == 3 and lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
    assert lp.logprob <= lp.top_logprobs[0]
    together = [res.token_ids[1]]
    for _ in range(7):
        together.append(d.step([], [("m", 1, True), ("s", 1, True)]).token_ids[1])
    assert together == alone
    assert 2 not in alone
    runner.step(StepPlan(0, [], [], ["m", "s"]))
