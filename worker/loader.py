"""Load a Hugging Face safetensors checkpoint into a Fovea model, each rank reading only its
slices (safe_open + get_slice; the parameter's weight_loader narrows).

Single file (`model.safetensors`) or sharded (`model.safetensors.index.json`). Any checkpoint
tensor without a parameter, or a parameter no tensor fills, is an error naming them.

A model declares how checkpoint names become parameter names (DeclaresWeightNames,
worker/models/base.py): `checkpoint_prefixes` (first matching (checkpoint prefix, parameter
prefix) renames, for layouts that moved submodules), then `stacked_params_mapping` (fused
projections); `skip_weight_suffixes` names tensors it ignores. On CPU the loaded weights then
take their CPU layouts (`prepare_for_cpu`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from fovea.worker.layers.cpu_layout import CpuWeights, column_major, encoders_packed
from fovea.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from fovea.worker.layers.linear import _ParallelLinear, default_weight_loader
from fovea.worker.models.base import CausalLM, DeclaresWeightNames
from fovea.worker.models.registry import model_class

log = logging.getLogger("fovea.loader")
T = TypeVar("T")


class WeightLoadError(ValueError):
    pass


def checkpoint_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file path."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise WeightLoadError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _checkpoint_slices(path: str) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) for every tensor, one file open at a time."""
    by_file: dict[str, list[str]] = {}
    for name, file in checkpoint_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if not os.path.isfile(file):
            raise WeightLoadError(f"checkpoint shard {file!r} is missing")
        with safe_open(file, framework="pt") as f:
            for name in sorted(names):
                yield name, f.get_slice(name)


def _progress(items: Iterator[T], total: int, path: str, every_s: float = 10.0) -> Iterator[T]:
    """A tqdm bar on a terminal; otherwise (a journal, a file) a log line every `every_s` s."""
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc="loading weights", unit="tensor", leave=False)
        return
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            log.info("loading weights from %s: %d/%d tensors (%.0f s)", path, i, total, now - start)
    log.info("loaded %d tensors from %s in %.1f s", total, path, time.monotonic() - start)


def load_weights(model: nn.Module, path: str) -> None:
    params = dict(model.named_parameters())
    mapping: list[tuple[str, str, Any]] = []
    skip: tuple[str, ...] = ()
    prefixes: list[tuple[str, str]] = []
    if isinstance(model, DeclaresWeightNames):  # else checkpoint names are parameter names
        mapping, skip = list(model.stacked_params_mapping), model.skip_weight_suffixes
        prefixes = list(model.checkpoint_prefixes)
    tied = isinstance(model, CausalLM) and model.config.tie_word_embeddings
    # Every (parameter, shard) that must be filled.
    expected: set[tuple[str, Any]] = set()
    for pname in params:
        shards = [shard for dst, _, shard in mapping if f".{dst}." in f".{pname}"]
        expected.update((pname, s) for s in shards or [None])
    filled: set[tuple[str, Any]] = set()
    unexpected: list[str] = []
    for name, loaded in _progress(_checkpoint_slices(path), len(checkpoint_files(path)), path):
        if name.endswith(skip) or (tied and name == "lm_head.weight"):
            continue
        pname, shard = name, None
        for src_prefix, dst_prefix in prefixes:
            if name.startswith(src_prefix):
                pname = dst_prefix + name[len(src_prefix) :]
                break
        for dst, src, shard_id in mapping:
            if f".{src}." in pname:
                pname, shard = pname.replace(f".{src}.", f".{dst}."), shard_id
                break
        param = params.get(pname)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, loaded, shard)
        except ValueError as e:
            raise WeightLoadError(f"{name}: {e}") from e
        filled.add((pname, shard))
    if unexpected:
        raise WeightLoadError(
            f"checkpoint {path!r} has weights the model does not use: {', '.join(unexpected)}"
        )
    missing = sorted(f"{p}[{s}]" if s is not None else p for p, s in expected - filled)
    if missing:
        raise WeightLoadError(f"checkpoint {path!r} lacks weights: {', '.join(missing)}")


def prepare_for_cpu(model: nn.Module) -> None:
    """Give every tensor-parallel linear layer and LM head its CPU layouts (CpuWeights,
    worker/layers/cpu_layout.py). Call after the weights are loaded (loaders write the
    row-major layout)."""
    # A head tied to the input embedding must leave that weight row-major (embedding lookups
    # read rows); an untied head's own weight is re-laid in place, so its column-major layout
    # costs no copy.
    embeddings = {
        m.weight.data_ptr()
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    pack_encoders = encoders_packed()
    for name, m in model.named_modules():
        if isinstance(m, _ParallelLinear):
            m.weight.data = column_major(m.weight.data)
            decoder = name.startswith("model.")  # every family's decoder is `model`
            m.cpu_weights = CpuWeights(m.weight.data, pack=decoder or pack_encoders)
        elif isinstance(m, ParallelLMHead):
            if m.weight.data_ptr() not in embeddings:
                m.weight.data = column_major(m.weight.data)
            m.cpu_weights = CpuWeights(m.weight.data)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(path: str, architecture: str, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build the architecture's model from `path`/config.json on `device` in `dtype` (rotary
    tables stay float32) and fill it from the checkpoint. Returns it in eval mode."""
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    cls = model_class(architecture)
    with torch.device(device), _default_dtype(dtype):
        model = cls(hf_config)
    load_weights(model, path)
    if device.type == "cpu":
        prepare_for_cpu(model)
    return model.eval()
