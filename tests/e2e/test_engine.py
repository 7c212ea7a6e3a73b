"""The offline Engine: same processes, no HTTP."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_engine_generate_stream_and_shutdown(tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fovea import Engine

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "Paris is the capital"]
    greedy = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    expected = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        expected.append([int(t) for t in out[0, len(ids) :]])

    with Engine(model_path=str(tiny_llama), max_total_tokens=2000, dtype="float32") as llm:
        outs = llm.generate(prompts, greedy)
        assert [o["output_ids"] for o in outs] == expected
        assert outs[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}

        async def stream() -> list[str]:
            it = await llm.async_generate(prompts[0], greedy, stream=True)
            return [chunk["text"] async for chunk in it]

        texts = asyncio.run(stream())
        assert texts[-1] == outs[0]["text"]
        with pytest.raises(ValueError, match="max_tokens must be at least 1"):
            llm.generate("x", {"max_new_tokens": 0})
        stats = llm.get_server_info()["scheduler"]
        assert stats["free_slots"] + stats["tree_slots"] == stats["total_slots"]
    assert [p for p in multiprocessing.active_children() if p.name.startswith("fovea-")] == []
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("x", greedy)
