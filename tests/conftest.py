from __future__ import annotations

import os
from pathlib import Path

import pytest

# Servers the tests start compare greedy tokens with float32 references; on a CPU with native
# bf16 `--dtype auto` would serve bfloat16 and diverge. (A test's own --dtype still wins.)
os.environ.setdefault("FOVEA_DTYPE", "float32")
# transformers' video processors (the video fidelity tests' reference) import torchvision, which
# lives beside the venv, not in it (tests/fixtures/video_helpers.py says why; README: Test).
_TORCHVISION = Path(__file__).resolve().parents[1] / ".venv" / "torchvision-tests"
if _TORCHVISION.is_dir():
    os.environ.setdefault("FOVEA_TEST_TORCHVISION", str(_TORCHVISION))

from tiny_models import make_tiny_model  # noqa: E402 (after the environment it reads)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_qwen2_vl

    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-5-vl"), "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_gemma3

    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_gemma3_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_gemma3

    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-text"), text_only=True)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), "llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava-next"), "llava_next")


@pytest.fixture(scope="session")
def tiny_llama3_llava_next(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llama3-llava-next"), "llama3_llava_next")


@pytest.fixture(scope="session")
def tiny_llava_onevision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava-onevision"), "llava_onevision")


@pytest.fixture(scope="session")
def tiny_mllama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_mllama import make_tiny_mllama

    return make_tiny_mllama(tmp_path_factory.mktemp("tiny-mllama"))


@pytest.fixture(scope="session")
def tiny_minicpmv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_minicpmv import make_tiny_minicpmv

    # seed 2: greedy outputs of this tiny model vary rather than repeat one token
    return make_tiny_minicpmv(tmp_path_factory.mktemp("tiny-minicpmv"), seed=2)


@pytest.fixture(scope="session")
def tiny_minicpmv4_6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_minicpmv import make_tiny_minicpmv4_6

    return make_tiny_minicpmv4_6(tmp_path_factory.mktemp("tiny-minicpmv4-6"))


@pytest.fixture(scope="session")
def tiny_deepseek_vl2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-VL2 with MLA (like -small / the full model); the reference's files beside."""
    from tiny_deepseek_vl2 import make_tiny_deepseek_vl2

    return make_tiny_deepseek_vl2(tmp_path_factory.mktemp("tiny-deepseek-vl2"), "mla")


@pytest.fixture(scope="session")
def tiny_deepseek_vl2_mha(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-VL2 with multi-head attention (like -tiny, use_mla false)."""
    from tiny_deepseek_vl2 import make_tiny_deepseek_vl2

    return make_tiny_deepseek_vl2(tmp_path_factory.mktemp("tiny-deepseek-vl2-mha"), "mha")
