"""Drive a ModelRunner with hand-built StepPlans, the way the scheduler would: slots handed out
in order from the first usable one (slots 0..page_size-1 are the scratch page)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from fovea.common.config import ServerArgs
from fovea.common.messages import NewSequence, ScheduledChunk, StepPlan, StepResult
from fovea.common.model_config import read_model_info
from fovea.common.sampling import SamplingParams
from fovea.worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=64)


def make_runner(path: Path, **kw: object) -> ModelRunner:
    args = ServerArgs(
        model_path=str(path), device="cpu", dtype="float32", max_total_tokens=4096, **kw
    )  # type: ignore[arg-type]
    return ModelRunner(args, read_model_info(str(path)))


class Driver:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_slot = runner.pool.page_size
        self.step_no = 0
        self.slots_of: dict[str, list[int]] = {}

    def alloc(self, key: str, n: int) -> list[int]:
        out = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n
        self.slots_of.setdefault(key, []).extend(out)
        return out

    def step(
        self,
        new: list[NewSequence],
        chunks: list[tuple[str, int, bool]],
        dropped: list[str] | None = None,
    ) -> StepResult:
        """chunks: (key, number of tokens, sample)."""
        plan = StepPlan(
            self.step_no,
            new,
            [ScheduledChunk(k, self.alloc(k, n), s) for k, n, s in chunks],
            dropped or [],
        )
        self.step_no += 1
        return self.runner.step(plan)


class PromptLike(Protocol):
    """A test's tokenized prompt: its ids and the NewSequence that admits it."""

    ids: list[int]

    def new_seq(self, key: str) -> NewSequence: ...


def greedy(runner: ModelRunner, p: PromptLike, key: str = "s", n_new: int = 32) -> list[int]:
    """n_new greedy tokens of one prompt: one prefill chunk, then one token a step; the
    sequence is dropped afterwards."""
    d = Driver(runner)
    tokens = list(d.step([p.new_seq(key)], [(key, len(p.ids), True)]).token_ids)
    for _ in range(n_new - 1):
        tokens += d.step([], [(key, 1, True)]).token_ids
    runner.step(StepPlan(0, [], [], [key]))
    return tokens


def prefill_logits(runner: ModelRunner, p: PromptLike, key: str = "p") -> torch.Tensor:
    """[L, vocab] float32 logits of every prompt token, one chunk; the sequence is dropped."""
    runner._admit(p.new_seq(key))
    plan = StepPlan(0, [], [ScheduledChunk(key, Driver(runner).alloc(key, len(p.ids)), True)], [])
    logits, _ = runner.forward(plan, every_token=True)
    runner.step(StepPlan(0, [], [], [key]))
    return logits


def generate_together(
    driver: Driver,
    prompts: dict[str, list[int]],
    n_tokens: int,
    sampling: SamplingParams = GREEDY,
) -> dict[str, list[int]]:
    """Prefill every prompt in one step, then decode all of them together."""
    new = [NewSequence(k, p, len(p), sampling, []) for k, p in prompts.items()]
    res = driver.step(new, [(k, len(p), True) for k, p in prompts.items()])
    out = {k: [t] for k, t in zip(res.keys, res.token_ids, strict=True)}
    for _ in range(n_tokens - 1):
        res = driver.step([], [(k, 1, True) for k in prompts])
        for k, t in zip(res.keys, res.token_ids, strict=True):
            out[k].append(t)
    return out


def tp_rank_logits(rank: int, tp: int, path: str, init_file: str, out_file: str) -> None:
    """Child process body: rank `rank` of `tp` prefills a prompt; rank 0 saves the logits."""
    import torch

    from fovea.worker.distributed import calls, destroy_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(tp, rank, f"file://{init_file}", torch.device("cpu"))
    try:
        runner = make_runner(Path(path), tp_size=tp)
        prompt = [5, 17, 99, 300, 42, 7, 8, 250, 11]
        runner._admit(NewSequence("p", prompt, len(prompt), GREEDY, []))
        slots = list(range(1, len(prompt) + 1))
        before = dict(calls)
        logits, _ = runner.forward(
            StepPlan(0, [], [ScheduledChunk("p", slots, True)], []), every_token=True
        )
        per_forward = {k: calls[k] - before[k] for k in calls}
        param_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        torch.save({"param_bytes": param_bytes, "calls": per_forward}, f"{out_file}.{rank}")
        decode = Driver(runner)
        decode.next_slot = len(prompt) + 1
        runner.seqs["p"].token_ids.append(int(logits[-1].argmax()))
        res = decode.step([], [("p", 1, True)])
        if rank == 0:
            torch.save({"logits": logits, "next": res.token_ids}, out_file)
    finally:
        destroy_distributed()
