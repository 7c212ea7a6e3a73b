"""`python -m fovea.launch_server`: the same entry as the `launch_server` console script."""

from __future__ import annotations

from fovea.launcher.launch import main

if __name__ == "__main__":
    main()
