"""Where Fovea keeps what it derives once per machine (converted models, built CPU kernels):
`$FOVEA_CACHE_DIR`, else `$XDG_CACHE_HOME/fovea`, else `~/.cache/fovea`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if env := os.environ.get("FOVEA_CACHE_DIR"):
        return Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "fovea"
    return Path.home() / ".cache" / "fovea"
