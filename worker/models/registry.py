"""Architecture name (config.json `architectures[0]`) -> model class, from the architecture
table (common/architectures.py); the class's module is imported only here, so checking a name
needs no torch."""

from __future__ import annotations

from typing import Any

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


def model_class(name: str) -> Any:
    return architecture(name).model.load()
