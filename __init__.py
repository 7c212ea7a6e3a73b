"""Fovea: serving vision-language and text models behind an OpenAI-compatible API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams"]

if TYPE_CHECKING:
    from fovea.common.sampling import SamplingParams
    from fovea.launcher.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy: `import fovea` stays cheap for the processes that never need the Engine.
    if name == "Engine":
        from fovea.launcher.engine import Engine

        return Engine
    if name == "SamplingParams":
        from fovea.common.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
