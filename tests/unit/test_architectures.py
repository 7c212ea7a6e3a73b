"""The architecture table (common/architectures.py): every row names classes that exist, a
built-in template that places images when the model takes them, and capabilities its model
class implements."""

from __future__ import annotations

import pytest

from fovea.common.architectures import ARCHITECTURES, Architecture
from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES
from fovea.tokenizer_service.processors.base import ImageProcessor


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_row(name: str) -> None:
    row: Architecture = ARCHITECTURES[name]
    caps = row.capabilities
    model = row.model.load()
    assert isinstance(model, type)
    assert callable(model.compute_logits) and callable(model.forward)
    assert hasattr(model, "encode_images") == caps.encodes_images
    assert hasattr(model, "mrope_positions") == caps.mrope_positions
    assert hasattr(model, "cross_kv") == caps.cross_attention_images
    assert (row.processor is not None) == caps.encodes_images
    if row.processor is not None:
        assert issubclass(row.processor.load(), ImageProcessor)
    if row.chat_template is not None:
        assert BUILTIN_TEMPLATES[row.chat_template].vision == caps.encodes_images
    assert not (caps.mrope_positions or caps.bidirectional_images) or caps.encodes_images
    assert not caps.cross_attention_images or caps.encodes_images
