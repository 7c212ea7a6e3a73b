"""bench/make_vlm.py: the configs carry the published numbers (bench/README.md names the
sources), the added tokens sit at the ids the configs use, and the tokenizer builder covers
every id of a (scaled-down) vocabulary with a token that decodes. No model is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fovea.bench import make_vlm


def test_qwen2_5_vl_config_is_qwen2_5_vl_3b_vision_on_qwen2_5_0_5b() -> None:
    cfg = make_vlm.qwen2_5_vl_config()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads) == (32, 1280, 3420, 16)
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 2)
    assert (v.window_size, list(v.fullatt_block_indexes), v.hidden_act) == (
        112, [7, 15, 23, 31], "silu"
    )  # fmt: skip
    assert v.out_hidden_size == t.hidden_size == 896
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (24, 14, 2)
    assert (t.intermediate_size, t.vocab_size, t.max_position_embeddings) == (4864, 151936, 32768)
    assert (t.rms_norm_eps, t.rope_parameters["rope_theta"]) == (1e-6, 1e6)
    assert cfg.tie_word_embeddings and t.tie_word_embeddings
    head_dim = t.hidden_size // t.num_attention_heads
    assert sum(t.rope_parameters["mrope_section"]) == head_dim // 2 == 32
    ids = (cfg.image_token_id, cfg.video_token_id)
    assert (*ids, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655, 151656, 151652, 151653
    )  # fmt: skip
    added = make_vlm.QWEN_ADDED
    assert [added[k] for k in ("<|image_pad|>", "<|video_pad|>")] == list(ids)
    assert [added[k] for k in ("<|vision_start|>", "<|vision_end|>")] == [151652, 151653]
    assert (added["<|endoftext|>"], added["<|im_end|>"], max(added.values())) == (
        151643, 151645, 151664
    )  # fmt: skip


def test_gemma3_config_is_gemma_3_4b_it_vision_on_gemma_3_270m_text() -> None:
    cfg = make_vlm.gemma3_config()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, v.num_hidden_layers, v.hidden_size) == (896, 14, 27, 1152)
    assert (v.intermediate_size, v.num_attention_heads, v.vision_use_head) == (4304, 16, False)
    side = v.image_size // v.patch_size  # 64 patches a side, pooled to 16
    assert cfg.mm_tokens_per_image == 256 and side % round(cfg.mm_tokens_per_image**0.5) == 0
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (640, 18, 4)
    assert (t.num_key_value_heads, t.head_dim, t.intermediate_size) == (1, 256, 2048)
    assert (t.sliding_window, t.vocab_size, t.max_position_embeddings) == (512, 262208, 32768)
    assert t.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert t.query_pre_attn_scalar == 256 and t.final_logit_softcapping is None
    assert cfg.tie_word_embeddings
    ids = (cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index)
    assert ids == (255999, 256000, 262144)
    added = make_vlm.GEMMA3_ADDED
    names = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    assert tuple(added[k] for k in names) == ids
    assert (added["<pad>"], added["<eos>"], added["<bos>"], added["<end_of_turn>"]) == (
        t.pad_token_id, t.eos_token_id, t.bos_token_id, 106
    )  # fmt: skip


def _scaled(added: dict[str, int], vocab: int) -> dict[str, int]:
    """The same added tokens moved into [0, vocab): low ids kept, high ones from the end."""
    return {tok: i if i < vocab // 2 else vocab - 1 - n for n, (tok, i) in enumerate(added.items())}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_the_tokenizer_covers_and_decodes_every_id(family: str) -> None:
    vocab = 2000
    spec = make_vlm.TOKENIZERS[family]
    added = _scaled(dict(spec.added), vocab)
    tok = make_vlm.family_tokenizer(family, vocab, added)
    assert len(tok) == vocab
    assert tok.convert_tokens_to_ids(list(added)) == list(added.values())
    assert all(isinstance(tok.decode([i]), str) for i in range(vocab))  # none missing
    assert tok.decode(sorted(added.values()), skip_special_tokens=True) == "".join(
        sorted(spec.text_tokens, key=added.__getitem__)
    )  # plain-text added tokens (Qwen's <tool_call>, ...) survive; special ones go
    text = "Héllo wörld, 12345 🙂\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    image = {"qwen2_5_vl": "<|image_pad|>", "gemma3": "<start_of_image>"}[family]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tok.encode(rendered, add_special_tokens=False)
    assert prompt.count(added[image]) == 1
    if spec.bos_on_encode is not None:  # Gemma's tokenizer adds <bos>; the template has its own
        assert tok.encode("a")[0] == added[spec.bos_on_encode] == prompt[0]
    if family == "gemma3":  # newlines are whole tokens, as in Gemma's vocabulary (vLLM needs it)
        nl, nl2, nl3, nl4 = (added["\n" * n] for n in range(1, 5))
        assert [tok.get_vocab()["\n" * n] for n in range(1, 5)] == [nl, nl2, nl3, nl4]
        a, b = tok.encode("a", add_special_tokens=False), tok.encode("b", add_special_tokens=False)
        assert tok.encode("a\n\nb\n", add_special_tokens=False) == [*a, nl2, *b, nl]
        assert tok.encode("a\n\n\n\n\n\nb", add_special_tokens=False) == [*a, nl4, nl2, *b]


def test_the_tokenizer_refuses_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="distinct and in"):
        make_vlm.byte_bpe_tokenizer(300, {"<a>": 300})
    with pytest.raises(ValueError, match="256 byte tokens"):
        make_vlm.byte_bpe_tokenizer(257, {"<a>": 0, "<b>": 1})


def test_gemma3_tower_takes_the_published_names(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = ["vision_tower.encoder.layers.0.w", "vision_tower.vision_model.post_layernorm.w",
             "language_model.model.norm.weight", "multi_modal_projector.w"]  # fmt: skip
    save_file({n: torch.zeros(2) for n in names}, str(tmp_path / "model.safetensors"))
    assert make_vlm.gemma3_hub_names(tmp_path) == 1
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(
            ["vision_tower.vision_model.encoder.layers.0.w", *names[1:]]
        )
    assert make_vlm.gemma3_hub_names(tmp_path) == 0  # already published names
