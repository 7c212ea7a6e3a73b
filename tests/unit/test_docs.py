"""docs/design.md stays true to the tree: its package map lists every module once and nothing
that is gone; the documents the README points to exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "pyproject.toml").exists():  # tests may sit one folder deeper
    ROOT = ROOT.parent
PACKAGES = ("launcher", "server", "tokenizer_service", "scheduler", "worker", "common", "bench")


def _modules() -> list[str]:
    found = ["launch_server.py", "__init__.py"]
    for pkg in PACKAGES:
        found += [p.relative_to(ROOT).as_posix() for p in (ROOT / pkg).rglob("*.py")]
    return sorted(found)


def _package_map() -> list[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("## Package map", 1)[1]
    return re.findall(r"^- `([^`]+\.py)`", section, flags=re.MULTILINE)


def test_the_package_map_lists_every_module_once() -> None:
    listed = _package_map()
    assert sorted(listed) == sorted(set(listed)), "a module is listed twice"
    missing = sorted(set(_modules()) - set(listed))
    gone = sorted(set(listed) - set(_modules()))
    assert (missing, gone) == ([], [])


def test_documents_the_readme_names_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`((?:docs|deploy|bench)/[\w./-]+\.md)`", readme))
    assert {"docs/design.md", "docs/api.md", "docs/cpu.md", "docs/models.md"} <= named
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []
