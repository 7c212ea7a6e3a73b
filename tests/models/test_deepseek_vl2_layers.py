"""DeepSeek-V2's layers alone: the MoE layer against a per-token loop written from
DeepSeek-VL2's MoEGate for every gating method its configs use (each expert's MLP run once
over its tokens), and MLA with low-rank queries (q_lora_rank, DeepSeek-V2's default; the
DeepSeek-VL2 checkpoints set none), attention bias and yarn rope against transformers'
DeepseekV2Attention, with the decompressed K/V pool and with the latent pool (prefill, then
decode one token a step in latent space)."""

from __future__ import annotations

import pytest
import torch

from fovea.common.families.deepseek_vl2 import DeepseekV2TextConfig
from fovea.worker.attention.base import ChunkLayout
from fovea.worker.attention.torch_native import TorchNativeBackend
from fovea.worker.kv_pool import KVPool
from fovea.worker.layers.moe import DeepseekMoE
from fovea.worker.models.deepseek_v2 import DeepseekRotary, MLAttention, softmax_scale


def per_token_moe(moe: DeepseekMoE, cfg: DeepseekV2TextConfig, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-VL2's MoEGate + experts one token at a time, as its code reads."""
    e, k, g = cfg.n_routed_experts or 0, cfg.num_experts_per_tok, cfg.n_group
    gu, down = moe.experts.gate_up.weight, moe.experts.down.weight
    assert moe.shared_experts is not None
    sgu, sdown = moe.shared_experts.gate_up_proj.weight, moe.shared_experts.down_proj.weight

    def mlp(v: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate, up = (w13 @ v).chunk(2)
        return w2 @ (torch.nn.functional.silu(gate) * up)

    out = []
    for v in x:
        logits = moe.gate.weight.float() @ v.float()
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = scores.clone()
        if cfg.topk_method == "noaux_tc":
            assert moe.gate.e_score_correction_bias is not None
            choice = scores + moe.gate.e_score_correction_bias
        if cfg.topk_method != "greedy":
            groups = choice.view(g, e // g)
            rank = groups.max(-1).values if cfg.topk_method != "noaux_tc" else (
                groups.sort(descending=True).values[:, :2].sum(-1))  # fmt: skip
            keep = set(rank.argsort(descending=True)[: cfg.topk_group].tolist())
            choice = torch.tensor(
                [c if i // (e // g) in keep else 0.0 for i, c in enumerate(choice.tolist())]
            )
        chosen = choice.argsort(descending=True)[:k].tolist()
        w = scores[chosen]
        if k > 1 and cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.routed_scaling_factor
        y = mlp(v, sgu, sdown)
        for j, expert in enumerate(chosen):
            y = y + w[j] * mlp(v, gu[expert], down[expert])
        out.append(y)
    return torch.stack(out)


GATINGS = {
    "greedy": {"topk_method": "greedy"},  # DeepSeek-VL2-tiny / -small
    "greedy_norm": {"topk_method": "greedy", "norm_topk_prob": True, "routed_scaling_factor": 2.0},
    "group_limited": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                      "num_experts_per_tok": 3},
    "noaux_tc": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 2,
                 "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5},  # the full model
}  # fmt: skip


@pytest.mark.parametrize("gating", list(GATINGS))
def test_moe_matches_a_per_token_loop_running_each_expert_once(
    gating: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DeepseekV2TextConfig.from_hf(
        {"hidden_size": 32, "moe_intermediate_size": 16, "n_routed_experts": 8,
         "n_shared_experts": 2, "num_experts_per_tok": 2, **GATINGS[gating]}
    )  # fmt: skip
    torch.manual_seed(0)
    moe = DeepseekMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(40, 32)
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or linear(*a))
    with torch.no_grad():
        ours = moe(x)
    monkeypatch.undo()
    ids, _ = moe.gate(x)
    hit = len(set(ids.flatten().tolist()))
    assert hit > 4  # 40 tokens spread over most of the 8 experts
    # gate 1, each expert hit 2 (gate_up, down) whatever its token count, shared experts 2
    assert len(calls) == 1 + 2 * hit + 2
    assert (ours - per_token_moe(moe, cfg, x)).abs().max().item() < 1e-5


YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.9, "mscale_all_dim": 0.7}  # fmt: skip


@pytest.mark.parametrize("kind", ["kv", "mla_latent"])
def test_mla_with_low_rank_queries_matches_transformers(kind: str) -> None:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2Attention,
        DeepseekV2RotaryEmbedding,
    )

    dims = dict(hidden_size=64, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, attention_bias=True,
                max_position_embeddings=64)  # fmt: skip
    hf_cfg = DeepseekV2Config(
        **dims, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, **YARN}
    )
    hf_cfg._attn_implementation = "eager"
    cfg = DeepseekV2TextConfig.from_hf({**dims, "rope_scaling": {"type": "yarn", **YARN}})
    torch.manual_seed(0)
    theirs = DeepseekV2Attention(hf_cfg, 0).eval()
    for name, p in theirs.named_parameters():
        torch.nn.init.normal_(p, 1.0 if "norm" in name else 0.0, 0.2)
    ours = MLAttention(cfg, 0)
    ours.load_state_dict(theirs.state_dict())  # the checkpoint's names, unchanged
    t = 20  # positions past original_max_position_embeddings: yarn's ramp matters
    x = torch.randn(1, t, 64)
    positions = torch.arange(t)
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        freqs = DeepseekV2RotaryEmbedding(hf_cfg)(x, positions[None])
        expected = theirs(x, attention_mask=causal, position_embeddings=freqs)[0][0]
        # "kv": per-head K [k_nope, k_rope] (24) and V padded to 24; "mla_latent": one row of
        # kv_lora_rank + qk_rope_head_dim (40) a token.
        heads, dim = (4, 24) if kind == "kv" else (1, 40)
        pool = KVPool(num_layers=1, num_slots=t, page_size=1, kv_heads=heads, head_dim=dim,
                      dtype=torch.float32, device=torch.device("cpu"), kind=kind)  # fmt: skip
        attn = TorchNativeBackend(pool, 4, heads, dim, scale=softmax_scale(cfg))
        req_to_slot = torch.arange(1, t + 1)[None]
        cos_sin = DeepseekRotary(8, cfg).cos_sin(positions, torch.float32)
        p = 12  # a prefill of 12 tokens, then one token a step
        attn.plan([ChunkLayout(0, 0, p, 0)], req_to_slot[0, :p], req_to_slot)
        got = [ours(x[0, :p], (cos_sin[0][:p], cos_sin[1][:p]), attn)]
        for i in range(p, t):
            attn.plan([ChunkLayout(0, 0, 1, i)], req_to_slot[0, i : i + 1], req_to_slot)
            got.append(ours(x[0, i : i + 1], (cos_sin[0][i : i + 1], cos_sin[1][i : i + 1]), attn))
    assert softmax_scale(cfg) != 24**-0.5  # mscale_all_dim scales the scores
    assert (torch.cat(got) - expected).abs().max().item() < 1e-5


def test_linear_rope_scaling_divides_positions() -> None:
    """DeepSeek-VL2's linear scaling: position p rotates as p / factor."""
    plain = DeepseekV2TextConfig.from_hf({"max_position_embeddings": 64})
    linear = DeepseekV2TextConfig.from_hf(
        {"max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    a, b = DeepseekRotary(16, plain), DeepseekRotary(16, linear)
    assert torch.equal(b.cos[::2], a.cos[:32]) and torch.equal(b.sin[::2], a.sin[:32])
    assert not torch.equal(b.cos[1:32], a.cos[1:32])
