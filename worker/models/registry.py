"""Architecture name (config.json `architectures[0]`) -> model class, from the architecture
table (common/architectures.py); the class's module is imported only here, so checking a name
needs no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fovea.common.architectures import (
    UnsupportedArchitecture,
    architecture,
    check_architecture,
    supported_architectures,
)

__all__ = [
    "UnsupportedArchitecture",
    "check_architecture",
    "model_class",
    "supported_architectures",
]


if TYPE_CHECKING:
    from fovea.worker.models.base import CausalLMBase


def model_class(name: str) -> type[CausalLMBase]:
    cls: type[CausalLMBase] = architecture(name).model.load()
    return cls
