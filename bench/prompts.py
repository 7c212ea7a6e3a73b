"""Benchmark prompts of an exact token length, shared by serving.py and hf_generate.py.

Each prompt is random vocabulary tokens decoded to text, then re-encoded and trimmed until the
text encodes to exactly `input_len` tokens (without special tokens: a server that adds a BOS
sees one more). Prompts are unique and depend only on (tokenizer, seed, lengths). With
`shared_prefix_len` > 0 every prompt starts with the same text of that many tokens, and the
prompt's first `shared_prefix_len` token ids are those of the prefix (a prefix cache can hit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

_MAX_ROUNDS = 64


@dataclass(frozen=True)
class Prompt:
    text: str
    token_ids: list[int]


def resolve_model_dir(name_or_path: str) -> str:
    """A local directory as is; Fovea's built-in alias (SmolLM2-135M-Instruct) to its cache."""
    from fovea.launcher.builtin_models import resolve_model_path

    return str(resolve_model_path(name_or_path))


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))


def build_prompts(
    tokenizer: Any, num_prompts: int, input_len: int, shared_prefix_len: int = 0, seed: int = 0
) -> list[Prompt]:
    if not 0 <= shared_prefix_len < input_len:
        raise ValueError(
            f"--shared-prefix-len must be in [0, {input_len}), got {shared_prefix_len}"
        )
    rng = random.Random(seed)
    pool = _plain_token_ids(tokenizer)
    prefix = _exact_text(tokenizer, rng, pool, "", [], shared_prefix_len)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    while len(prompts) < num_prompts:
        p = _exact_text(tokenizer, rng, pool, prefix.text, prefix.token_ids, input_len)
        if p.text not in seen:
            seen.add(p.text)
            prompts.append(p)
    return prompts


def _plain_token_ids(tokenizer: Any) -> list[int]:
    """Ids that are not special/added tokens and decode alone to whole characters, so that a
    decoded prefix of them never ends inside a UTF-8 sequence."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [i for i, t in zip(ids, texts, strict=True) if t.strip() and "\ufffd" not in t]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, clean_up_tokenization_spaces=False))


def _exact_text(
    tokenizer: Any,
    rng: random.Random,
    pool: list[int],
    head: str,
    head_ids: list[int],
    target: int,
) -> Prompt:
    """`head` + random text that together encode to exactly `target` tokens, starting with
    `head_ids`. Retries fresh random tails; each round adds or trims tokens at the end."""
    if target == 0:
        return Prompt("", [])
    for _ in range(_MAX_ROUNDS):
        need = target - len(head_ids)
        tail = _decode(tokenizer, [rng.choice(pool) for _ in range(need)])
        text = head + tail
        for _ in range(_MAX_ROUNDS):
            ids = _encode(tokenizer, text)
            if ids[: len(head_ids)] != head_ids:
                break  # the tail merged into the head's last token: draw another tail
            if len(ids) == target:
                return Prompt(text, ids)
            if len(ids) > target:
                text = _decode(tokenizer, ids[:target])
            else:
                text += _decode(tokenizer, [rng.choice(pool) for _ in range(target - len(ids))])
    raise RuntimeError(f"could not build a prompt of exactly {target} tokens")
