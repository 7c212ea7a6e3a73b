"""Gemma 3 (text-only and vision) against transformers on tiny checkpoints: the processor's
ids and pixels equal, greedy tokens identical and prefill logits close for text, one image,
two images and a prompt longer than the sliding window; images kept whole by the real
scheduler when chunking and on a prefix hit that ends inside one; both checkpoint layouts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from worker_driver import GREEDY, Driver, greedy, make_runner, prefill_logits

from fovea.common.messages import (
    ChatMessage,
    ImageInput,
    NewSequence,
    StepPlan,
    TokenizedRequest,
)
from fovea.common.model_config import read_model_info
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.processors.gemma3 import Gemma3Processor
from fovea.worker.loader import WeightLoadError
from fovea.worker.model_runner import ModelRunner

N_NEW = 32
BOS, EOS, SOT, EOT, BOI, EOI, SOFT = range(3, 10)  # tiny_models' Gemma 3 special tokens
TOKENS_PER_IMAGE, WINDOW = 16, 24


def _image(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = {"A": _image(1, 80, 120), "B": _image(2, 50, 50), "D": _image(3, 80, 120)}
LONG = "The quick brown fox jumps over the lazy dog. " * 6 + "Serving needs batching."

Part = str | tuple[str, str]  # text, or ("image", name)
CASES: dict[str, list[tuple[str, list[Part]]]] = {
    "text": [("user", ["Paris is the capital of France. Numbers like 12345?"])],
    "one_image": [("system", ["Be brief."]), ("user", [("image", "A"), "Describe the image."])],
    "two_images": [("user", ["Compare", ("image", "A"), "with", ("image", "B"), "please."])],
    "long": [("user", [LONG])],  # longer than the sliding window of 24 tokens
}
TEXT_CASES = ["text", "long"]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def hf_vl(tiny_gemma3: Path) -> Any:
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(str(tiny_gemma3)).float().eval()


@pytest.fixture(scope="module")
def hf_text(tiny_gemma3_text: Path) -> Any:
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(str(tiny_gemma3_text)).float().eval()


@pytest.fixture(scope="module")
def runner_vl(tiny_gemma3: Path) -> ModelRunner:
    return make_runner(tiny_gemma3)


@pytest.fixture(scope="module")
def runner_text(tiny_gemma3_text: Path) -> ModelRunner:
    return make_runner(tiny_gemma3_text)


class Prompt:
    """One conversation: transformers' ids/pixels/token types (the tokenizer's own gemma-3-it
    template, then Gemma3Processor on the text) and ours (the same rendered text encoded, then
    Fovea's processor)."""

    def __init__(self, path: Path, turns: list[tuple[str, list[Part]]]) -> None:
        from transformers import AutoTokenizer
        from transformers.models.gemma3 import Gemma3Processor as HFProcessor
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        tok = AutoTokenizer.from_pretrained(str(path))
        self.turns = turns
        self.messages = [
            {
                "role": role,
                "content": [
                    {"type": "image"} if isinstance(p, tuple) else {"type": "text", "text": p}
                    for p in parts
                ],
            }
            for role, parts in turns
        ]
        self.text = tok.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True
        )
        pics = [IMAGES[p[1]] for _, parts in turns for p in parts if isinstance(p, tuple)]
        config = json.loads((path / "config.json").read_text())
        self.hf_kwargs: dict[str, torch.Tensor] = {}
        if "vision_config" in config:
            proc = HFProcessor(
                image_processor=Gemma3ImageProcessorPil.from_pretrained(str(path)),
                tokenizer=tok,
                image_seq_length=TOKENS_PER_IMAGE,
            )
            hf = proc(
                text=self.text, images=pics or None, add_special_tokens=False, return_tensors="pt"
            )
            self.hf_ids: list[int] = hf["input_ids"][0].tolist()
            if pics:
                self.hf_kwargs = {k: hf[k] for k in ("pixel_values", "token_type_ids")}
        else:
            self.hf_ids = tok.encode(self.text, add_special_tokens=False)
        # Ours: the tokenizer service's steps.
        self.plain_ids: list[int] = tok.encode(self.text, add_special_tokens=False)
        self.ids, self.images = list(self.plain_ids), []
        processor = load_processor(str(path), config)
        if pics:
            assert isinstance(processor, Gemma3Processor)
            processed = [processor.preprocess(p) for p in pics]
            self.ids, offsets = processor.expand_placeholders(self.plain_ids, processed)
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

    def new_seq(self, key: str, prefix_slots: list[int] | None = None) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, prefix_slots or [], self.images)

    def request(self, rid: str) -> TokenizedRequest:
        sp = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
        return TokenizedRequest(
            rid=rid, index=0, input_ids=self.ids, sampling=sp, images=self.images
        )


@pytest.fixture(scope="module")
def prompts(tiny_gemma3: Path) -> dict[str, Prompt]:
    return {name: Prompt(tiny_gemma3, turns) for name, turns in CASES.items()}


@pytest.fixture(scope="module")
def text_prompts(tiny_gemma3_text: Path) -> dict[str, Prompt]:
    return {name: Prompt(tiny_gemma3_text, CASES[name]) for name in TEXT_CASES}


def _generate(hf: Any, p: Prompt) -> list[int]:
    ids = hf.generate(
        torch.tensor([p.ids]),
        attention_mask=torch.ones(1, len(p.ids), dtype=torch.int64),
        do_sample=False,
        max_new_tokens=N_NEW,
        min_new_tokens=N_NEW,
        eos_token_id=None,
        pad_token_id=0,
        **p.hf_kwargs,  # token_type_ids: without them transformers attends causally
    )
    return ids[0, len(p.ids) :].tolist()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference(hf_vl: Any, prompts: dict[str, Prompt]) -> dict[str, list[int]]:
    return {name: _generate(hf_vl, p) for name, p in prompts.items()}


@pytest.fixture(scope="module")
def text_reference(hf_text: Any, text_prompts: dict[str, Prompt]) -> dict[str, list[int]]:
    return {name: _generate(hf_text, p) for name, p in text_prompts.items()}




def hf_logits(hf: Any, p: Prompt, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([p.ids]), **{**p.hf_kwargs, **kw}).logits[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- processor and template


@pytest.mark.parametrize("case", list(CASES))
def test_processor_matches_transformers(prompts: dict[str, Prompt], case: str) -> None:
    p = prompts[case]
    assert p.ids == p.hf_ids
    assert p.ids.count(SOFT) == TOKENS_PER_IMAGE * len(p.images)
    if not p.images:
        return
    types = p.hf_kwargs["token_type_ids"][0].tolist()
    spans = [i for i, t in enumerate(types) if t == 1]
    assert spans == [i for img in p.images for i in range(img.offset, img.offset + 16)]
    for k, img in enumerate(p.images):
        assert p.ids[img.offset - 1] == BOI and p.ids[img.offset + 16] == EOI
        assert img.pixel_values.shape == (3, 64, 64) and img.pixel_values.dtype == np.float32
        assert np.array_equal(img.pixel_values, p.hf_kwargs["pixel_values"][k].numpy())


def test_blank_lines_around_an_image_merge_as_transformers_tokenizes_them(
    prompts: dict[str, Prompt], tiny_gemma3: Path
) -> None:
    """ "Be brief.\\n\\n" + the image's "\\n\\n" tokenize as one newline run in transformers'
    ids, not as a splice of the two. Ours equals transformers' (test above)."""
    p = prompts["one_image"]
    processor = load_processor(
        str(tiny_gemma3), json.loads((tiny_gemma3 / "config.json").read_text())
    )
    assert isinstance(processor, Gemma3Processor)
    spliced = processor._expand_tokens(p.plain_ids)
    assert spliced != p.hf_ids and sorted(spliced) != sorted(p.hf_ids)
    with pytest.raises(ValueError, match="1 image placeholders but 0 images"):
        processor.expand_placeholders(p.plain_ids, [])


def _openai(turns: list[tuple[str, list[Part]]]) -> list[ChatMessage]:
    def part(p: Part) -> dict[str, Any]:
        if isinstance(p, tuple):
            return {"type": "image_url", "image_url": {"url": f"http://x/{p[1]}.png"}}
        return {"type": "text", "text": p}

    return [ChatMessage(role, [part(p) for p in parts]) for role, parts in turns]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_gemma3: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_gemma3))


def render(tok: Any, messages: list[ChatMessage], gen: bool = True) -> str:
    return ChatRenderer(tok, "gemma-it", model_takes_images=True).render(messages, gen)


@pytest.mark.parametrize("case", list(CASES))
def test_gemma_it_renders_the_models_own_template(
    hf_tokenizer: Any, prompts: dict[str, Prompt], case: str
) -> None:
    """OpenAI image_url parts under gemma-it render what the checkpoint's own template renders
    for {"type": "image"} parts."""
    assert render(hf_tokenizer, _openai(CASES[case])) == prompts[case].text


def test_gemma_it_golden_strings(hf_tokenizer: Any) -> None:
    img = {"type": "image_url", "image_url": {"url": "http://x/a.png"}}
    assert render(hf_tokenizer, [ChatMessage("user", "  Hello  ")]) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
    )
    msgs = [
        ChatMessage("system", "Be helpful."),
        ChatMessage(
            "user", [{"type": "text", "text": "Look:"}, img, {"type": "text", "text": "ok?"}]
        ),
        ChatMessage("assistant", "A cat."),
        ChatMessage("user", [img]),
    ]
    assert render(hf_tokenizer, msgs) == (
        "<bos><start_of_turn>user\nBe helpful.\n\nLook:<start_of_image>ok?<end_of_turn>\n"
        "<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\n<start_of_image><end_of_turn>\n<start_of_turn>model\n"
    )
    assert render(hf_tokenizer, msgs[:3], gen=False) == (
        "<bos><start_of_turn>user\nBe helpful.\n\nLook:<start_of_image>ok?<end_of_turn>\n"
        "<start_of_turn>model\nA cat.<end_of_turn>\n"
    )
    from fovea.tokenizer_service.chat_templates import ChatRenderError

    with pytest.raises(ChatRenderError, match="roles must alternate"):
        render(hf_tokenizer, [ChatMessage("user", "a"), ChatMessage("user", "b")])


# ---------------------------------------------------------------- fidelity


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(
    runner_vl: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]], case: str
) -> None:
    assert greedy(runner_vl, prompts[case]) == reference[case]
    assert runner_vl.seqs == {}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_match_transformers(
    runner_vl: ModelRunner, hf_vl: Any, prompts: dict[str, Prompt], case: str
) -> None:
    p = prompts[case]
    ours, theirs = prefill_logits(runner_vl, p), hf_logits(hf_vl, p)
    assert ours.shape == (len(p.ids), 512)
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.parametrize("case", TEXT_CASES)
def test_text_model_matches_transformers(
    runner_text: ModelRunner,
    hf_text: Any,
    text_prompts: dict[str, Prompt],
    text_reference: dict[str, list[int]],
    case: str,
) -> None:
    p = text_prompts[case]
    assert greedy(runner_text, p) == text_reference[case]
    ours = prefill_logits(runner_text, p)
    assert (ours - hf_logits(hf_text, p)).abs().max().item() < 1e-3
    # final_logit_softcapping 20 is applied, and matters: without it the logits differ.
    assert ours.abs().max().item() < 20.0
    model = runner_text.model
    capped = model.config
    model.config = dataclasses.replace(capped, final_logit_softcapping=None)
    try:
        uncapped = prefill_logits(runner_text, p)
    finally:
        model.config = capped
    assert (uncapped - ours).abs().max().item() > 0.05


def test_the_image_matters(runner_vl: ModelRunner, tiny_gemma3: Path) -> None:
    a = Prompt(tiny_gemma3, CASES["one_image"])
    b = Prompt(
        tiny_gemma3, [("system", ["Be brief."]), ("user", [("image", "D"), "Describe the image."])]
    )
    assert a.ids == b.ids and a.images[0].hash != b.images[0].hash
    start = a.images[0].offset
    diff = (prefill_logits(runner_vl, a) - prefill_logits(runner_vl, b))[start:].abs().max()
    assert diff.item() > 0.05


def test_bidirectional_images_and_sliding_windows_matter(
    runner_vl: ModelRunner, hf_vl: Any, prompts: dict[str, Prompt]
) -> None:
    """Without token_type_ids transformers attends causally over the image, and without
    windows we would attend globally: both change the logits, so the matches above are not
    vacuous."""
    p = prompts["two_images"]
    assert (hf_logits(hf_vl, p) - hf_logits(hf_vl, p, token_type_ids=None)).abs().max() > 0.05
    attn = runner_vl.attn
    saved = (attn.layer_windows, attn.windows)
    attn.layer_windows, attn.windows = [0, 0, 0], [0]
    try:
        no_window = prefill_logits(runner_vl, prompts["long"])
    finally:
        attn.layer_windows, attn.windows = saved
    assert (no_window - hf_logits(hf_vl, prompts["long"])).abs().max().item() > 0.05


# ---------------------------------------------------------------- whole images


def serve(runner: ModelRunner, sched: Scheduler, reqs: list[TokenizedRequest]) -> list[Any]:
    """The real scheduler driving the real runner until idle; returns the plans."""
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


def scheduler(runner: ModelRunner, **kw: Any) -> Scheduler:
    """The real scheduler over the runner's pools (the local one included)."""
    cfg = SchedulerConfig(
        context_length=runner.context_length, max_prefill_tokens=64, whole_images=True,
        sliding_window=runner.sliding_window, **kw,
    )  # fmt: skip
    return Scheduler(cfg, runner.num_slots, num_local_slots=runner.num_local_slots)


def tokens_of(sched: Scheduler, rid: str) -> list[int]:
    return [t for o in sched.outputs if o.rid == rid for t in o.new_token_ids]


def test_chunked_prefill_keeps_each_image_whole(
    runner_vl: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """Chunks of 20: image A (16 tokens at offset 6) straddles the first boundary, so the
    first chunk stops before it and the second takes it whole; B likewise."""
    p = prompts["two_images"]
    a, b = p.images
    assert a.offset < 20 < a.offset + 16
    sched = scheduler(runner_vl, chunked_prefill_size=20)
    plans = serve(runner_vl, sched, [p.request("r")])
    sizes = [len(c.new_slots) for plan in plans for c in plan.chunks][:4]
    ends = np.cumsum(sizes).tolist()
    assert ends[0] == a.offset and a.offset + 16 <= ends[1]
    assert all(not (img.offset < e < img.offset + 16) for e in ends for img in (a, b))
    assert tokens_of(sched, "r") == reference["two_images"]


def test_an_image_larger_than_the_chunk_is_taken_whole(
    runner_vl: ModelRunner, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    p = prompts["one_image"]
    img = p.images[0]
    sched = scheduler(runner_vl, chunked_prefill_size=8)
    plans = serve(runner_vl, sched, [p.request("r")])
    ends = np.cumsum([len(c.new_slots) for plan in plans for c in plan.chunks]).tolist()
    assert img.offset in ends and img.offset + 16 in ends  # one chunk of 16 > 8 in between
    assert tokens_of(sched, "r") == reference["one_image"]


def test_prefix_hit_ending_inside_an_image_recomputes_the_image(
    tiny_gemma3: Path, prompts: dict[str, Prompt], reference: dict[str, list[int]]
) -> None:
    """After a first request, the tree is cut to end 5 tokens into image B; the same prompt
    again is served from the tree up to B's start only, and gives transformers' tokens. One
    pool: every prefix of the tree is whole (a local pool keeps only windows, see
    test_gemma3_swa.py)."""
    runner_vl = make_runner(tiny_gemma3, disable_hybrid_swa_memory=True)
    assert runner_vl.num_local_slots == 0
    p = prompts["two_images"]
    b = p.images[1]
    sched = scheduler(runner_vl, chunked_prefill_size=512)
    serve(runner_vl, sched, [p.request("x")])
    keep = b.offset + 5
    sched.allocator.free(sched.cache.evict(sched.cache.total_size - keep))
    assert sched.cache.total_size == keep
    encoded = runner_vl.images_encoded
    plans = serve(runner_vl, sched, [p.request("y")])
    assert len(plans[0].new[0].prefix_slots) == b.offset
    assert tokens_of(sched, "y") == reference["two_images"]
    assert runner_vl.images_encoded == encoded  # both images' embeddings were cached
    del runner_vl


def test_runner_refuses_an_image_split_across_chunks(
    runner_vl: ModelRunner, prompts: dict[str, Prompt]
) -> None:
    from fovea.common.model_config import images_attend_bidirectionally

    # The runner's flag (from the model class) and the scheduler's (from the table) agree.
    assert runner_vl.bidirectional_images
    assert images_attend_bidirectionally("Gemma3ForConditionalGeneration")
    p = prompts["one_image"]
    d = Driver(runner_vl)
    with pytest.raises(RuntimeError, match="image split across chunks"):
        d.step([p.new_seq("c")], [("c", p.images[0].offset + 3, False)])
    runner_vl.step(StepPlan(0, [], [], ["c"]))


def test_long_prompt_in_chunks_past_the_window(
    runner_text: ModelRunner, text_prompts: dict[str, Prompt], text_reference: dict[str, list[int]]
) -> None:
    """Chunks of 10 over a prompt of several windows: later chunks' local layers read only
    the window of their cached prefix."""
    p = text_prompts["long"]
    assert len(p.ids) > 3 * WINDOW
    sched = scheduler(runner_text, chunked_prefill_size=10)
    serve(runner_text, sched, [p.request("r")])
    assert tokens_of(sched, "r") == text_reference["long"]


# ---------------------------------------------------------------- checkpoints


def test_hub_layout_and_older_config_load_the_same_model(
    runner_vl: ModelRunner, tiny_gemma3: Path, prompts: dict[str, Prompt], tmp_path: Path
) -> None:
    """The hub's names (vision_tower.vision_model.*) and an older config (rope_theta,
    rope_local_base_freq, rope_scaling, sliding_window_pattern) give the same logits; a
    missing tensor is an error."""
    out = tmp_path / "hub"
    shutil.copytree(tiny_gemma3, out)
    cfg = json.loads((tiny_gemma3 / "config.json").read_text())
    text = dict(cfg["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("layer_types")
    text.update(
        rope_theta=rope["full_attention"]["rope_theta"],
        rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        sliding_window_pattern=2,  # layers sliding, full, sliding
    )
    cfg["text_config"] = text
    (out / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(tiny_gemma3 / "model.safetensors"))
    renamed = {
        k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in weights.items()
    }
    assert any(k.startswith("language_model.model.layers.") for k in renamed)
    save_file(renamed, str(out / "model.safetensors"))
    info = read_model_info(str(out))
    assert (info.context_length, info.vocab_size, info.eos_token_ids) == (1024, 512, [4, 6])
    p = prompts["two_images"]
    # Not bit-equal: runner_vl's cached image A was encoded in another batch.
    diff = prefill_logits(make_runner(out), p) - prefill_logits(runner_vl, p)
    assert diff.abs().max().item() < 1e-5
    del renamed["vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(renamed, str(out / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"vision_tower\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        make_runner(out)
