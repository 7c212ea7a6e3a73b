"""Image processors by model family: the registry.

`load_processor` finds config.json's first architecture in the architecture table
(common/architectures.py) and imports only its processor's module. A family is added by writing
its module (an `ImageProcessor` subclass with a `from_pretrained(model_dir, hf_config)`
classmethod) and naming the class in the family's rows of that table.
"""

from __future__ import annotations

import logging
from typing import Any

from fovea.common.architectures import first_architecture
from fovea.tokenizer_service.processors.base import ImageProcessor, ProcessedImage

__all__ = ["ImageProcessor", "ProcessedImage", "load_processor"]

log = logging.getLogger(__name__)


def load_processor(
    model_dir: str, hf_config: dict[str, Any], resize: str = "pil"
) -> ImageProcessor | None:
    """The image processor of the model's family, configured from model_dir (its
    preprocessor_config.json) and config.json's dict; None for a model that takes no images
    (text-only architectures, and vision architectures Fovea has no processor for yet).
    `resize`: the resize engine (base.resize_uint8) of families that offer a choice."""
    row = first_architecture(hf_config)
    if row is None or row.processor is None:
        if "vision_config" in hf_config:
            architectures = hf_config.get("architectures") or [""]
            log.warning("no image processor for %s: serving it as text-only", architectures[0])
        return None
    processor: ImageProcessor = row.processor.load().from_pretrained(model_dir, hf_config)
    processor.resize_engine = resize
    return processor
