"""Train the vision half of the built-in demo VLM (launcher/demo_vlm.py) on CPU, seeded.

    python -m fovea.bench.demo_vlm_train --out launcher/data/demo_vlm_vision.safetensors

A picture's 16 image tokens are slots, each standing for one attribute (SLOTS: shape, colour,
count, position, printed word); a slot's token is one learned vector per value of its
attribute. Stages, on bench/demo_vlm_data.py's "train" split (never its "eval" split):

A. the codebook: those vectors, trained through the frozen SmolLM2-135M-Instruct on
   chat-formatted questions about pictures' true attributes (one to three user turns, a second
   picture in some), the loss on the answer tokens only. The constant prefix (system turn,
   `<|im_start|>user\n`) is run once; its KV cache is shared by every step;
V. the vision classifier (shares nothing with A: on two cores they run side by side, one
   thread each): the CLIP tower and the projector's first layer learn, for each slot, the value
   of its attribute: the projector's hidden unit (slot, value) is driven to +T and every other
   unit pushed below -MARGIN, so its GELU is nearly a one-hot of T. Per-patch side tasks (what
   covers the patch, how much, how many shape centres) teach the small tower local features;
C. the projector's second layer starts as the codebook (column (slot, value) = vector / T),
   so the model computes what A trained from pixels, then is trained through the frozen LM
   from pixels (tower and first layer frozen) to read the units as they really fire.

Backpropagating through the 135M LM costs ~0.6 GFLOP a token, so A and C see a few thousand
sequences; V sees hundreds of thousands of pictures (a 64-px tower is cheap). The output holds
the tower and projector (bf16) under transformers' LLaVA names.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.bench.demo_vlm_data import Picture, picture, question
from fovea.bench.demo_vlm_layout import (
    SLOT_ATTR,
    SLOT_UNIT,
    SLOTS,
    T,
    labels,
    pixels,
    schedule,
)
from fovea.bench.demo_vlm_vision import save_vision, train_vision, unit_logits
from fovea.launcher.demo_vlm import IMAGE_TOKEN, IMAGE_TOKENS, demo_tokenizer, llava_config

PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def build_model(smollm2: Path) -> Any:
    """transformers' LlavaForConditionalGeneration in fp32, SmolLM2's weights in its decoder."""
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = json.loads((smollm2 / "config.json").read_text())
    model: Any = LlavaForConditionalGeneration(LlavaConfig(**llava_config(text, 49152)))
    model = model.float()
    lm = load_file(smollm2 / "model.safetensors")
    embed = lm["model.embed_tokens.weight"].float()
    lm["model.embed_tokens.weight"] = torch.cat([embed, torch.zeros(1, embed.shape[1])])
    renamed = {k.replace("model.", "model.language_model.", 1): v.float() for k, v in lm.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected, unexpected
    assert all(
        k.startswith(("model.vision_tower", "model.multi_modal", "lm_head")) for k in missing
    )
    model.tie_weights()
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    return model


class Codebook(nn.Module):
    """Per image token, one [values, hidden] table of its attribute's values; each entry
    starts as the LM's embedding of the value's word."""

    def __init__(self, tok: Any, embed: torch.Tensor) -> None:
        super().__init__()
        self.tables = nn.ParameterList()
        for a in SLOT_ATTR:
            words = SLOTS[a][1]
            first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
            self.tables.append(nn.Parameter(embed[first].clone()))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """[N, attributes] value indices -> [N, IMAGE_TOKENS, hidden]."""
        return torch.stack(
            [t[values[:, a]] for t, a in zip(self.tables, SLOT_ATTR, strict=True)], dim=1
        )


class Sequences:
    """Chat-formatted training sequences after the shared prefix: token ids with the image
    token at IMAGE_TOKENS places per picture, and a label per id (-100 outside answers)."""

    def __init__(self, tok: Any, repeat_share: float = 0.0) -> None:
        self.tok = tok
        self.repeat_share = repeat_share
        self.image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
        self.head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def make(
        self, rng: random.Random, turns: list[Picture | None]
    ) -> tuple[list[int], list[int], list[Picture]]:
        """One user turn per entry: a new picture, or None for a follow-up question on the
        last one. Returns ids, labels and the pictures in order."""
        messages: list[dict[str, Any]] = []
        answers, pics = [], []
        kind, q = "", ""
        for pic in turns:
            parts: list[dict[str, Any]] = []
            if pic is not None:
                pics.append(pic)
                parts.append({"type": "image"})
            # A new picture asked the last question again: the answer is this picture's,
            # whatever the earlier answer said (a frozen LM likes to repeat itself).
            if (
                self.repeat_share
                and pic is not None
                and len(pics) > 1
                and kind in pic.kinds()
                and rng.random() < self.repeat_share
            ):
                a = pic.answer(kind)
            else:
                kind, q, a = question(rng, pics[-1])
            parts.append({"type": "text", "text": q})
            messages += [{"role": "user", "content": parts}, {"role": "assistant", "content": a}]
            answers.append(a)
        text = self.tok.apply_chat_template(messages, tokenize=False)
        assert text.startswith(PREFIX), text
        text = text[len(PREFIX) :].replace(IMAGE_TOKEN, IMAGE_TOKEN * IMAGE_TOKENS)
        ids: list[int] = self.tok(text, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids)
        # Each answer and its <|im_end|> follow "<|im_start|>assistant\n".
        h = self.head
        starts = [i + len(h) for i in range(len(ids)) if ids[i : i + len(h)] == h]
        for start, a in zip(starts, answers, strict=True):
            n = len(self.tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"])
            labels[start : start + n] = ids[start : start + n]
        return ids, labels, pics


Soft = Callable[[list[Picture], bool], torch.Tensor]  # (pictures, training) -> [N, 16, hidden]


def train_codebook(model: Any, tok: Any, args: argparse.Namespace, log: Any) -> Codebook:
    """Stage A: the codebook through the frozen LM from pictures' true attributes. In training
    each slot's vector is scaled by a factor near 1 (the classifier's one-hot is T only up to
    a few per cent)."""
    book = Codebook(tok, model.model.language_model.get_input_embeddings().weight.detach())

    def soft(pics: list[Picture], training: bool) -> torch.Tensor:
        tokens: torch.Tensor = book(torch.tensor([labels(p) for p in pics]))
        if training:
            tokens = tokens * torch.empty(len(pics), IMAGE_TOKENS, 1).uniform_(0.93, 1.07)
        return tokens

    train_through_lm(model, tok, soft, list(book.parameters()), "A", args.a_steps, args.a_lr,
                     args.a_batch, 0, log)  # fmt: skip
    return book


def train_output_layer(model: Any, tok: Any, args: argparse.Namespace, log: Any) -> None:
    """Stage C: the projector's second layer, started as the codebook (write_projector_output),
    through the frozen LM from pixels, the tower and first layer frozen: it learns to read the
    classifier's units as they really fire, near-misses included. A new picture is often asked
    the question the one before was (repeat_share): the answer must follow the picture."""
    projector = model.model.multi_modal_projector

    def soft(pics: list[Picture], training: bool) -> torch.Tensor:
        with torch.no_grad():
            units = projector.act(unit_logits(model, torch.stack([pixels(p.image) for p in pics])))
        out: torch.Tensor = projector.linear_2(units)
        return out

    train_through_lm(model, tok, soft, list(projector.linear_2.parameters()), "C", args.c_steps,
                     args.c_lr, args.a_batch, 20_000_000, log, repeat_share=0.6)  # fmt: skip


def train_through_lm(
    model: Any,
    tok: Any,
    soft: Soft,
    params: list[nn.Parameter],
    stage: str,
    steps: int,
    lr: float,
    batch: int,
    first: int,
    log: Any,
    repeat_share: float = 0.0,
) -> None:
    """Teacher-forced answers through the frozen LM, one to three user turns a sequence (a
    second picture in some); `soft` gives the pictures' image tokens, the only thing the loss
    reaches. Every 25 steps, the answer-token accuracy on 16 held-out sequences (split
    "a-check", neither trained on nor the eval split)."""
    from transformers import DynamicCache

    seqs = Sequences(tok, repeat_share)
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        prefix_cache = DynamicCache()
        lm(input_ids=torch.tensor([seqs.prefix]), cache=prefix_cache)
    opt = torch.optim.Adam(params, lr=lr)
    rng = random.Random(f"stage-{stage.lower()}")

    def batch_loss(
        rng: random.Random, split: str, first: int, n: int, training: bool
    ) -> tuple[torch.Tensor, float]:
        rows = []
        for k in range(n):
            turns: list[Picture | None] = [picture(split, first + 3 * k)]
            r = rng.random()
            if r < 0.35:
                turns.append(picture(split, first + 3 * k + 1))
            elif r < 0.6:
                turns.append(None)
            if rng.random() < 0.3:
                turns.append(picture(split, first + 3 * k + 2) if r < 0.35 else None)
            rows.append(seqs.make(rng, turns))
        width = max(len(ids) for ids, _, _ in rows)
        # Right-padded: causal attention keeps padding out of every labelled position.
        ids = torch.tensor([r[0] + [tok.eos_token_id] * (width - len(r[0])) for r in rows])
        target = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        embeds = embed(ids.clamp(max=seqs.image_id - 1))
        tokens = soft([p for r in rows for p in r[2]], training)  # [pictures, 16, hidden]
        mask = (ids == seqs.image_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, tokens.reshape(-1, embeds.shape[-1]))
        cache = DynamicCache()
        for i, layer in enumerate(list(prefix_cache.layers)):
            cache.update(layer.keys.expand(n, -1, -1, -1).contiguous(),  # type: ignore[union-attr]
                         layer.values.expand(n, -1, -1, -1).contiguous(), i)  # type: ignore[union-attr]  # fmt: skip
        hidden = lm(inputs_embeds=embeds, cache=cache).last_hidden_state
        pos = target[:, 1:] != -100  # position t predicts label t + 1
        logits = model.lm_head(hidden[:, :-1][pos])
        gold = target[:, 1:][pos]
        return F.cross_entropy(logits, gold), float((logits.argmax(-1) == gold).float().mean())

    index = first
    for step in range(steps):
        loss, acc = batch_loss(rng, "train", index, batch, training=True)
        index += 3 * batch
        for g in opt.param_groups:
            g["lr"] = schedule(step, steps, lr, warmup=5)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        row: dict[str, Any] = {"stage": stage, "step": step, "loss": round(loss.item(), 4)}
        if step % 25 == 0 or step == steps - 1:
            with torch.no_grad():
                check = random.Random("a-check")
                _, row["check_acc"] = batch_loss(check, "a-check", 0, 16, training=False)
        log(row | {"acc": round(acc, 3)})


def write_projector_output(model: Any, book: Codebook) -> None:
    """The projector's second layer: unit (slot, value) writes that value's vector / T."""
    linear_2 = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        linear_2.weight.zero_()
        linear_2.bias.zero_()
        for i, table in enumerate(book.tables):
            first = SLOT_UNIT[i]
            linear_2.weight[:, first : first + table.shape[0]] = table.detach().T / T


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the vision weights (safetensors)")
    ap.add_argument("--work", type=Path, default=Path("demo_vlm_work"), help="stage results")
    ap.add_argument("--smollm2", type=Path, help="converted SmolLM2 dir (default: the alias's)")
    ap.add_argument("--only", choices=["a", "v", "c"], help="run one stage")
    ap.add_argument("--a-steps", type=int, default=300)
    ap.add_argument("--a-batch", type=int, default=8)
    ap.add_argument("--a-lr", type=float, default=1e-2)
    ap.add_argument("--v-steps", type=int, default=5000)
    ap.add_argument("--v-batch", type=int, default=64)
    ap.add_argument("--v-lr", type=float, default=1e-3)
    ap.add_argument("--v-low", type=float, default=0.05, help="weight of the units-off hinge")
    ap.add_argument("--v-init", type=Path, help="stage V starts from this classifier")
    ap.add_argument("--v-first", type=int, default=0, help="stage V's first training picture")
    ap.add_argument("--c-steps", type=int, default=200)
    ap.add_argument("--c-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.smollm2 is None:
        from fovea.launcher.builtin_models import SMOLLM2, resolve_model_path

        args.smollm2 = Path(resolve_model_path(SMOLLM2))
    args.work.mkdir(parents=True, exist_ok=True)
    codebook, classifier = args.work / "codebook.pt", args.work / "classifier.safetensors"
    start = time.time()

    def log(row: dict[str, Any]) -> None:
        print(json.dumps(row | {"s": round(time.time() - start, 1)}), flush=True)

    model = build_model(args.smollm2)
    tok = demo_tokenizer(args.smollm2)
    if args.only in (None, "a"):
        torch.save(train_codebook(model, tok, args, log).state_dict(), codebook)
    if args.only in (None, "v"):
        train_vision(model, args, log)
        save_vision(model, classifier, torch.float32)
    if args.only in (None, "c"):
        from safetensors.torch import load_file

        book = Codebook(tok, model.model.language_model.get_input_embeddings().weight.detach())
        book.load_state_dict(torch.load(codebook))
        model.load_state_dict(load_file(classifier), strict=False)
        write_projector_output(model, book)
        train_output_layer(model, tok, args, log)
        save_vision(model, args.out)
        log({"done": str(args.out)})


if __name__ == "__main__":
    main()
