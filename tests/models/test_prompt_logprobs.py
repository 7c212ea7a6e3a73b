"""Prompt (input) token logprobs against transformers: entry i of a prompt's list is
log_softmax(logits at i - 1)[prompt[i]] with the top `top_logprobs` alternatives, entry 0 None.

Through the real scheduler core driving a real ModelRunner (chunked prefill, a repeated
prompt that would be a prefix hit, a retraction mid-prefill, a batch mixing a normal
request), a Qwen2-VL prompt with an image, tensor parallelism over two gloo ranks, and the
real processes of the offline Engine (tokenizer service -> scheduler -> worker -> TextDelta).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from worker_driver import make_runner

from fovea.common.messages import (
    GenerateRequest,
    ImageInput,
    SeqOutput,
    StepPlan,
    TextDelta,
    TextLogprob,
    TokenBatch,
    TokenizedRequest,
    TokenLogprobs,
)
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.worker.model_runner import ModelRunner

# 30 ids below the tiny tokenizer's 400 (so each has a token text), all different.
PROMPT = [(7 * i * i + 13 * i + 5) % 397 + 3 for i in range(30)]
OTHER = [(11 * i * i + 3 * i + 1) % 397 + 3 for i in range(30)]
TOP = 5
WANT = SamplingParams(
    temperature=0.0, max_new_tokens=3, logprobs=True, top_logprobs=TOP, prompt_logprobs=True
)
TOL = 1e-4


def hf_logprobs(model: Any, ids: list[int], **kw: Any) -> torch.Tensor:
    """[P - 1, vocab] transformers' log_softmax of the logits at positions 0 .. P - 2."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), **kw).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches(
    entries: list[TokenLogprobs | None] | None, ids: list[int], ref: torch.Tensor
) -> None:
    """`entries` is the whole prompt's list: transformers' values within TOL, same top ids."""
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        e = entries[i]
        assert e is not None, i
        assert abs(e.logprob - ref[i - 1, ids[i]].item()) < TOL, i
        vals, top = ref[i - 1].topk(len(e.top_ids))
        assert e.top_ids == top.tolist(), i
        assert max(abs(a - b) for a, b in zip(e.top_logprobs, vals.tolist(), strict=True)) < TOL


def serve(runner: ModelRunner, sched: Scheduler, reqs: list[TokenizedRequest]) -> list[StepPlan]:
    """The real scheduler driving the runner until idle; outputs stay in sched.outputs."""
    for r in reqs:
        sched.handle(r)
    plans = []
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None
        plans.append(plan)
        sched.process_result(runner.step(plan))
    runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
    assert runner.seqs == {}
    return plans


def request(
    rid: str, ids: list[int], sampling: SamplingParams = WANT, index: int = 0
) -> TokenizedRequest:
    return TokenizedRequest(rid=rid, index=index, input_ids=ids, sampling=sampling)


def outputs(sched: Scheduler, rid: str, index: int = 0) -> list[SeqOutput]:
    return [o for o in sched.outputs if (o.rid, o.index) == (rid, index)]


def scheduler(runner: ModelRunner, num_slots: int | None = None, **kw: Any) -> Scheduler:
    cfg = SchedulerConfig(context_length=runner.context_length, **kw)
    return Scheduler(cfg, num_slots or runner.num_slots)


@pytest.fixture(scope="module")
def hf_llama(tiny_llama: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(tiny_llama: Path) -> ModelRunner:
    return make_runner(tiny_llama)


def test_chunked_prompt_logprobs_match_transformers_and_skip_the_prefix_cache(
    runner: ModelRunner, hf_llama: Any
) -> None:
    ref = hf_logprobs(hf_llama, PROMPT)
    sched = scheduler(runner, chunked_prefill_size=8)
    plans = serve(runner, sched, [request("a", PROMPT)])
    assert [len(c.new_slots) for p in plans for c in p.chunks][:4] == [8, 8, 8, 6]
    first, *rest = outputs(sched, "a")
    assert_matches(first.prompt_logprobs, PROMPT, ref)
    assert first.cached_tokens == 0 and [o.prompt_logprobs for o in rest] == [None, None]
    # The first output's own logprob is the position after the prompt's last token.
    with torch.no_grad():
        last = torch.log_softmax(hf_llama(torch.tensor([PROMPT])).logits[0, -1], dim=-1)
    assert first.logprobs is not None
    assert first.new_token_ids == [int(last.argmax())]
    assert abs(first.logprobs[0].logprob - last.max().item()) < TOL

    # The same prompt again: its prefix is in the tree, but a request wanting prompt logprobs
    # takes no hit (those positions' logits were never computed) and gets the same list; two
    # sequences of one request each get it; the same prompt without them hits the tree.
    sched.outputs = []
    serve(runner, sched, [request("b", PROMPT, index=i) for i in range(2)])
    plain = SamplingParams(temperature=0.0, max_new_tokens=3)
    serve(runner, sched, [request("c", PROMPT, plain)])
    for i in range(2):
        again = outputs(sched, "b", i)[0]
        assert again.cached_tokens == 0
        assert again.prompt_logprobs == first.prompt_logprobs
    hit = outputs(sched, "c")[0]
    assert hit.cached_tokens == len(PROMPT) - 1 and hit.prompt_logprobs is None
    assert hit.new_token_ids == first.new_token_ids


def test_a_normal_request_batched_with_prompt_logprobs_is_unaffected(
    runner: ModelRunner, hf_llama: Any
) -> None:
    seeded = SamplingParams(
        temperature=1.0, seed=7, max_new_tokens=8, logprobs=True, top_logprobs=2
    )
    alone = scheduler(runner)
    serve(runner, alone, [request("n", OTHER, seeded)])
    mixed = scheduler(runner)
    plans = serve(runner, mixed, [request("p", PROMPT), request("n", OTHER, seeded)])
    assert [c.key for c in plans[0].chunks] == ["p#0", "n#0"]  # one step prefills both
    assert outputs(mixed, "n") == outputs(alone, "n")
    assert all(o.prompt_logprobs is None for o in outputs(mixed, "n"))
    assert_matches(outputs(mixed, "p")[0].prompt_logprobs, PROMPT, hf_logprobs(hf_llama, PROMPT))


def test_retraction_mid_prefill_keeps_the_list_whole(runner: ModelRunner, hf_llama: Any) -> None:
    """Two prompts prefilled in chunks of 8 compete for 44 slots: the newer is retracted
    mid-prefill and re-admitted over what is left of its prefix in the tree; its list is
    neither short nor duplicated and still transformers'."""
    long = SamplingParams(
        temperature=0.0, max_new_tokens=10, top_logprobs=TOP, prompt_logprobs=True
    )
    sched = scheduler(runner, num_slots=44, chunked_prefill_size=8)
    plans = serve(runner, sched, [request("a", PROMPT, long), request("b", OTHER, long)])
    assert sched.num_retractions >= 1
    readmits = [n for p in plans[1:] for n in p.new if n.key == "b#0"]
    assert readmits and readmits[0].sampling.prompt_logprobs
    assert len(readmits[0].prefix_slots) > 0  # a hit over the entries it already had
    for rid, ids in (("a", PROMPT), ("b", OTHER)):
        outs = outputs(sched, rid)
        assert_matches(outs[0].prompt_logprobs, ids, hf_logprobs(hf_llama, ids))
        assert outs[0].cached_tokens == 0 and len(outs) == 10


def test_readmission_after_the_first_output_computes_no_prompt_logprobs() -> None:
    """Retracted after its first output (which carried the list), a sequence is re-admitted
    with prompt_logprobs off for the workers, over a prefix hit like any other."""
    from fake_worker import make, req, run_to_idle

    sched, worker = make(num_slots=12)
    for rid, base in (("a", 10), ("b", 20), ("c", 30)):
        sched.handle(req(rid, [base, base + 1, base + 2], max_new=6, prompt_logprobs=True))
    run_to_idle(sched, worker)
    assert all(n.sampling.prompt_logprobs for n in worker.plans[0].new)
    readmits = [n for p in worker.plans[1:] for n in p.new]
    assert readmits and all(len(n.input_ids) > n.num_prompt_tokens for n in readmits)
    assert not any(n.sampling.prompt_logprobs for n in readmits)
    assert any(n.prefix_slots for n in readmits)
    for rid in "abc":
        outs = [o for o in sched.outputs if o.rid == rid]
        assert outs[0].prompt_logprobs is not None
        assert all(o.prompt_logprobs is None for o in outs[1:])


def test_qwen2_vl_image_positions_get_logprobs(tiny_qwen2_vl: Path) -> None:
    from vision_helpers import Reference, image_part, text_part

    ref = Reference(tiny_qwen2_vl)
    messages = [
        {"role": "user", "content": [image_part("http://x/cat.png"), text_part("Describe it.")]}
    ]
    ids, kw = ref.prompt(messages)
    offset, n = ids.index(ref.pad), ids.count(ref.pad)
    pixels = kw["pixel_values"].numpy().astype(np.float32)
    grid = kw["image_grid_thw"][0].tolist()
    image = ImageInput(bytes(range(32)), offset, n, pixels, grid)
    runner = make_runner(tiny_qwen2_vl)
    sched = scheduler(runner, chunked_prefill_size=8)  # chunks end inside the image
    req = TokenizedRequest(rid="v", index=0, input_ids=ids, sampling=WANT, images=[image])
    serve(runner, sched, [req])
    assert len(ids) > 8 and offset + n > 8
    assert_matches(
        outputs(sched, "v")[0].prompt_logprobs, ids, hf_logprobs(ref.model.eval(), ids, **kw)
    )


def tp_rank_prompt_logprobs(rank: int, tp: int, path: str, init_file: str, out_file: str) -> None:
    """Child process body: rank `rank` of `tp` serves a prompt_logprobs request batched with a
    normal one, in chunks; rank 0 saves the outputs."""
    from fovea.worker.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(tp, rank, f"file://{init_file}", torch.device("cpu"))
    try:
        runner = make_runner(Path(path), tp_size=tp)
        sched = scheduler(runner, chunked_prefill_size=8)
        plain = SamplingParams(temperature=0.0, max_new_tokens=3)
        serve(runner, sched, [request("p", PROMPT), request("n", OTHER, plain)])
        if rank == 0:
            torch.save([o.prompt_logprobs for o in sched.outputs], out_file)
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_tensor_parallel_ranks_agree(tiny_llama: Path, hf_llama: Any, tmp_path: Path) -> None:
    """Every rank runs the same LM-head gathers (a mismatch would hang); rank 0 reports."""
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    mp.spawn(
        tp_rank_prompt_logprobs,
        args=(2, str(tiny_llama), str(tmp_path / "init"), str(out)),
        nprocs=2,
    )
    lists = [lp for lp in torch.load(out, weights_only=False) if lp is not None]
    assert len(lists) == 1
    assert_matches(lists[0], PROMPT, hf_logprobs(hf_llama, PROMPT))


@pytest.mark.slow
def test_engine_text_deltas(tiny_llama: Path, hf_llama: Any) -> None:
    """The real processes: the first TextDelta of each index carries the list as text, the
    second identical request too (cached_tokens 0), later deltas none."""
    from transformers import AutoTokenizer

    from fovea import Engine

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ref = hf_logprobs(hf_llama, PROMPT)
    sampling = SamplingParams(
        temperature=0.0,
        max_new_tokens=4,
        ignore_eos=True,
        top_logprobs=2,
        prompt_logprobs=True,
        n=2,
    )
    with Engine(
        model_path=str(tiny_llama), max_total_tokens=2000, dtype="float32", chunked_prefill_size=8
    ) as llm:

        async def collect(rid: str) -> list[TextDelta]:
            req = GenerateRequest(rid=rid, sampling=sampling, input_ids=PROMPT)
            return [d async for d in llm._mgr.generate(req)]

        runs = [llm._call(collect(rid)) for rid in ("e1", "e2")]
    lists = []
    for deltas in runs:
        for index in range(2):
            mine = [d for d in deltas if d.index == index]
            assert mine[0].cached_tokens == 0
            assert all(d.prompt_logprobs is None for d in mine[1:])
            lists.append(mine[0].prompt_logprobs)
    first = lists[0]
    assert first is not None and len(first) == len(PROMPT)
    assert (first[0].token_id, first[0].top, math.isnan(first[0].logprob)) == (PROMPT[0], [], True)
    for i in range(1, len(PROMPT)):
        e = first[i]
        assert isinstance(e, TextLogprob)
        assert (e.token_id, e.token) == (PROMPT[i], tok.decode([PROMPT[i]]))
        assert abs(e.logprob - ref[i - 1, PROMPT[i]].item()) < TOL
        assert [t.token_id for t in e.top] == ref[i - 1].topk(2).indices.tolist()
    # Bytes, not ==: entry 0's nan is not equal to itself.
    assert all(msgspec.msgpack.encode(lp) == msgspec.msgpack.encode(first) for lp in lists[1:])


def test_detokenizer_puts_the_list_on_each_index_first_delta(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    from fovea.tokenizer_service.detokenize import Detokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    detok = Detokenizer(tok)
    ids = [40, 41, 42]
    sampling = SamplingParams(max_new_tokens=3, prompt_logprobs=True, top_logprobs=1, n=2)
    detok.add("r", sampling, ids)
    entries: list[TokenLogprobs | None] = [
        None,
        TokenLogprobs(-1.5, [7], [-0.5]),
        TokenLogprobs(-2.0, [42], [-2.0]),
    ]
    first = [SeqOutput("r", i, [50 + i], None, None, None, 3, 0, 1, entries) for i in range(2)]
    later = [SeqOutput("r", i, [60], None, None, None, 3, 0, 2) for i in range(2)]
    deltas = detok.process(TokenBatch(first)).deltas + detok.process(TokenBatch(later)).deltas
    text = tok.decode
    by_index = {i: [d for d in deltas if d.index == i] for i in range(2)}
    for i in range(2):
        lp = by_index[i][0].prompt_logprobs
        assert lp is not None and math.isnan(lp[0].logprob) and lp[0].top == []
        assert [(e.token_id, e.token, e.logprob) for e in lp[1:] if e is not None] == [
            (41, text([41]), -1.5),
            (42, text([42]), -2.0),
        ]
        assert [
            (t.token_id, t.token, t.logprob) for e in lp[1:] if e is not None for t in e.top
        ] == [
            (7, text([7]), -0.5),
            (42, text([42]), -2.0),
        ]
        assert all(d.prompt_logprobs is None for d in by_index[i][1:])
    assert by_index[0][0].prompt_logprobs is by_index[1][0].prompt_logprobs
