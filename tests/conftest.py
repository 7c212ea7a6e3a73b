from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test helper modules (tiny_models, server_harness) import as top-level names.
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))
