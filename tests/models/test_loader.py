"""Loading HF safetensors: sharded checkpoints, clear errors, tensor-parallel slicing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fovea.worker import distributed
from fovea.worker.loader import WeightLoadError, load_model
from fovea.worker.models.registry import UnsupportedArchitecture, check_architecture

CPU = torch.device("cpu")
IDS = torch.tensor([5, 17, 99, 300, 42, 7, 8])


def _logits(path: Path) -> torch.Tensor:
    from fovea.worker.attention.base import ChunkLayout
    from fovea.worker.attention.torch_native import TorchNativeBackend
    from fovea.worker.kv_pool import KVPool

    model = load_model(str(path), "LlamaForCausalLM", torch.float32, CPU)
    cfg = model.config
    pool = KVPool(
        num_layers=cfg.num_layers,
        num_slots=16,
        page_size=1,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=torch.float32,
        device=CPU,
    )
    attn = TorchNativeBackend(pool, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    n = len(IDS)
    table = torch.arange(1, n + 1)[None, :]
    attn.plan([ChunkLayout(0, 0, n, 0)], table[0], table)
    with torch.inference_mode():
        return model.compute_logits(model(IDS, torch.arange(n), attn))  # type: ignore[no-any-return]


def _copy_without_weights(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors*"))


def _write_sharded(tensors: dict[str, torch.Tensor], dst: Path) -> None:
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(dst / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_loads_identically(tiny_llama: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    sharded = tmp_path / "sharded"
    _copy_without_weights(tiny_llama, sharded)
    _write_sharded(tensors, sharded)
    assert torch.equal(_logits(sharded), _logits(tiny_llama))


def test_missing_tensor_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    del tensors["model.norm.weight"]
    broken = tmp_path / "missing"
    _copy_without_weights(tiny_llama, broken)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightLoadError) as e:
        load_model(str(broken), "LlamaForCausalLM", torch.float32, CPU)
    assert str(e.value) == (
        f"checkpoint {str(broken)!r} lacks weights: "
        "model.layers.1.self_attn.qkv_proj.weight[k], model.norm.weight"
    )


def test_unexpected_tensor_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    broken = tmp_path / "extra"
    _copy_without_weights(tiny_llama, broken)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightLoadError) as e:
        load_model(str(broken), "LlamaForCausalLM", torch.float32, CPU)
    assert str(e.value) == (
        f"checkpoint {str(broken)!r} has weights the model does not use: "
        "model.layers.0.mlp.extra.weight"
    )


def test_no_weights_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    _copy_without_weights(tiny_llama, empty)
    with pytest.raises(WeightLoadError) as e:
        load_model(str(empty), "LlamaForCausalLM", torch.float32, CPU)
    assert str(e.value) == (
        f"no model.safetensors or model.safetensors.index.json in {str(empty)!r}"
    )


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(UnsupportedArchitecture) as e:
        check_architecture("GPT2LMHeadModel")
    assert str(e.value) == (
        "architecture 'GPT2LMHeadModel' is not supported; supported: "
        "DeepseekVLV2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, "
        "LlamaForCausalLM, "
        "LlavaForConditionalGeneration, LlavaLlamaForCausalLM, LlavaMistralForCausalLM, "
        "LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "
        "LlavaQwenForCausalLM, MiniCPMV, MiniCPMV4_6ForConditionalGeneration, "
        "MistralForCausalLM, MllamaForConditionalGeneration, Qwen2ForCausalLM, "
        "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_rank_reads_its_slices(
    tiny_qwen2: Path, rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As rank `rank` of 2 (no collectives run at load time): each parallel parameter holds
    exactly its slice of the checkpoint tensor."""
    monkeypatch.setattr(distributed, "_TP_SIZE", 2)
    monkeypatch.setattr(distributed, "_TP_RANK", rank)
    model = load_model(str(tiny_qwen2), "Qwen2ForCausalLM", torch.float32, CPU)
    full = load_file(str(tiny_qwen2 / "model.safetensors"))
    p = dict(model.named_parameters())
    pre = "model.layers.0."
    # 4 heads, 2 KV heads, head_dim 32: per rank 2 query heads (64 rows), 1 KV head (32 rows)
    q, k, v = (full[f"{pre}self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(
        p[f"{pre}self_attn.qkv_proj.weight"],
        torch.cat(
            [
                q[64 * rank : 64 * rank + 64],
                k[32 * rank : 32 * rank + 32],
                v[32 * rank : 32 * rank + 32],
            ]
        ),
    )
    qb = full[f"{pre}self_attn.q_proj.bias"]
    assert torch.equal(p[f"{pre}self_attn.qkv_proj.bias"][:64], qb[64 * rank : 64 * rank + 64])
    o = full[f"{pre}self_attn.o_proj.weight"]
    assert torch.equal(p[f"{pre}self_attn.o_proj.weight"], o[:, 64 * rank : 64 * rank + 64])
    gate, up = full[f"{pre}mlp.gate_proj.weight"], full[f"{pre}mlp.up_proj.weight"]
    assert torch.equal(
        p[f"{pre}mlp.gate_up_proj.weight"],
        torch.cat([gate[128 * rank : 128 * rank + 128], up[128 * rank : 128 * rank + 128]]),
    )
    emb = full["model.embed_tokens.weight"]
    assert torch.equal(p["model.embed_tokens.weight"], emb[256 * rank : 256 * rank + 256])
    assert torch.equal(p["model.norm.weight"], full["model.norm.weight"])


@pytest.mark.slow
def test_tp2_over_gloo_matches_tp1(tiny_qwen2: Path, tmp_path: Path) -> None:
    """Two real ranks (gloo, all-reduce/all-gather) give tp=1's logits."""
    import torch.multiprocessing as mp
    from worker_driver import tp_rank_logits

    outs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.pt"
        mp.spawn(
            tp_rank_logits,
            args=(tp, str(tiny_qwen2), str(tmp_path / f"init{tp}"), str(out)),
            nprocs=tp,
        )
        outs[tp] = torch.load(out)
        outs[tp]["ranks"] = [torch.load(f"{out}.{r}") for r in range(tp)]
    assert (outs[1]["logits"] - outs[2]["logits"]).abs().max().item() < 1e-4
    assert outs[1]["next"] == outs[2]["next"]
    # Sharded loading: each rank holds about half the parameters (norms are replicated).
    full = outs[1]["ranks"][0]["param_bytes"]
    halves = [r["param_bytes"] for r in outs[2]["ranks"]]
    assert halves[0] == halves[1] and 0.5 * full <= halves[0] <= 0.51 * full
    # Per forward: 2 all-reduces per layer (o_proj, down_proj) + 1 (vocab-parallel embedding),
    # 1 all-gather (logits): 2 layers here.
    for r in outs[2]["ranks"]:
        assert r["calls"] == {"all_reduce": 2 * 2 + 1, "all_gather": 1}


def test_loading_progress_logs_lines_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from fovea.worker.loader import _progress

    with caplog.at_level(logging.INFO, logger="fovea.loader"):
        assert list(_progress(iter("abc"), 3, "/m", every_s=0.0)) == ["a", "b", "c"]
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(" (")[0] for ln in lines[:3]] == [
        "loading weights from /m: 1/3 tensors",
        "loading weights from /m: 2/3 tensors",
        "loading weights from /m: 3/3 tensors",
    ]
    assert lines[3].startswith("loaded 3 tensors from /m in ")
