"""Train the vision half of the built-in demo VLM (launcher/demo_vlm.py) on CPU, seeded.

    python -m fovea.bench.demo_vlm_train --out launcher/data/demo_vlm_vision.safetensors

Stages on pictures from bench/demo_vlm_data.py's "train" split (never its "eval" split):
pretrain. the tower and projector learn to emit the untrained codebook (below) of a picture:
   the LM embeddings of its attributes' words (a regression, no LM; may run beside stage A);
A. a codebook stands in for the vision half: a picture's 16 soft tokens are the sum of one
   learned entry per attribute it shows. It is trained through the frozen
   SmolLM2-135M-Instruct on chat-formatted questions (three user turns: a picture, then a
   follow-up or a second picture), the loss on the answer tokens only. The constant prefix
   (system turn, `<|im_start|>user\n`) is run once; its KV cache is shared by every step;
B. tower and projector learn to emit the trained codebook's tokens (a regression, no LM);
C. tower and projector end to end through the frozen LM (one or two pictures a sequence).
Backpropagating through the 135M LM costs ~0.6 GFLOP a token, what CPU time allows least of:
the LM sees a few hundred sequences (A, C); the regressions see thousands of pictures.
The output holds the tower and projector (bf16) under transformers' LLaVA names.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fovea.bench.demo_vlm_data import (
    COLOURS,
    POSITIONS,
    SHAPES,
    WORDS,
    Picture,
    picture,
    question,
)
from fovea.launcher.demo_vlm import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    IMAGE_TOKENS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    demo_tokenizer,
    llava_config,
)

_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)
PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def pixels(image: Image.Image) -> torch.Tensor:
    """[3, 64, 64]: what the processor makes of a square picture (bicubic resize, normalize)."""
    small = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    arr = (np.asarray(small, dtype=np.float32) / 255 - _MEAN) / _STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


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


def attributes(pic: Picture) -> list[int]:
    """Row indices into Codebook's tables; the last row of a table means "not shown"."""
    return [
        list(COLOURS).index(pic.colour),
        SHAPES.index(pic.shape) if pic.shape else len(SHAPES),
        pic.count - 1 if pic.shape else 4,
        POSITIONS.index(pic.position) if pic.position else len(POSITIONS),
        WORDS.index(pic.word) if pic.word else len(WORDS),
    ]


class Codebook(nn.Module):
    """Stage A's stand-in for the vision half: a picture's 16 soft tokens are the sum of one
    learned [16, hidden] entry per attribute (colour, shape, count, position, word). Entries
    start as the LM's embedding of the attribute's word on 3-4 slots of their own."""

    def __init__(self, tok: Any, embed: torch.Tensor) -> None:
        super().__init__()
        values = [
            [c.capitalize() for c in COLOURS],
            [s.capitalize() for s in SHAPES],
            ["1", "2", "3", "4"],
            [p.capitalize() for p in POSITIONS],
            list(WORDS),
        ]
        slots = [range(0, 3), range(3, 6), range(6, 9), range(9, 12), range(12, 16)]
        self.tables = nn.ParameterList()
        for words, where in zip(values, slots, strict=True):
            table = torch.zeros(len(words) + 1, IMAGE_TOKENS, embed.shape[1])
            for row, word in enumerate(words):
                first = tok(word, add_special_tokens=False)["input_ids"][0]
                table[row, list(where)] = embed[first]
            self.tables.append(nn.Parameter(table))

    def forward(self, attrs: torch.Tensor) -> torch.Tensor:
        """[N, 5] attribute rows -> [N, IMAGE_TOKENS, hidden]."""
        out: torch.Tensor = self.tables[0][attrs[:, 0]]
        for i in range(1, len(self.tables)):
            out = out + self.tables[i][attrs[:, i]]
        return out


def schedule(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Sequences:
    """Chat-formatted training sequences after the shared prefix: token ids with the image
    token at IMAGE_TOKENS places per picture, and a label per id (-100 outside answers)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
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
        for pic in turns:
            parts: list[dict[str, Any]] = []
            if pic is not None:
                pics.append(pic)
                parts.append({"type": "image"})
            _, q, a = question(rng, pics[-1])
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


def train_codebook(model: Any, tok: Any, steps: int, batch: int, lr: float, log: Any) -> Codebook:
    """Stage A: the codebook through the frozen LM, the loss on the answers."""
    embed = model.model.language_model.get_input_embeddings()
    book = Codebook(tok, embed.weight.detach())

    def soft(pics: list[Picture]) -> torch.Tensor:
        out: torch.Tensor = book(torch.tensor([attributes(p) for p in pics]))
        return out

    groups = [{"params": list(book.parameters()), "peak": lr}]
    train_through_lm(model, tok, soft, groups, steps, batch, 0, True, "A", log)
    return book


def finetune_vision(model: Any, tok: Any, steps: int, batch: int, lr: float, log: Any) -> None:
    """Stage C: tower and projector through the frozen LM (one or two pictures a sequence)."""

    def soft(pics: list[Picture]) -> torch.Tensor:
        pixel_values = torch.stack([pixels(p.image) for p in pics])
        out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(out.pooler_output))

    groups = [
        {"params": list(model.model.multi_modal_projector.parameters()), "peak": lr},
        {"params": list(model.model.vision_tower.parameters()), "peak": lr / 3},
    ]
    train_through_lm(model, tok, soft, groups, steps, batch, 70_000_000, False, "C", log)


def train_through_lm(
    model: Any,
    tok: Any,
    soft: Any,
    groups: list[dict[str, Any]],
    steps: int,
    batch: int,
    first: int,
    follow_ups: bool,
    stage: str,
    log: Any,
) -> None:
    """Teacher-forced answers through the frozen LM; `soft(pictures)` gives each picture's
    [IMAGE_TOKENS, hidden] soft tokens, the only thing the loss reaches."""
    from transformers import DynamicCache

    seqs = Sequences(tok)
    lm = model.model.language_model
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        prefix_cache = DynamicCache()
        lm(input_ids=torch.tensor([seqs.prefix]), cache=prefix_cache)
    opt = torch.optim.Adam(groups)
    rng = random.Random(f"stage-{stage.lower()}")
    index = first
    for step in range(steps):
        rows = []
        for _ in range(batch):
            turns: list[Picture | None] = [picture("train", index)]
            if rng.random() < 0.3:
                turns.append(picture("train", index + 1))
            elif follow_ups:
                turns.append(None)
            if follow_ups:
                turns.append(None)
            index += 2
            rows.append(seqs.make(rng, turns))
        width = max(len(ids) for ids, _, _ in rows)
        # Right-padded: causal attention keeps padding out of every labelled position.
        ids = torch.tensor([r[0] + [tok.eos_token_id] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        embeds = embed(ids.clamp(max=seqs.image_id - 1))
        mask = (ids == seqs.image_id).unsqueeze(-1)
        tokens = soft([p for r in rows for p in r[2]])  # [pictures, IMAGE_TOKENS, hidden]
        embeds = embeds.masked_scatter(mask, tokens.reshape(-1, embeds.shape[-1]))
        cache = DynamicCache()
        layers: list[Any] = list(prefix_cache.layers)
        for i, layer in enumerate(layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1).contiguous(),
                         layer.values.expand(batch, -1, -1, -1).contiguous(), i)  # fmt: skip
        hidden = lm(inputs_embeds=embeds, cache=cache).last_hidden_state
        pos = labels[:, 1:] != -100  # position t predicts label t + 1
        logits = model.lm_head(hidden[:, :-1][pos])
        target = labels[:, 1:][pos]
        loss = F.cross_entropy(logits, target)
        for g in opt.param_groups:
            g["lr"] = schedule(step, steps, g["peak"], warmup=3)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        acc = float((logits.argmax(-1) == target).float().mean())
        log({"stage": stage, "step": step, "loss": round(loss.item(), 4), "acc": round(acc, 3)})


def train_vision(
    model: Any, book: Codebook, steps: int, batch: int, lr: float, first: int, log: Any
) -> None:
    """Stage B: tower and projector regress each picture's codebook tokens (no LM)."""
    for p in book.parameters():
        p.requires_grad_(False)
    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    index = first  # pictures apart from stage A's
    for step in range(steps):
        pics = [picture("train", index + i) for i in range(batch)]
        index += batch
        target = book(torch.tensor([attributes(p) for p in pics]))  # [B, 16, hidden]
        features = model.model.get_image_features(
            pixel_values=torch.stack([pixels(p.image) for p in pics]), return_dict=True
        ).pooler_output
        out = torch.stack(list(features))  # [B, 16, hidden]
        loss = F.mse_loss(out, target) / target.var()
        for g in opt.param_groups:
            g["lr"] = schedule(step, steps, lr, warmup=30)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            log({"stage": "B", "step": step, "loss": round(loss.item(), 4)})


def save_vision(model: Any, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the vision weights (safetensors)")
    ap.add_argument("--work", type=Path, default=Path("demo_vlm_work"), help="stage results")
    ap.add_argument("--smollm2", type=Path, help="converted SmolLM2 dir (default: the alias's)")
    ap.add_argument("--only", choices=["pretrain", "a", "b", "c"], help="run one stage")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--a-steps", type=int, default=60)
    ap.add_argument("--a-batch", type=int, default=4)
    ap.add_argument("--a-lr", type=float, default=3e-2)
    ap.add_argument("--b-steps", type=int, default=200)
    ap.add_argument("--b-batch", type=int, default=16)
    ap.add_argument("--c-steps", type=int, default=100)
    ap.add_argument("--c-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.smollm2 is None:
        from fovea.launcher.builtin_models import SMOLLM2, resolve_model_path

        args.smollm2 = Path(resolve_model_path(SMOLLM2))
    args.work.mkdir(parents=True, exist_ok=True)
    pretrained, codebook = args.work / "pretrained.safetensors", args.work / "codebook.pt"
    regressed = args.work / "regressed.safetensors"
    start = time.time()

    def log(row: dict[str, Any]) -> None:
        print(json.dumps(row | {"s": round(time.time() - start, 1)}), flush=True)

    model = build_model(args.smollm2)
    tok = demo_tokenizer(args.smollm2)
    embed = model.model.language_model.get_input_embeddings().weight.detach()
    # The tower first learns the untrained codebook (the attributes' own words): it needs
    # nothing from stage A, so the two may run at once (--only pretrain, --only a).
    if args.only in (None, "pretrain"):
        train_vision(
            model, Codebook(tok, embed), args.pretrain_steps, args.b_batch, 1e-3, 50_000_000, log
        )
        save_vision(model, pretrained, torch.float32)
    if args.only in (None, "a"):
        book = train_codebook(model, tok, args.a_steps, args.a_batch, args.a_lr, log)
        torch.save(book.state_dict(), codebook)
    if args.only in (None, "b"):
        from safetensors.torch import load_file

        book = Codebook(tok, embed)
        book.load_state_dict(torch.load(codebook))
        model.load_state_dict(load_file(pretrained), strict=False)
        train_vision(model, book, args.b_steps, args.b_batch, 5e-4, 60_000_000, log)
        save_vision(model, regressed, torch.float32)
    if args.only in (None, "c"):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(regressed), strict=False)
        finetune_vision(model, tok, args.c_steps, args.c_batch, 1e-3, log)
        save_vision(model, args.out)
        log({"done": str(args.out)})


if __name__ == "__main__":
    main()
