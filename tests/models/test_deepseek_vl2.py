"""DeepSeek-VL2 against its reference (transformers' SiglipVisionModel + DeepseekV2ForCausalLM,
DeepSeek-VL2's processor, projector and tile layout written out in deepseek_vl2_reference.py)
on tiny checkpoints with MLA and with MHA: greedy tokens identical and prefill logits within
1e-3 for text, one image and two images (prompt ids from the deepseek-vl2 template and
Fovea's processor); more than two images one tile each; chunked prefill and a prefix hit
through the real scheduler; a missing expert weight named. MLA's latent KV cache: the pool's
bytes per token, and decode logits within 1e-3 of the reference's after chunked prefill and a
prefix hit that read stored latents back (both backends). The layers alone:
test_deepseek_vl2_layers.py."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from deepseek_vl2_reference import Reference, format_conversation
from PIL import Image
from safetensors.torch import load_file, save_file
from worker_driver import GREEDY, Driver, greedy, make_runner, prefill_logits

from fovea.common.messages import (
    ChatMessage,
    ImageInput,
    NewSequence,
    ScheduledChunk,
    StepPlan,
    TokenizedRequest,
)
from fovea.common.sampling import SamplingParams
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.scheduler import Scheduler
from fovea.tokenizer_service.chat_templates import ChatRenderer
from fovea.tokenizer_service.processors.deepseek_vl2 import ONE_TILE
from fovea.worker.attention.cpu_paged import CpuPagedBackend
from fovea.worker.loader import WeightLoadError
from fovea.worker.model_runner import ModelRunner

N_NEW = 32
VARIANTS = ("mla", "mha")


def _image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# A: 2x2 tiles, C: 1 across and 2 down (a tile layout that is not square), B: 1x1; D is A's
# size with other pixels.
IMAGES = {"A": _image(1, 120, 80), "B": _image(2, 50, 50), "C": _image(3, 60, 140),
          "D": _image(4, 120, 80)}  # fmt: skip
# name: (system, [(role, text with <image>\n per image)], images)
CASES: dict[str, tuple[str, list[tuple[str, str]], list[str]]] = {
    "text": ("", [("user", "Paris is the capital of France. Numbers like 12345?")], []),
    "one_image": ("Be brief.", [("user", "<image>\nDescribe the image.")], ["A"]),
    "two_images": ("", [("user", "<image>\n<image>\nCompare them.")], ["A", "C"]),
    "three_images": ("", [("user", "<image>\n<image>\n<image>\nWhich?")], ["A", "B", "C"]),
}
FIDELITY = ["text", "one_image", "two_images"]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def paths(request: pytest.FixtureRequest) -> dict[str, Path]:
    return {
        "mla": request.getfixturevalue("tiny_deepseek_vl2"),
        "mha": request.getfixturevalue("tiny_deepseek_vl2_mha"),
    }


@pytest.fixture(scope="module")
def refs(paths: dict[str, Path]) -> dict[str, Reference]:
    return {v: Reference(p) for v, p in paths.items()}


@pytest.fixture(scope="module")
def runners(paths: dict[str, Path]) -> dict[str, ModelRunner]:
    return {v: make_runner(p) for v, p in paths.items()}


class Prompt:
    """One conversation: the reference's ids / views (its conversation format and processor)
    and ours (the deepseek-vl2 template on OpenAI messages, encoded, Fovea's processor)."""

    def __init__(
        self,
        ref: Reference,
        path: Path,
        system: str,
        turns: list[tuple[str, str]],
        names: list[str],
    ) -> None:
        from fovea.tokenizer_service.processors import load_processor

        pics = [IMAGES[n] for n in names]
        text = format_conversation(turns, system)
        self.ref_ids, self.views, self.crops = ref.processor.tokenize_with_images(text, pics)
        messages = [ChatMessage("system", system)] if system else []
        for role, t in turns:
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": f"http://x/{i}.png"}}
                for i in range(t.count("<image>"))
            ]
            messages.append(
                ChatMessage(role, [*parts, {"type": "text", "text": t.split("\n")[-1]}])
            )
        tok = ref.processor.tok
        rendered = ChatRenderer(tok, "deepseek-vl2", model_takes_images=True).render(messages)
        processor = load_processor(str(path), ref.config)
        assert processor is not None
        processed = [processor.preprocess_in_request(p, len(pics)) for p in pics]
        self.processed = processed
        self.ids, offsets = processor.expand_placeholders(
            tok.encode(rendered, add_special_tokens=False), processed
        )
        self.images = [
            ImageInput(hashlib.blake2b(pic.tobytes() + p.variant, digest_size=32).digest(),
                       off, p.num_tokens, p.pixel_values, p.grid)
            for pic, p, off in zip(pics, processed, offsets, strict=True)
        ]  # fmt: skip

    def new_seq(self, key: str) -> NewSequence:
        return NewSequence(key, self.ids, len(self.ids), GREEDY, [], self.images)


@pytest.fixture(scope="module")
def prompts(refs: dict[str, Reference], paths: dict[str, Path]) -> dict[str, dict[str, Prompt]]:
    return {v: {c: Prompt(refs[v], paths[v], *CASES[c]) for c in CASES} for v in VARIANTS}


@pytest.fixture(scope="module")
def reference_tokens(
    refs: dict[str, Reference], prompts: dict[str, dict[str, Prompt]]
) -> dict[tuple[str, str], list[int]]:
    return {
        (v, c): refs[v].greedy(p.ref_ids, p.views, p.crops, N_NEW)
        for v in VARIANTS
        for c, p in prompts[v].items()
        if c in FIDELITY
    }




# ---------------------------------------------------------------- fidelity


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", FIDELITY)
def test_greedy_matches_reference(
    runners: dict[str, ModelRunner],
    prompts: dict[str, dict[str, Prompt]],
    reference_tokens: dict[tuple[str, str], list[int]],
    variant: str,
    case: str,
) -> None:
    p = prompts[variant][case]
    assert p.ids == p.ref_ids  # the deepseek-vl2 template + processor = DeepSeek-VL2's
    expected = reference_tokens[(variant, case)]
    assert len(set(expected)) > 8  # varied output, not one repeated token
    assert greedy(runners[variant], p) == expected
    assert runners[variant].seqs == {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", [*FIDELITY, "three_images"])
def test_prefill_logits_match_reference(
    runners: dict[str, ModelRunner],
    refs: dict[str, Reference],
    prompts: dict[str, dict[str, Prompt]],
    variant: str,
    case: str,
) -> None:
    p = prompts[variant][case]
    assert p.ids == p.ref_ids
    ours = prefill_logits(runners[variant], p)
    theirs = refs[variant].logits(p.ref_ids, p.views, p.crops)
    assert ours.shape == (len(p.ids), 512)
    assert (ours - theirs).abs().max().item() < 1e-3
    if case == "three_images":  # the reference tiles only up to two images
        assert [(i.grid, i.num_tokens) for i in p.images] == [([1, 1], 25)] * 3
        assert all(pp.variant == ONE_TILE for pp in p.processed)


def test_the_image_matters(
    runners: dict[str, ModelRunner], refs: dict[str, Reference], paths: dict[str, Path]
) -> None:
    system, turns, _ = CASES["one_image"]
    a, d = (Prompt(refs["mla"], paths["mla"], system, turns, [name]) for name in "AD")
    assert a.ids == d.ids and a.images[0].hash != d.images[0].hash
    start = a.images[0].offset
    diff = prefill_logits(runners["mla"], a) - prefill_logits(runners["mla"], d)
    assert diff[:start].abs().max().item() == 0.0
    assert diff[start:].abs().max().item() > 0.05


def test_chunked_prefill_and_prefix_hit_through_the_scheduler(
    runners: dict[str, ModelRunner],
    prompts: dict[str, dict[str, Prompt]],
    reference_tokens: dict[tuple[str, str], list[int]],
) -> None:
    """Chunks of 16 split both images (causal attention needs no whole images); the same
    request again is a prefix hit that encodes no image."""
    runner, p = runners["mla"], prompts["mla"]["two_images"]
    cfg = SchedulerConfig(
        context_length=runner.context_length, max_prefill_tokens=64, chunked_prefill_size=16
    )
    sched = Scheduler(cfg, runner.num_slots)
    sp = SamplingParams(temperature=0.0, max_new_tokens=N_NEW)
    for rid in ("x", "y"):
        encoded = runner.images_encoded
        sched.handle(
            TokenizedRequest(rid=rid, index=0, input_ids=p.ids, sampling=sp, images=p.images)
        )
        chunks = []
        while sched.has_work:
            plan = sched.schedule()
            assert plan is not None
            chunks += [len(c.new_slots) for c in plan.chunks]
            sched.process_result(runner.step(plan))
        runner.step(StepPlan(0, [], [], sched.plans.pending_drops))
        tokens = [t for o in sched.outputs if o.rid == rid for t in o.new_token_ids]
        assert tokens == reference_tokens[("mla", "two_images")]
        if rid == "x":
            assert chunks[: len(p.ids) // 16] == [16] * (len(p.ids) // 16)
        else:  # all but the last prompt token from the tree
            assert chunks[0] == 1 and runner.images_encoded == encoded
    assert runner.seqs == {}


def test_global_view_at_the_tail(
    runners: dict[str, ModelRunner], prompts: dict[str, dict[str, Prompt]]
) -> None:
    """global_view_pos "tail": local tiles, separator, global view (the reference's order)."""
    model = runners["mla"].model
    img = prompts["mla"]["one_image"].images[0]  # 2x2 tiles: global 3 x (3 + 1) rows first
    head = model.encode_images([img])[0]
    model.spec = dataclasses.replace(model.spec, global_view_pos="tail")
    try:
        tail = model.encode_images([img])[0]
    finally:
        model.spec = dataclasses.replace(model.spec, global_view_pos="head")
    assert torch.equal(tail, torch.cat([head[13:], head[12:13], head[:12]]))
    assert torch.equal(head[12], model.view_seperator) and torch.equal(head[3], model.image_newline)


def test_encoder_refuses_views_that_do_not_fit(
    runners: dict[str, ModelRunner], prompts: dict[str, dict[str, Prompt]]
) -> None:
    img = prompts["mla"]["one_image"].images[0]
    bad = ImageInput(img.hash, img.offset, img.num_tokens - 1, img.pixel_values, img.grid)
    with pytest.raises(ValueError, match=r"an image of 2x2 tiles has 5 views and 54 placeholders"):
        runners["mla"].model.encode_images([bad])


def test_a_missing_expert_weight_is_named(tiny_deepseek_vl2: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    shutil.copytree(tiny_deepseek_vl2, out)
    weights = load_file(str(out / "model.safetensors"))
    del weights["language.model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(
        WeightLoadError, match=r"model\.layers\.2\.mlp\.experts\.gate_up\.weight\[\(3, 1\)\]$"
    ):
        make_runner(out)


# ---------------------------------------------------------------- the latent KV cache


def test_the_mla_pool_holds_the_latent(
    runners: dict[str, ModelRunner],
    paths: dict[str, Path],
    prompts: dict[str, dict[str, Prompt]],
    reference_tokens: dict[tuple[str, str], list[int]],
) -> None:
    """Latent: 3 layers x (kv_lora_rank 32 + qk_rope_head_dim 8) float32 a token, no V.
    Decompressed (--mla-kv-cache decompressed, still a working option): 3 layers x (K, V) x
    4 heads x 24 (qk_head_dim; V padded from 16). MHA: 3 layers x (K, V) x 2 KV heads x 16."""
    pool = runners["mla"].pool
    assert pool.kind == "mla_latent" and pool.v == []
    assert [tuple(k.shape) for k in pool.k] == [(4097, 1, 40)] * 3
    assert pool.bytes_per_token() == 3 * 40 * 4 == 480
    assert pool.nbytes() == 4097 * 480
    old = make_runner(paths["mla"], mla_kv_cache="decompressed")
    assert old.pool.kind == "kv" and old.pool.bytes_per_token() == 3 * 2 * 4 * 24 * 4 == 2304
    assert runners["mha"].pool.kind == "kv"
    assert runners["mha"].pool.bytes_per_token() == 3 * 2 * 2 * 16 * 4 == 768
    p = prompts["mla"]["two_images"]
    assert greedy(old, p) == reference_tokens[("mla", "two_images")]


@pytest.fixture(scope="module")
def latent_runners(
    runners: dict[str, ModelRunner], paths: dict[str, Path]
) -> dict[str, ModelRunner]:
    return {
        "cpu_paged": runners["mla"],
        "torch_native": make_runner(paths["mla"], attention_backend="torch_native"),
    }


class LogitSteps:
    """Hand-built plans through ModelRunner.forward, keeping every sampled row's float32
    logits; the greedy token is appended to its sequence as the runner's step would."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.d = runner, Driver(runner)
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.tokens: dict[str, list[int]] = {}

    def run(self, chunks: list[tuple[str, int]]) -> None:
        plan_chunks = []
        for key, n in chunks:
            seq = self.runner.seqs[key]
            last = seq.num_computed + n == len(seq.token_ids)
            plan_chunks.append(ScheduledChunk(key, self.d.alloc(key, n), last))
        logits, keys = self.runner.forward(StepPlan(self.d.step_no, [], plan_chunks, []))
        self.d.step_no += 1
        for key, row in zip(keys, logits, strict=True):
            self.logits.setdefault(key, []).append(row)
            self.tokens.setdefault(key, []).append(int(row.argmax()))
            self.runner.seqs[key].token_ids.append(self.tokens[key][-1])


@pytest.mark.parametrize("backend", ["cpu_paged", "torch_native"])
def test_latent_decode_matches_reference_after_chunks_and_a_prefix_hit(
    latent_runners: dict[str, ModelRunner],
    refs: dict[str, Reference],
    prompts: dict[str, dict[str, Prompt]],
    reference_tokens: dict[tuple[str, str], list[int]],
    backend: str,
) -> None:
    """Sequence a: its prompt in chunks of 16 (each chunk decompresses the latents earlier
    chunks stored), then 32 decode steps. Sequence b, the same prompt, joins when a starts
    decoding, with a's first L - 5 slots (both images) as a cached prefix: its last 5 prompt
    tokens run in one batch with a's decode, then both decode together (different lengths).
    Every sampled row's logits are within 1e-3 of the reference's over the same tokens, and
    the greedy tokens are the reference's."""
    runner, p = latent_runners[backend], prompts["mla"]["two_images"]
    assert runner.pool.kind == "mla_latent"
    assert isinstance(runner.attn, CpuPagedBackend) == (backend == "cpu_paged")
    n, hit = len(p.ids), len(p.ids) - 5
    steps = LogitSteps(runner)
    runner._admit(p.new_seq("a"))
    for start in range(0, n, 16):
        steps.run([("a", min(16, n - start))])
    prefix = steps.d.slots_of["a"][:hit]
    runner._admit(NewSequence("b", p.ids, n, GREEDY, prefix, p.images))
    steps.run([("a", 1), ("b", n - hit)])
    while len(steps.tokens["b"]) < N_NEW:
        steps.run([(k, 1) for k in ("a", "b") if len(steps.tokens[k]) < N_NEW])
    runner.step(StepPlan(0, [], [], ["a", "b"]))
    assert runner.seqs == {}
    expected = reference_tokens[("mla", "two_images")]
    theirs = refs["mla"].logits(p.ref_ids + expected[:-1], p.views, p.crops)[n - 1 :]
    for key in ("a", "b"):
        assert steps.tokens[key] == expected
        ours = torch.stack(steps.logits[key])
        assert ours.shape == (N_NEW, 512)
        assert (ours - theirs).abs().max().item() < 1e-3
