"""DeepSeek-VL2-small's rows of bench/kv_capacity.py (`--families deepseek`, `--decode`):
the MLA latent KV cache against the decompressed per-head one.

Capacity: DeepSeek-VL2-small's real text shapes, the tokens whose KV fits in a fixed budget
(what `--budget-tokens` tokens take in the decompressed layout) in `--dtype`, before and
after, computed by the code that sizes the worker's pool (the model's kv_layout ->
KVLayout.bytes_per_token -> kv_pool.slots_in_budget, as ModelRunner -> plan_num_slots does):
MLA's latent (kv_lora_rank + qk_rope_head_dim a token and layer) against the decompressed
per-head K/V that `--mla-kv-cache decompressed` keeps (the layout before issue 31).

Decode step (`--decode`): DeepSeek-VL2-small's attention shapes (hidden 2048, 16 heads,
kv_lora_rank 512, q_lora_rank none, qk_nope 128 + rope 64, v 128) in `--layers` random-weight
decoder layers with a dense MLP of `--intermediate` (the MLP is the same on both paths and
the experts would not fit a small machine), `--batch` sequences of `--decode-context` cached
tokens (random cache contents: the timing does not depend on them), each decoding one token;
the latent pool and the decompressed one alternate round by round on the same weights, with
the attention backend the server would pick. Reported: median ms of the decoder stack's
forward per step (no LM head), and after / before.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from fovea.common.families.deepseek_vl2 import DeepseekV2TextConfig
from fovea.worker.kv_pool import KVLayout, slots_in_budget
from fovea.worker.models.deepseek_v2 import kv_layout

# deepseek-ai/deepseek-vl2-small config.json, language_config (bench/README.md cites it).
DEEPSEEK_VL2_SMALL: dict[str, Any] = {
    "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 102400,
    "max_position_embeddings": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "topk_method": "greedy", "rope_theta": 10000,
}  # fmt: skip
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def capacity_row(
    model: str, before: KVLayout, after: KVLayout, budget: int, dtype: torch.dtype, page: int
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "family": "deepseek", "model": model, "budget_bytes": budget, "dtype": str(dtype)[6:]
    }
    for name, layout in (("before", before), ("after", after)):
        per_token = layout.bytes_per_token(dtype)
        out[name] = {
            "kind": layout.kind,
            "values_per_token_layer": per_token // (layout.num_layers * dtype.itemsize),
            "bytes_per_token": per_token,
            "tokens": slots_in_budget(budget, per_token, page),
        }
    out["ratio"] = round(out["after"]["tokens"] / out["before"]["tokens"], 3)
    return out


def deepseek_rows(budget_tokens: int, dtype_name: str, page: int) -> list[dict[str, Any]]:
    """The budget is what `budget_tokens` tokens take in the decompressed layout."""
    small = DeepseekV2TextConfig.from_hf(DEEPSEEK_VL2_SMALL)
    before, after = kv_layout(small, mla_latent=False), kv_layout(small)
    dtype = DTYPES[dtype_name]
    budget = budget_tokens * before.bytes_per_token(dtype)
    return [capacity_row("deepseek-vl2-small", before, after, budget, dtype, page)]


class DecodeSetup:
    """One pool and backend over a shared model: `batch` sequences of `context` cached tokens
    in consecutive slots, each decoding at position `context`."""

    def __init__(self, model: Any, latent: bool, batch: int, context: int, backend: type) -> None:
        from fovea.worker.attention.base import ChunkLayout
        from fovea.worker.kv_pool import KVPool

        layout = model.kv_layout(mla_latent=latent)
        dtype = next(model.parameters()).dtype
        rows = batch * (context + 1)
        self.pool = KVPool.for_layout(
            layout, num_slots=rows, page_size=1, dtype=dtype, device=torch.device("cpu")
        )
        for t in (*self.pool.k, *self.pool.v):
            t[1:].normal_()
        self.attn = backend(
            self.pool, model.num_heads, layout.kv_heads, layout.head_dim,
            scale=model.attention_scale,
        )  # fmt: skip
        slots = torch.arange(1, rows + 1).view(batch, context + 1)
        self.req_to_slot = slots
        self.out_slots = slots[:, context].contiguous()
        self.chunks = [ChunkLayout(b, b, 1, context) for b in range(batch)]
        self.positions = torch.full((batch,), context, dtype=torch.int64)
        self.ids = torch.randint(0, model.config.vocab_size, (batch,))

    def step(self, model: Any) -> float:
        t0 = time.perf_counter()
        self.attn.plan(self.chunks, self.out_slots, self.req_to_slot)
        model(self.ids, self.positions, self.attn)
        return time.perf_counter() - t0


def decode_bench(args: argparse.Namespace) -> dict[str, Any]:
    from fovea.worker.attention import cpu_kernels
    from fovea.worker.attention.cpu_paged import CpuPagedBackend
    from fovea.worker.attention.torch_native import TorchNativeBackend
    from fovea.worker.loader import prepare_for_cpu
    from fovea.worker.models.deepseek_v2 import DeepseekV2ForCausalLM

    shapes = {**DEEPSEEK_VL2_SMALL, "num_hidden_layers": args.layers, "vocab_size": 1024,
              "n_routed_experts": None, "intermediate_size": args.intermediate}  # fmt: skip
    cfg = DeepseekV2TextConfig.from_hf(shapes)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = DeepseekV2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old_dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.02) if "norm" in name else p.normal_(0.0, 0.02)
    prepare_for_cpu(model)
    model.eval()
    backend = CpuPagedBackend if cpu_kernels.load() else TorchNativeBackend
    setups = {
        "before": DecodeSetup(model, False, args.batch, args.decode_context, backend),
        "after": DecodeSetup(model, True, args.batch, args.decode_context, backend),
    }
    times: dict[str, list[float]] = {k: [] for k in setups}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for s in setups.values():
                s.step(model)
        for _ in range(args.rounds):
            for k, s in setups.items():
                times[k].append(s.step(model))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "model": "deepseek-vl2-small attention shapes",
        "backend": backend.__name__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "layers": args.layers,
        "batch": args.batch,
        "context": args.decode_context,
        "rounds": args.rounds,
        "before": {"kind": setups["before"].pool.kind, "step_ms_median": round(ms["before"], 3)},
        "after": {"kind": setups["after"].pool.kind, "step_ms_median": round(ms["after"], 3)},
        "after_over_before": round(ms["after"] / ms["before"], 3),
    }
