"""Applies StepPlans: keeps per-sequence state from the diffs, runs one forward per step over
all scheduled chunks, samples the rows that asked for it.

The model is a `CausalLM` (worker/models/base.py); vision-language models add capabilities,
each a Protocol the runner checks with isinstance:
- `EncodesImages`: `encode_images(images) -> [num_tokens, hidden] each` (the vision tower;
  outputs are kept by image hash in an EmbeddingCache) and `embed_tokens(ids [T])`, whose
  image placeholder rows are replaced by their image's embeddings before
  `forward(..., input_embeds=[T, hidden])` (worker/image_embeddings.py). Images a plan sends
  in `encode` are encoded ahead of their prefill, a slice of the tower per step
  (worker/encode_ahead.py; `EncodesInStages` towers stop between blocks).
- `MRopePositions`: `mrope_positions(prompt_ids, images) -> (Tensor [3, L] int64, delta)`:
  M-RoPE positions of the prompt; a later token i (an output) sits at i + delta on all axes.
- Bidirectional images (the architecture table's capability, which the scheduler reads too):
  an image's tokens attend to each other in full; each chunk passes its images' spans to the
  attention backend. The scheduler never splits such an image across chunks (an image that
  is split anyway is an error, not a silent causal pass).
The model's `layer_windows` (per-layer sliding window, 0 = global) and `attention_scale` (the
score scale; None: head_dim ** -0.5) go to the attention backend. When some layers have one
window and others none, the windowed layers keep their K/V in a local pool of their own
(`local_window_layers`; off with --disable-hybrid-swa-memory): every chunk then carries local
slots beside its global ones, and a second table `req_to_local` maps tokens to them.

A model that reads images through cross-attention layers instead (`CrossAttentionImages`,
Mllama): its placeholder tokens stay token embeddings; the runner keeps image K/V in an
image-slot pool (worker/cross_attention.py: capacity `cross_image_slots`, reported to the
scheduler, which names each image's slot, one per distinct image) and passes the step's plan to `forward(..., cross=CrossBatch | None)`. Its
`config.num_layers` counts only the layers that take token KV slots.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fovea.common.architectures import architecture
from fovea.common.config import ServerArgs
from fovea.common.messages import ImageInput, NewSequence, StepPlan, StepResult
from fovea.common.model_config import ModelInfo
from fovea.worker.attention import cpu_kernels
from fovea.worker.attention.base import AttentionBackend, ChunkLayout
from fovea.worker.attention.cpu_paged import CpuPagedBackend, kernel_supports
from fovea.worker.attention.torch_native import TorchNativeBackend
from fovea.worker.cpu_threads import cpu_flags
from fovea.worker.cross_attention import CrossAttentionState
from fovea.worker.grammar import WorkerGrammars
from fovea.worker.image_embeddings import ImageEmbeddings, Overlap
from fovea.worker.kv_pool import KVPool, plan_hybrid_slots, plan_num_slots
from fovea.worker.loader import load_model
from fovea.worker.mm_cache import EmbeddingCache
from fovea.worker.models.base import CrossAttentionImages, EncodesImages, MRopePositions
from fovea.worker.prompt_logprobs import PromptSpan, prompt_logprobs, prompt_span
from fovea.worker.sampler import Sampler, SamplingRow

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


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
    images: list[ImageInput]
    mrope: torch.Tensor | None = None  # [3, num_prompt] M-RoPE positions of the prompt
    mrope_delta: int = 0


class _Computed(NamedTuple):
    """One forward over a plan's chunks."""

    hidden: torch.Tensor | None  # [T, hidden] of every token of the step; None: no chunks
    sample_idx: list[int]  # rows of the chunks with sample=True, plan order
    sample_keys: list[str]
    prompt_spans: list[PromptSpan]  # rows whose next prompt token's logprob is wanted


def local_window_layers(windows: list[int] | None) -> tuple[frozenset[int], int]:
    """The layers that may keep their K/V in a local pool, and their window: when some layers
    attend within one sliding window and at least one attends globally (Gemma 3); else none."""
    ws = windows or []
    local = frozenset(i for i, w in enumerate(ws) if w)
    sizes = {ws[i] for i in local}
    if not local or len(local) == len(ws) or len(sizes) != 1:
        return frozenset(), 0
    return local, sizes.pop()


def wants_cpu_kernels(args: ServerArgs, device: torch.device) -> bool:
    return device.type == "cpu" and args.attention_backend != "torch_native"


class ModelRunner:
    def __init__(self, args: ServerArgs, model: ModelInfo, rank: int = 0) -> None:
        self.rank = rank
        self.device = pick_device(args.device)
        self.dtype = pick_dtype(args.dtype, self.device)
        self.context_length = model.context_length
        # A first build of the CPU kernels (~10 s, a compiler subprocess) overlaps the weights'
        # loading.
        kernels = None
        if wants_cpu_kernels(args, self.device):
            pool = ThreadPoolExecutor(1, thread_name_prefix="cpu-kernels")
            kernels = pool.submit(cpu_kernels.load)
            pool.shutdown(wait=False)
        self.model = load_model(model.path, model.architecture, self.dtype, self.device)
        cfg = self.model.config
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.mm_cache = EmbeddingCache(args.mm_cache_mb << 20)
        self.cross: CrossAttentionState | None = None
        if isinstance(self.model, CrossAttentionImages):
            # The image pool is sized first; the token KV pool gets the rest of the budget.
            self.cross = CrossAttentionState.create(
                self.model, device=self.device, dtype=self.dtype, weight_bytes=weight_bytes,
                cap=max(args.max_running_requests, args.max_images_per_request),
                mem_fraction=args.mem_fraction_static, mm_cache=self.mm_cache,
            )  # fmt: skip
        layout = self.model.kv_layout(mla_latent=args.mla_kv_cache == "latent")
        local_layers, self.sliding_window = local_window_layers(self.model.layer_windows)
        if args.disable_hybrid_swa_memory:
            local_layers, self.sliding_window = frozenset(), 0
        sizing = dict(
            device=self.device,
            weight_bytes=weight_bytes + (self.cross.pool.nbytes if self.cross else 0),
            page_size=args.page_size,
            mem_fraction=args.mem_fraction_static,
            max_total_tokens=args.max_total_tokens,
        )
        num_local_slots = 0
        if local_layers:
            global_layout, local_layout = layout.split(local_layers)
            num_slots, num_local_slots = plan_hybrid_slots(
                global_bytes_per_slot=global_layout.bytes_per_token(self.dtype),
                local_bytes_per_slot=local_layout.bytes_per_token(self.dtype),
                local_ratio=args.swa_full_tokens_ratio,
                **sizing,  # type: ignore[arg-type]
            )
        else:
            num_slots = plan_num_slots(
                bytes_per_slot=layout.bytes_per_token(self.dtype),
                **sizing,  # type: ignore[arg-type]
            )
        self.pool = KVPool.for_layout(
            layout, num_slots=num_slots, page_size=args.page_size, dtype=self.dtype,
            device=self.device, local_layers=local_layers, num_local_slots=num_local_slots,
        )  # fmt: skip
        backend = TorchNativeBackend
        if kernels is not None:
            if not kernels.result():
                why = "cannot be built on this machine (the warning above says why)"
            elif not kernel_supports(layout.head_dim, self.dtype):
                why = f"does not take head_dim {layout.head_dim} with a {self.dtype} cache"
            else:
                why, backend = "", CpuPagedBackend
            if why and args.attention_backend == "cpu_paged":
                raise RuntimeError(f"--attention-backend cpu_paged: the CPU kernel {why}")
        self.attn: AttentionBackend = backend(
            self.pool,
            self.model.num_heads,
            layout.kv_heads,
            layout.head_dim,
            scale=self.model.attention_scale,
            layer_windows=self.model.layer_windows,
        )
        self.num_slots = num_slots
        self.num_local_slots = num_local_slots  # 0: one pool
        # Images whose cross-attention K/V fit at once (0: the model has no such state).
        self.cross_image_slots = self.cross.pool.capacity if self.cross is not None else 0
        self.max_seqs = args.max_running_requests
        # Row r, column i: the slot of token i of the sequence in row r. Zeros point at the
        # scratch page, so stale or unset entries are always valid indices.
        self.req_to_slot = torch.zeros(
            self.max_seqs, self.context_length, dtype=torch.int64, device=self.device
        )
        # The same for the local pool's slots (entries outside every window may be 0).
        self.req_to_local: torch.Tensor | None = None
        if num_local_slots:
            self.req_to_local = torch.zeros_like(self.req_to_slot)
        self.free_rows = list(range(self.max_seqs - 1, -1, -1))
        self.seqs: dict[str, _Seq] = {}
        self.sampler = Sampler(cfg.vocab_size, list(model.eos_token_ids), args.random_seed)
        self.grammars = WorkerGrammars(
            args.tokenizer_path or model.path, cfg.vocab_size, list(model.eos_token_ids)
        )
        # Capabilities (worker/models/base.py); None: the model has none.
        self.image_encoder = self.model if isinstance(self.model, EncodesImages) else None
        self.mrope_model = self.model if isinstance(self.model, MRopePositions) else None
        caps = architecture(model.architecture).capabilities
        self.bidirectional_images = caps.bidirectional_images
        self.embeddings: ImageEmbeddings | None = None
        if self.image_encoder is not None and self.cross is None:
            self.embeddings = ImageEmbeddings(
                self.image_encoder, self.mm_cache, args.encoder_slice_patches
            )
        # Images encoded ahead of their prefill (None: encoded in it).
        self.ahead = self.embeddings.ahead if self.embeddings is not None else None
        self.cross_images_encoded = 0

    @property
    def images_encoded(self) -> int:
        """Vision-encoder runs, one per image (tests and stats count them)."""
        own = self.embeddings.encoded if self.embeddings is not None else 0
        return own + self.cross_images_encoded

    # ------------------------------------------------------------------ state from diffs

    def _drop(self, key: str) -> None:
        seq = self.seqs.pop(key, None)
        if seq is not None:
            self.free_rows.append(seq.row)
        if self.cross is not None:
            self.cross.drop(key)  # its image slots

    def _admit(self, new: NewSequence) -> None:
        if new.key in self.seqs:
            raise RuntimeError(f"sequence {new.key} admitted twice")
        if not self.free_rows:
            raise RuntimeError(f"more than max_seqs={self.max_seqs} sequences at once")
        row = self.free_rows.pop()
        n_prefix = len(new.prefix_slots)
        if n_prefix:
            self.req_to_slot[row, :n_prefix] = torch.tensor(new.prefix_slots, dtype=torch.int64)
        if self.req_to_local is not None:
            if len(new.prefix_local_slots) != n_prefix:
                raise RuntimeError(
                    f"{new.key}: {len(new.prefix_local_slots)} local slots for a prefix of "
                    f"{n_prefix} tokens"
                )
            if n_prefix:
                local = torch.tensor(new.prefix_local_slots, dtype=torch.int64)
                self.req_to_local[row, :n_prefix] = local
        ids = list(new.input_ids)
        sampling = SamplingRow(new.sampling, ids[: new.num_prompt_tokens], [])
        sampling.output_ids = ids[new.num_prompt_tokens :]
        if new.sampling.grammar is not None:  # compiles while the prompt is computed
            sampling.grammar = self.grammars.start(new.sampling.grammar, sampling.output_ids)
        if new.images and self.image_encoder is None:
            raise RuntimeError(f"{new.key}: images sent to a model that takes none")
        seq = _Seq(row, ids, new.num_prompt_tokens, n_prefix, sampling, list(new.images))
        if self.mrope_model is not None:
            mrope, seq.mrope_delta = self.mrope_model.mrope_positions(
                ids[: new.num_prompt_tokens], seq.images
            )
            seq.mrope = mrope.to(self.device)
        if self.cross is not None:
            self.cross.admit(new.key, seq.images, list(new.image_slots))
        self.seqs[new.key] = seq

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepResult:
        for key in plan.dropped:
            self._drop(key)
        for new in plan.new:
            self._admit(new)
        t0 = time.perf_counter()
        encoded = self.images_encoded
        kv_computed = self.cross.kv_computed if self.cross is not None else 0
        ready: list[bytes] = []  # images sent to encode ahead that are ready now
        if self.ahead is not None:  # queue the plan's images, run one slice of the queue
            ready = self.ahead.add(plan.encode) + self.ahead.advance()
        elif plan.encode:
            raise RuntimeError("images sent to encode ahead to a worker that does not")
        out = self._compute(plan)
        sample_keys = out.sample_keys
        tokens, logprobs = self.sampler.sample(
            self._sample_logits(out), [self.seqs[k].row_sampling for k in sample_keys]
        )
        # After the sampled rows, so that every rank runs the LM head's gathers in one order.
        prompt_lps = (
            prompt_logprobs(self.model.compute_logits, out.hidden, out.prompt_spans, self.rank == 0)
            if out.prompt_spans and out.hidden is not None
            else {}
        )
        for key, token in zip(sample_keys, tokens, strict=True):
            seq = self.seqs[key]
            seq.token_ids.append(token)
            seq.row_sampling.output_ids.append(token)
            if seq.row_sampling.grammar is not None:
                seq.row_sampling.grammar.accept(token)
        return StepResult(
            plan.step,
            sample_keys,
            tokens,
            logprobs,
            time.perf_counter() - t0,
            self.images_encoded - encoded,
            prompt_lps,
            (self.cross.kv_computed if self.cross is not None else 0) - kv_computed,
            ready,
            self.mm_cache.used,
        )

    @torch.inference_mode()
    def forward(
        self, plan: StepPlan, *, every_token: bool = False
    ) -> tuple[torch.Tensor, list[str]]:
        """Compute every chunk of `plan` (sequences already admitted). Returns float32 logits
        [n_sample, vocab] for the chunks with sample=True (plan order) and their keys; with
        every_token (tests), logits [T, vocab] for every token of the batch instead."""
        out = self._compute(plan)
        if every_token and out.hidden is not None:
            return self.model.compute_logits(out.hidden), out.sample_keys
        return self._sample_logits(out), out.sample_keys

    def _sample_logits(self, out: _Computed) -> torch.Tensor:
        """float32 logits [n_sample, vocab] of the rows to sample; the LM head runs on those
        rows only."""
        if not out.sample_idx or out.hidden is None:
            vocab = self.model.config.vocab_size
            return torch.empty(0, vocab, dtype=torch.float32, device=self.device)
        picked = out.hidden[torch.tensor(out.sample_idx, device=self.device)]  # [n, hidden]
        logits: torch.Tensor = self.model.compute_logits(picked)
        return logits

    def _compute(self, plan: StepPlan) -> _Computed:
        """Run the model over every chunk of `plan` (sequences already admitted)."""
        if not plan.chunks:
            return _Computed(None, [], [], [])
        ids: list[int] = []
        index: list[int] = []  # each token's index in its sequence
        positions: list[torch.Tensor] = []  # M-RoPE only: [3, n] per chunk
        slots: list[int] = []
        local_slots: list[int] = []  # with a local pool
        rows: list[int] = []
        layouts: list[ChunkLayout] = []
        sample_idx: list[int] = []
        sample_keys: list[str] = []
        spans: list[PromptSpan] = []
        overlaps: list[Overlap] = []
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
            if self.req_to_local is not None and len(chunk.new_local_slots) != n:
                raise RuntimeError(
                    f"{chunk.key}: {len(chunk.new_local_slots)} local slots for {n} tokens"
                )
            full: list[tuple[int, int]] = []  # images attended in full (bidirectional)
            for img in seq.images if self.cross is None else ():
                lo, hi = max(start, img.offset), min(start + n, img.offset + img.num_tokens)
                if lo < hi:
                    overlaps.append((img, lo - img.offset, len(ids) + lo - start, hi - lo))
                    if self.bidirectional_images:
                        if hi - lo != img.num_tokens:
                            raise RuntimeError(f"{chunk.key}: image split across chunks")
                        full.append((lo, hi))
            if seq.mrope is not None:
                positions.append(self._mrope_slice(seq, start, n))
            layouts.append(ChunkLayout(seq.row, len(ids), n, start, tuple(full)))
            span = prompt_span(
                chunk.key, seq.row_sampling.params, seq.token_ids, seq.num_prompt, start, n,
                len(ids),
            )  # fmt: skip
            if span is not None:
                spans.append(span)
            ids.extend(seq.token_ids[start : start + n])
            index.extend(range(start, start + n))
            slots.extend(chunk.new_slots)
            local_slots.extend(chunk.new_local_slots)
            rows.extend([seq.row] * n)
            seq.num_computed = start + n
            if chunk.sample:
                sample_idx.append(len(ids) - 1)
                sample_keys.append(chunk.key)
        dev = self.device
        index_t = torch.tensor(index, dtype=torch.int64, device=dev)
        if slots:
            self.pool.commit(max(slots) + 1)
        slots_t = torch.tensor(slots, dtype=torch.int64, device=dev)
        rows_t = torch.tensor(rows, dtype=torch.int64, device=dev)
        self.req_to_slot[rows_t, index_t] = slots_t
        local = None
        if self.req_to_local is not None:
            if local_slots:
                self.pool.commit(max(local_slots) + 1, local=True)
            local_t = torch.tensor(local_slots, dtype=torch.int64, device=dev)
            self.req_to_local[rows_t, index_t] = local_t
            local = (local_t, self.req_to_local)
        self.attn.plan(layouts, slots_t, self.req_to_slot, local)
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.cat(positions, dim=1) if positions else index_t  # [3, T] or [T]
        if self.cross is not None:
            self.cross_images_encoded += self.cross.fill_pending()
            cross = self.cross.plan([c.key for c in plan.chunks], layouts, len(ids))
            hidden = self.cross.model(ids_t, pos_t, self.attn, cross=cross)
        elif overlaps:
            assert self.embeddings is not None  # _admit refused images otherwise
            embeds = self.embeddings.merge(ids_t, overlaps)
            hidden = self.model(ids_t, pos_t, self.attn, input_embeds=embeds)
        else:
            hidden = self.model(ids_t, pos_t, self.attn)
        return _Computed(hidden, sample_idx, sample_keys, spans)

    # ------------------------------------------------------------------ vision inputs

    @staticmethod
    def _mrope_slice(seq: _Seq, start: int, n: int) -> torch.Tensor:
        """[3, n] positions of tokens [start, start + n): the prompt's from its M-RoPE table,
        later tokens (outputs) at index + delta on every axis."""
        assert seq.mrope is not None
        end, split = start + n, min(start + n, seq.num_prompt)
        parts = [seq.mrope[:, start:split]] if start < split else []
        if end > split:
            tail = torch.arange(max(start, split), end, device=seq.mrope.device)
            parts.append((tail + seq.mrope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
