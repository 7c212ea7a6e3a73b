"""Applies StepPlans: keeps per-sequence state from the diffs, runs one forward per step over
all scheduled chunks, samples the rows that asked for it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from fovea.common.config import ServerArgs
from fovea.common.messages import NewSequence, StepPlan, StepResult
from fovea.common.model_config import ModelInfo
from fovea.worker.attention.base import AttentionBackend, ChunkLayout
from fovea.worker.attention.torch_native import TorchNativeBackend
from fovea.worker.kv_pool import KVPool, plan_num_slots
from fovea.worker.loader import load_model
from fovea.worker.sampler import Sampler, SamplingRow

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@dataclass
class _Seq:
    row: int  # row in req_to_slot
    token_ids: list[int]  # every token known: prompt, then sampled outputs
    num_prompt: int
    num_computed: int  # tokens whose KV is in the pool
    row_sampling: SamplingRow


class ModelRunner:
    def __init__(self, args: ServerArgs, model: ModelInfo, rank: int = 0) -> None:
        self.rank = rank
        self.device = pick_device(args.device)
        self.dtype = pick_dtype(args.dtype, self.device)
        self.context_length = model.context_length
        self.model = load_model(model.path, model.architecture, self.dtype, self.device)
        cfg = self.model.config
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        kv_heads = self.model.num_kv_heads
        num_slots = plan_num_slots(
            device=self.device,
            bytes_per_slot=KVPool.bytes_per_slot(
                cfg.num_layers, kv_heads, cfg.head_dim, self.dtype
            ),
            weight_bytes=weight_bytes,
            page_size=args.page_size,
            mem_fraction=args.mem_fraction_static,
            max_total_tokens=args.max_total_tokens,
        )
        self.pool = KVPool(
            num_layers=cfg.num_layers,
            num_slots=num_slots,
            page_size=args.page_size,
            kv_heads=kv_heads,
            head_dim=cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.attn: AttentionBackend = TorchNativeBackend(
            self.pool, self.model.num_heads, kv_heads, cfg.head_dim
        )
        self.num_slots = num_slots
        self.max_seqs = args.max_running_requests
        # Row r, column i: the slot of token i of the sequence in row r. Zeros point at the
        # scratch page, so stale or unset entries are always valid indices.
        self.req_to_slot = torch.zeros(
            self.max_seqs, self.context_length, dtype=torch.int64, device=self.device
        )
        self.free_rows = list(range(self.max_seqs - 1, -1, -1))
        self.seqs: dict[str, _Seq] = {}
        self.sampler = Sampler(cfg.vocab_size, list(model.eos_token_ids), args.random_seed)

    # ------------------------------------------------------------------ state from diffs

    def _drop(self, key: str) -> None:
        seq = self.seqs.pop(key, None)
        if seq is not None:
            self.free_rows.append(seq.row)

    def _admit(self, new: NewSequence) -> None:
        if new.key in self.seqs:
            raise RuntimeError(f"sequence {new.key} admitted twice")
        if not self.free_rows:
            raise RuntimeError(f"more than max_seqs={self.max_seqs} sequences at once")
        row = self.free_rows.pop()
        n_prefix = len(new.prefix_slots)
        if n_prefix:
            self.req_to_slot[row, :n_prefix] = torch.tensor(new.prefix_slots, dtype=torch.int64)
        ids = list(new.input_ids)
        sampling = SamplingRow(new.sampling, ids[: new.num_prompt_tokens], [])
        sampling.output_ids = ids[new.num_prompt_tokens :]
        self.seqs[new.key] = _Seq(row, ids, new.num_prompt_tokens, n_prefix, sampling)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        for key in plan.dropped:
            self._drop(key)
        for new in plan.new:
            self._admit(new)
        t0 = time.perf_counter()
        logits, sample_keys = self.forward(plan)
        tokens, logprobs = self.sampler.sample(
            logits, [self.seqs[k].row_sampling for k in sample_keys]
        )
        for key, token in zip(sample_keys, tokens, strict=True):
            seq = self.seqs[key]
            seq.token_ids.append(token)
            seq.row_sampling.output_ids.append(token)
        return StepResult(plan.step, sample_keys, tokens, logprobs, time.perf_counter() - t0)

    @torch.inference_mode()
    def forward(
        self, plan: StepPlan, *, every_token: bool = False
    ) -> tuple[torch.Tensor, list[str]]:
        """Compute every chunk of `plan` (sequences already admitted). Returns float32 logits
        [n_sample, vocab] for the chunks with sample=True (plan order) and their keys; with
        every_token (tests), logits [T, vocab] for every token of the batch instead."""
        vocab = self.model.config.vocab_size
        if not plan.chunks:
            return torch.empty(0, vocab, dtype=torch.float32, device=self.device), []
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        layouts: list[ChunkLayout] = []
        sample_idx: list[int] = []
        sample_keys: list[str] = []
        for chunk in plan.chunks:
            seq = self.seqs[chunk.key]
            start, n = seq.num_computed, len(chunk.new_slots)
            if start + n > len(seq.token_ids):
                raise RuntimeError(
                    f"{chunk.key}: chunk of {n} tokens past the {len(seq.token_ids)} known"
                )
            if chunk.sample and start + n != len(seq.token_ids):
                raise RuntimeError(f"{chunk.key}: sample=True before the last known token")
            if start + n > self.context_length:
                raise RuntimeError(f"{chunk.key}: exceeds context length {self.context_length}")
            layouts.append(ChunkLayout(seq.row, len(ids), n, start))
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(chunk.new_slots)
            rows.extend([seq.row] * n)
            seq.num_computed = start + n
            if chunk.sample:
                sample_idx.append(len(ids) - 1)
                sample_keys.append(chunk.key)
        dev = self.device
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        slots_t = torch.tensor(slots, dtype=torch.int64, device=dev)
        self.req_to_slot[torch.tensor(rows, dtype=torch.int64, device=dev), pos_t] = slots_t
        self.attn.plan(layouts, slots_t, self.req_to_slot)
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=dev), pos_t, self.attn)
        if every_token:
            return self.model.compute_logits(hidden), sample_keys
        if not sample_idx:
            return hidden.new_empty(0, vocab, dtype=torch.float32), []
        picked = hidden[torch.tensor(sample_idx, device=dev)]  # [n_sample, hidden]
        return self.model.compute_logits(picked), sample_keys
