"""Incremental detokenization and stop strings (tokenizer_service/detokenize.py), on the tiny
byte-level BPE tokenizer whose corpus has Japanese and emoji (so characters split across
tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_models import make_tokenizer

from fovea.common.messages import (
    AbortRequest,
    SeqOutput,
    TextDelta,
    TextLogprob,
    TokenBatch,
    TokenLogprobs,
    TopLogprob,
)
from fovea.common.sampling import SamplingParams
from fovea.tokenizer_service.detokenize import (
    Detokenized,
    Detokenizer,
    IncrementalDecoder,
    find_stop,
    held_back_length,
    make_decode,
)

PROMPT = [299, 273]  # "Paris"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    d: Path = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def output(
    ids: list[int],
    done_before: int,
    index: int = 0,
    finish: str | None = None,
    matched: int | None = None,
    logprobs: list[TokenLogprobs] | None = None,
    rid: str = "r",
) -> SeqOutput:
    return SeqOutput(
        rid, index, ids, logprobs, finish, matched, len(PROMPT), 1, done_before + len(ids)
    )


def feed_one_by_one(
    detok: Detokenizer, ids: list[int], finish: str = "length", index: int = 0
) -> list[Detokenized]:
    """Each token in its own TokenBatch; the last one carries `finish`."""
    results = []
    for k, t in enumerate(ids):
        fin = finish if k == len(ids) - 1 else None
        results.append(detok.process(TokenBatch([output([t], k, index, fin)])))
    return results


def deltas_of(results: list[Detokenized]) -> list[TextDelta]:
    return [d for r in results for d in r.deltas]


def start(tok: Any, **sampling: Any) -> Detokenizer:
    detok = Detokenizer(tok)
    detok.add("r", SamplingParams(**sampling), PROMPT)
    return detok


@pytest.mark.parametrize(
    "text",
    [
        "日本語のテキスト",
        "emoji 🙂 and café",
        "Héllo wörld, naïve café",
        "Paris is the capital of France.",
        "🙂🙂x日",
        "def main():\n    return 42\n",
    ],
)
def test_incremental_text_equals_full_decode(tok: Any, text: str) -> None:
    ids = tok.encode(text)
    detok = start(tok)
    deltas = deltas_of(feed_one_by_one(detok, ids))
    assert "".join(d.text for d in deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d.text for d in deltas)
    # Every token is reported exactly once, in order, and the last delta finishes.
    assert [t for d in deltas for t in d.token_ids] == ids
    assert [d.finish_reason for d in deltas][-1] == "length"
    assert deltas[-1].completion_tokens == len(ids)
    assert "r" not in detok


def test_split_characters_wait_for_their_last_byte(tok: Any) -> None:
    ids = tok.encode("日本語のテキスト")
    assert ids == [353, 345, 382, 346, 352, 348, 380, 383, 351, 233]
    results = feed_one_by_one(start(tok), ids)
    # Tokens 0-2 end mid-character: nothing is emitted until 日本語 is complete.
    assert [len(r.deltas) for r in results] == [0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    first, last = deltas_of(results)
    assert (first.text, first.token_ids, first.completion_tokens) == ("日本語", ids[:4], 4)
    assert (last.text, last.token_ids, last.finish_reason) == ("のテキスト", ids[4:], "length")


def test_incremental_decoder_pieces(tok: Any) -> None:
    dec = IncrementalDecoder(make_decode(tok, True), [])
    ids = tok.encode("🙂🙂x日")
    assert [dec.push(t) for t in ids] == ["", "🙂", "", "🙂", "x", "", "日"]
    assert dec.flush() == ""


def test_partial_character_at_finish_is_flushed_as_full_decode(tok: Any) -> None:
    # 354 is the first half of 🙂: a sequence cut there decodes to U+FFFD, as a full decode does.
    detok = start(tok)
    (r,) = feed_one_by_one(detok, [354])
    assert r.deltas[0].text == tok.decode([354]) == "\ufffd"


def test_prompt_context_ending_mid_character_is_dropped(tok: Any) -> None:
    detok = Detokenizer(tok)
    detok.add("r", SamplingParams(), [299, 354])  # "Par" + half an emoji
    deltas = deltas_of(feed_one_by_one(detok, [273, 81]))
    assert [d.text for d in deltas] == ["is", "o"]


def test_stop_string_spanning_tokens_truncates_and_aborts(tok: Any) -> None:
    ids = tok.encode("Paris is the capital of France.")
    assert [tok.decode([t]) for t in ids[4:6]] == [" capit", "al"]
    detok = start(tok, stop=["capital"])
    results = feed_one_by_one(detok, ids[:6])
    deltas = deltas_of(results)
    # " capit" could start "capital": only its space is sent, "capit" is held back.
    assert [d.text for d in deltas] == ["Par", "is", " is", " the", " ", ""]
    last = deltas[-1]
    assert (last.finish_reason, last.matched_stop, last.completion_tokens) == ("stop", "capital", 6)
    assert last.token_ids == [ids[5]]
    assert results[-1].aborts == [AbortRequest("r", 0, "stop")]
    assert [a for r in results[:-1] for a in r.aborts] == []
    assert "r" not in detok
    # Tokens the scheduler had already generated are ignored.
    assert detok.process(TokenBatch([output(ids[6:7], 6)])) == Detokenized([], [], [])


def test_stop_string_inside_one_output_counts_tokens_up_to_the_stop(tok: Any) -> None:
    ids = tok.encode("Paris is the capital of France.")
    detok = start(tok, stop=["capital"])
    r = detok.process(TokenBatch([output(ids, 0)]))
    (d,) = r.deltas
    assert (d.text, d.token_ids, d.completion_tokens) == ("Paris is the ", ids[:6], 6)
    assert r.aborts == [AbortRequest("r", 0, "stop")]


def test_held_back_prefix_is_released_when_stop_does_not_complete(tok: Any) -> None:
    ids = tok.encode("Paris is the capital of France.")
    detok = start(tok, stop=["capitol"])
    deltas = deltas_of(feed_one_by_one(detok, ids))
    assert [d.text for d in deltas][4:6] == [" ", "capital"]
    assert "".join(d.text for d in deltas) == "Paris is the capital of France."
    assert deltas[-1].finish_reason == "length"


def test_held_back_text_is_flushed_at_finish(tok: Any) -> None:
    ids = tok.encode("Paris is the capit")
    detok = start(tok, stop=["capital"])
    deltas = deltas_of(feed_one_by_one(detok, ids))
    assert [d.text for d in deltas] == ["Par", "is", " is", " the", " capit"]
    assert (deltas[-1].finish_reason, deltas[-1].matched_stop) == ("length", None)


def test_earliest_of_several_stop_strings_wins(tok: Any) -> None:
    ids = tok.encode("Paris is the capital of France.")
    detok = start(tok, stop=["France", " the"])
    deltas = deltas_of(feed_one_by_one(detok, ids))
    assert "".join(d.text for d in deltas) == "Paris is"
    assert (deltas[-1].matched_stop, deltas[-1].completion_tokens) == (" the", 4)
    assert find_stop("xxyz", ["yz", "xy"]) == (1, "xy")
    assert find_stop("abcd", ["abc", "ab"]) == (0, "ab")
    assert find_stop("abcd", ["q"]) is None
    assert held_back_length("hello wor", ["world", "or!"]) == 3
    assert held_back_length("hello", ["world"]) == 0
    assert held_back_length("ab", ["ab"]) == 0  # a whole stop string is a match, not a prefix


def test_stop_strings_wait_for_min_tokens(tok: Any) -> None:
    ids = tok.encode("Paris is the capital of France.")
    detok = start(tok, stop=["is"], min_new_tokens=3)
    deltas = deltas_of(feed_one_by_one(detok, ids))
    # "is" completes at token 2 (< min 3): ignored; the " is" of token 3 stops.
    assert "".join(d.text for d in deltas) == "Paris "
    assert (deltas[-1].matched_stop, deltas[-1].completion_tokens) == ("is", 3)


@pytest.mark.parametrize(("skip", "text"), [(True, "Paris"), (False, "<|im_start|>Paris")])
def test_skip_special_tokens(tok: Any, skip: bool, text: str) -> None:
    ids = [1, 299, 273, 2]  # <|im_start|> Par is <|im_end|>
    detok = start(tok, skip_special_tokens=skip)
    results = [detok.process(TokenBatch([output(ids[:3], 0)]))]
    # The eos token ends the sequence; it is reported as a token but never as text.
    results.append(detok.process(TokenBatch([output([2], 3, finish="stop", matched=2)])))
    deltas = deltas_of(results)
    assert "".join(d.text for d in deltas) == text
    assert [t for d in deltas for t in d.token_ids] == ids
    assert (deltas[-1].finish_reason, deltas[-1].matched_stop) == ("stop", 2)
    assert [a for r in results for a in r.aborts] == []


def test_two_sequences_of_one_request(tok: Any) -> None:
    detok = Detokenizer(tok)
    detok.add("r", SamplingParams(n=2), PROMPT)
    r = detok.process(TokenBatch([output([299], 0, index=0), output([318], 0, index=1)]))
    assert [(d.index, d.text) for d in r.deltas] == [(0, "Par"), (1, "emo")]
    r = detok.process(TokenBatch([output([273], 1, index=0, finish="length")]))
    assert [(d.index, d.text, d.finish_reason) for d in r.deltas] == [(0, "is", "length")]
    assert "r" in detok  # sequence 1 still runs
    assert detok.process(TokenBatch([output([1], 2, index=0)])).deltas == []
    r = detok.process(TokenBatch([output([323], 1, index=1, finish="abort")]))
    assert [(d.index, d.text, d.finish_reason) for d in r.deltas] == [(1, "ji", "abort")]
    assert "r" not in detok


def test_logprobs_carry_token_strings(tok: Any) -> None:
    detok = start(tok, logprobs=True, top_logprobs=2)
    lp = [TokenLogprobs(-0.5, [299, 2], [-0.5, -1.25]), TokenLogprobs(-0.25, [273], [-0.25])]
    r = detok.process(TokenBatch([output([299, 273], 0, logprobs=lp)]))
    (d,) = r.deltas
    assert d.logprobs == [
        TextLogprob(
            "Par", 299, -0.5, [TopLogprob("Par", 299, -0.5), TopLogprob("<|im_end|>", 2, -1.25)]
        ),
        TextLogprob("is", 273, -0.25, [TopLogprob("is", 273, -0.25)]),
    ]


def test_logprobs_of_held_tokens_ride_with_the_next_delta(tok: Any) -> None:
    detok = start(tok, logprobs=True)
    r1 = detok.process(TokenBatch([output([354], 0, logprobs=[TokenLogprobs(-1.0, [], [])])]))
    r2 = detok.process(TokenBatch([output([381], 1, logprobs=[TokenLogprobs(-2.0, [], [])])]))
    assert r1.deltas == []
    (d,) = r2.deltas
    assert (d.text, d.token_ids) == ("🙂", [354, 381])
    assert d.logprobs == [
        TextLogprob("\ufffd", 354, -1.0, []),
        TextLogprob("\ufffd\ufffd", 381, -2.0, []),
    ]


def test_unknown_sequences_are_ignored(tok: Any) -> None:
    detok = start(tok)
    r = detok.process(TokenBatch([output([299], 0, rid="other"), output([299], 0, index=5)]))
    assert r == Detokenized([], [], [])
    assert "r" in detok


def test_failure_in_one_request_reports_it_and_keeps_others(tok: Any) -> None:
    detok = start(tok, logprobs=True)
    detok.add("ok", SamplingParams(), PROMPT)
    # Two logprobs entries are missing for two tokens: an internal inconsistency.
    bad = SeqOutput("r", 0, [299, 273], [], None, None, 2, 0, 2)
    r = detok.process(TokenBatch([bad, output([299], 0, rid="ok")]))
    assert [(e.rid, e.status, e.message) for e in r.errors] == [
        ("r", 500, "detokenization failed: list index out of range")
    ]
    assert r.aborts == [AbortRequest("r", None, "error")]
    assert [(d.rid, d.text) for d in r.deltas] == [("ok", "Par")]
    assert "r" not in detok
