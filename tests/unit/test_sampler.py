"""The sampler on small hand-made logits: exact tokens, masks and adjusted values."""

from __future__ import annotations

import math

import pytest
import torch

from fovea.common.sampling import SamplingParams
from fovea.worker.sampler import Sampler, SamplingRow, _top_k_top_p

EOS = 2
NEG_INF = float("-inf")
# probabilities 1/2, 1/4, 1/8, 1/8
QUARTERS = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]


def row(
    output: list[int] | None = None, prompt: list[int] | None = None, **kw: object
) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), prompt or [], output or [])  # type: ignore[arg-type]


def sample(logits: list[list[float]], rows: list[SamplingRow], seed: int = 0) -> list[int]:
    return Sampler(len(logits[0]), [EOS], seed).sample(torch.tensor(logits), rows)[0]


def test_greedy_rows_take_argmax() -> None:
    logits = [[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 0.5, 5.0]]
    assert sample(logits, [row(temperature=0.0), row(temperature=0.0)]) == [1, 3]


def test_top_k_1_is_greedy_even_with_temperature() -> None:
    logits = [[0.0, 0.1, 0.2, 0.15]] * 3
    rows = [row(top_k=1, temperature=1.5), row(temperature=0.0), row(top_k=1, seed=5)]
    assert sample(logits, rows) == [2, 2, 2]


def test_greedy_row_in_a_random_batch_still_takes_argmax() -> None:
    logits = [[0.0, 0.0, 0.0, 9.0], [0.0, 1.0, 0.0, 0.0]]
    for seed in range(20):
        assert sample(logits, [row(temperature=1.0), row(temperature=0.0)], seed)[1] == 1


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = torch.tensor([QUARTERS, QUARTERS, QUARTERS])
    out = _top_k_top_p(logits.clone(), [0, 0, 3], [0.7, 1.0, 0.8])
    # 0.7: tokens 0 (0.5) and 1 (0.75 >= 0.7); 1.0: all; top_k 3 then top_p 0.8 over
    # renormalized (4/7, 2/7, 1/7): tokens 0 and 1 (6/7 >= 0.8).
    assert torch.isinf(out).tolist() == [
        [False, False, True, True],
        [False, False, False, False],
        [False, False, True, True],
    ]
    assert out[0, :2].tolist() == logits[0, :2].tolist()
    drawn = {sample([QUARTERS], [row(top_p=0.7)], seed)[0] for seed in range(60)}
    assert drawn == {0, 1}


def test_top_k_limits_draws() -> None:
    logits = [[0.0, 2.0, 1.9, 1.8, 0.1]]
    drawn = {sample(logits, [row(top_k=2, temperature=3.0)], seed)[0] for seed in range(60)}
    assert drawn == {1, 2}


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    # floor 0.3 * 0.5 = 0.15: tokens 2 and 3 (0.125) are out.
    drawn = {sample([QUARTERS], [row(min_p=0.3)], seed)[0] for seed in range(60)}
    assert drawn == {0, 1}
    drawn = {sample([QUARTERS], [row(min_p=0.2)], seed)[0] for seed in range(200)}
    assert drawn == {0, 1, 2, 3}


def test_penalties_exact_adjusted_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0], [2.0, -1.0, 0.5, 1.0]])
    rows = [
        row(
            prompt=[0],
            output=[1, 2, 2],
            repetition_penalty=2.0,
            frequency_penalty=0.5,
            presence_penalty=0.25,
        ),
        row(prompt=[0], output=[1, 2, 2]),  # no penalties: untouched
    ]
    Sampler(4, [EOS], 0)._apply_penalties(logits, rows)
    # repetition (prompt+output 0,1,2): 2/2, -1*2, 0.5/2; then output counts 1:1, 2:2
    # token 1: -2 - 0.5*1 - 0.25 = -2.75; token 2: 0.25 - 0.5*2 - 0.25 = -1.0
    assert logits.tolist() == [[1.0, -2.75, -1.0, 1.0], [2.0, -1.0, 0.5, 1.0]]


def test_logit_bias_is_added_per_row_and_steers_greedy() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]] * 3)
    rows = [
        row(logit_bias={1: 4.0, 0: -100.0}, temperature=0.0),
        row(temperature=0.0),  # no bias: untouched
        row(logit_bias={3: 0.5, 9: 100.0}, temperature=0.0),  # 9 is past the logits: skipped
    ]
    Sampler(4, [EOS], 0)._apply_logit_bias(logits, rows)
    assert logits.tolist() == [
        [-98.0, 3.0, 0.5, 1.0],
        [2.0, -1.0, 0.5, 1.0],
        [2.0, -1.0, 0.5, 1.5],
    ]
    plain = [[2.0, -1.0, 0.5, 1.0]] * 2
    assert sample(plain, [row(logit_bias={2: 1.6}, temperature=0.0), row(temperature=0.0)]) == [
        2,
        0,
    ]


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]] * 4)
    rows = [
        row(output=[1], min_new_tokens=2, stop_token_ids=[3], temperature=0.0),
        row(output=[1], min_new_tokens=2, stop_token_ids=[3], ignore_eos=True, temperature=0.0),
        row(output=[1, 1], min_new_tokens=2, stop_token_ids=[3], temperature=0.0),
        row(output=[], min_new_tokens=1, temperature=0.0),
    ]
    sampler = Sampler(5, [EOS], 0)
    sampler._mask_min_tokens(logits, rows)
    assert logits.tolist() == [
        [0.0, 1.0, NEG_INF, NEG_INF, 2.0],
        [0.0, 1.0, 9.0, NEG_INF, 2.0],
        [0.0, 1.0, 9.0, 8.0, 2.0],
        [0.0, 1.0, NEG_INF, 8.0, 2.0],
    ]
    tokens, _ = sampler.sample(torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]] * 4), rows)
    assert tokens == [4, 2, 2, 3]


FLAT = [[0.0] * 50]


def _seeded_run(seed: int, batch_mates: int, rng_seed: int) -> list[int]:
    """Ten tokens of a row with `seed`, placed after `batch_mates` other random rows."""
    sampler = Sampler(50, [EOS], rng_seed)
    out: list[int] = []
    for _ in range(10):
        mates = [row(output=[7] * i) for i in range(batch_mates)]
        mine = row(output=list(out), seed=seed)
        tokens, _ = sampler.sample(torch.tensor(FLAT * (batch_mates + 1)), [*mates, mine])
        out.append(tokens[-1])
    return out


def test_seed_gives_same_tokens_regardless_of_batch_mates() -> None:
    alone = _seeded_run(1234, 0, rng_seed=0)
    assert alone == _seeded_run(1234, 3, rng_seed=99)
    assert alone != _seeded_run(1235, 0, rng_seed=0)
    assert len(set(alone)) > 3  # the position is part of the seed: not one token repeated


def test_unseeded_rows_follow_the_server_random_seed() -> None:
    def run(rng_seed: int) -> list[int]:
        return sample(FLAT * 8, [row() for _ in range(8)], rng_seed)

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_logprobs_before_temperature_with_top_logprobs() -> None:
    sampler = Sampler(4, [EOS], 0)
    rows = [
        row(temperature=0.0, logprobs=True, top_logprobs=2),
        row(temperature=0.0, logprobs=True, top_logprobs=0),
        row(temperature=0.0),
    ]
    tokens, lps = sampler.sample(torch.tensor([QUARTERS, QUARTERS[::-1], QUARTERS]), rows)
    assert tokens == [0, 3, 0]
    first, second, third = lps
    assert first is not None and second is not None and third is None
    assert first.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    assert first.top_ids == [0, 1]
    assert first.top_logprobs == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-6)
    assert second.logprob == pytest.approx(math.log(0.5), abs=1e-6)
    assert (second.top_ids, second.top_logprobs) == ([], [])
    # temperature does not change the reported logprob (random path, seeded)
    for seed in range(5):
        (tok,), (hot,) = sampler.sample(
            torch.tensor([QUARTERS]), [row(temperature=3.0, seed=seed, logprobs=True)]
        )
        assert hot is not None and hot.logprob == pytest.approx(QUARTERS[tok], abs=1e-6)
