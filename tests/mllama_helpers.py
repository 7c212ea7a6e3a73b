"""Shared by the Mllama tests: transformers' side (the checkpoint's own chat template,
MllamaProcessor with its PIL image processor, MllamaForConditionalGeneration in float32; the
rendered text has its BOS already: add_special_tokens=False, or the processor would add a
second), the test conversations and images, and drivers of Fovea's runner and scheduler."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from worker_driver import GREEDY, Driver, make_runner

from fovea.common.messages import (
    ImageInput,
    NewSequence,
    ScheduledChunk,
    StepPlan,
    TokenizedRequest,
)
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.tokenizer_service.processors import load_processor
from fovea.worker.model_runner import ModelRunner

DATE = "26 Jul 2024"  # the template's date_string: text-only prompts carry a dated system turn


def random_image(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class MllamaReference:
    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer, MllamaForConditionalGeneration, MllamaProcessor
        from transformers.models.mllama.image_processing_pil_mllama import (
            MllamaImageProcessorPil,
        )

        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.image_processor = MllamaImageProcessorPil.from_pretrained(str(path))
        self.proc = MllamaProcessor(image_processor=self.image_processor, tokenizer=self.tok)
        self.model = MllamaForConditionalGeneration.from_pretrained(
            str(path), dtype=torch.float32
        ).eval()

    def render(self, messages: list[dict[str, Any]]) -> str:
        """HF-format messages (images as {"type": "image"} parts) through the checkpoint's own
        template."""
        text: str = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, date_string=DATE
        )
        return text

    def inputs(
        self, text: str, images: list[Image.Image]
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Prompt ids and the model's image inputs (pixel values, aspect ratio ids and masks,
        the cross-attention mask) for text that already starts with its BOS."""
        out = self.proc(
            text=text, images=[images] if images else None, add_special_tokens=False,
            return_tensors="pt",
        )  # fmt: skip
        keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
        kw = {k: out[k] for k in keys} if images else {}
        return out["input_ids"][0].tolist(), kw

    def greedy(self, ids: list[int], kw: dict[str, torch.Tensor], n: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                pad_token_id=0, **kw,
            )  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]

    def logits(self, ids: list[int], kw: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, vocab] float32 logits of every prompt token."""
        with torch.no_grad():
            return self.model(torch.tensor([ids]), **kw).logits[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- test cases

N_NEW = 32
SLOTS = 3  # image slots of the runner: max(max_running_requests, max_images_per_request)
# (height, width): A 3 tiles (1x3, one padding tile), B 1 tile, C 4 tiles (2x2); D is A's size.
IMAGES = {
    "A": random_image(1, 29, 85),
    "B": random_image(2, 28, 28),
    "C": random_image(3, 60, 45),
    "D": random_image(4, 29, 85),
}
TILES = {"A": (3, 3), "B": (1, 1), "C": (6, 4), "D": (3, 3)}  # (aspect_ratio_id, tiles)

Part = str | tuple[str, str]  # text, or ("image", name)
CASES: dict[str, list[tuple[str, list[Part]]]] = {
    "text": [("user", ["Paris is the capital of France. Numbers like 12345?"])],
    "one_image": [("user", [("image", "A"), "Describe the image."])],
    # "Compare" comes before the first image: those rows see every image key (transformers).
    "two_images": [("user", ["Compare", ("image", "A"), "with", ("image", "B"), "please."])],
    # Adjacent image tokens: the first image's range runs on with the second's.
    "adjacent": [("user", [("image", "B"), ("image", "C"), "Which is larger?"])],
    "second_turn": [
        ("user", [("image", "C"), "What is this?"]),
        ("assistant", ["The quick brown fox."]),
        ("user", ["And the dog?"]),
    ],
}


class Prompt:
    """One conversation: transformers' ids and image inputs (the checkpoint's template, then
    MllamaProcessor) and ours (the same rendered text encoded, then Fovea's processor)."""

    def __init__(self, ref: MllamaReference, path: Path, turns: list[tuple[str, list[Part]]]):
        messages = [
            {
                "role": role,
                "content": [
                    {"type": "image"} if isinstance(p, tuple) else {"type": "text", "text": p}
                    for p in parts
                ],
            }
            for role, parts in turns
        ]
        self.text = ref.render(messages)
        self.names = [p[1] for _, parts in turns for p in parts if isinstance(p, tuple)]
        pics = [IMAGES[n] for n in self.names]
        self.hf_ids, self.hf_kwargs = ref.inputs(self.text, pics)
        processor = load_processor(str(path), json.loads((path / "config.json").read_text()))
        assert processor is not None
        processed = [processor.preprocess(p) for p in pics]
        plain = ref.tok.encode(self.text, add_special_tokens=False)
        self.ids, offsets = processor.expand_placeholders(plain, processed)
        assert self.ids == plain  # one <|image|> token per image: nothing to expand
        self.images = [
            ImageInput(
                hashlib.blake2b(pic.tobytes(), digest_size=32).digest(),
                off,
                p.num_tokens,
                p.pixel_values,
                p.grid,
            )
            for pic, p, off in zip(pics, processed, offsets, strict=True)
        ]

    def new_seq(self, key: str) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, [], self.images)

    def request(self, rid: str, max_new: int = N_NEW) -> TokenizedRequest:
        sp = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
        return TokenizedRequest(
            rid=rid, index=0, input_ids=self.ids, sampling=sp, images=self.images
        )




def free_image_slots(runner: ModelRunner) -> int:
    assert runner.cross is not None
    return len(runner.cross.pool.free)


def scheduler(runner: ModelRunner, num_slots: int | None = None, **kw: Any) -> Scheduler:
    cfg = SchedulerConfig(
        context_length=runner.context_length, max_prefill_tokens=kw.pop("max_prefill", 64),
        cross_image_slots=runner.cross_image_slots, **kw,
    )  # fmt: skip
    return Scheduler(cfg, num_slots or runner.num_slots)


def serve(runner: ModelRunner, sched: Scheduler, reqs: list[TokenizedRequest]) -> list[Any]:
    """The real scheduler driving the runner until idle; after every step the runner's used
    image slots are the scheduler's count. Returns the plans."""
    assert sched.cross_images is not None
    for r in reqs:
        sched.handle(r)
    plans = []
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None
        plans.append(plan)
        result = runner.step(plan)
        assert SLOTS - free_image_slots(runner) == sched.cross_images.used <= SLOTS
        sched.process_result(result)
    runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
    assert runner.seqs == {} and free_image_slots(runner) == SLOTS
    assert sched.cross_images.used == 0
    return plans


def tokens_of(sched: Scheduler, rid: str) -> list[int]:
    return [t for o in sched.outputs if o.rid == rid for t in o.new_token_ids]


def tp_rank_prefill(rank: int, tp: int, path: str, init_file: str, case_file: str) -> None:
    """Child process body: rank `rank` of `tp` prefills the saved prompt (images included)
    and decodes 4 tokens; rank 0 saves the prompt logits and the tokens."""
    from fovea.worker.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(tp, rank, f"file://{init_file}", torch.device("cpu"))
    try:
        case = torch.load(case_file, weights_only=False)
        runner = make_runner(Path(path), tp_size=tp, max_running_requests=2)
        images = [ImageInput(*fields) for fields in case["images"]]
        seq = NewSequence("p", case["ids"], len(case["ids"]), GREEDY, [], images)
        runner._admit(seq)
        d = Driver(runner)
        chunk = ScheduledChunk("p", d.alloc("p", len(case["ids"])), True)
        logits, _ = runner.forward(StepPlan(0, [], [chunk], []), every_token=True)
        runner.seqs["p"].token_ids.append(int(logits[-1].argmax()))
        tokens = [int(logits[-1].argmax())]
        for _ in range(3):
            tokens += d.step([], [("p", 1, True)]).token_ids
        if rank == 0:
            torch.save({"logits": logits, "tokens": tokens}, f"{case_file}.out")
    finally:
        destroy_distributed()
