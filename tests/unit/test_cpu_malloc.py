"""A CPU worker's allocator: which workers the launcher gives tcmalloc, and glibc's malloc
keeping freed blocks of a step's size instead of unmapping them (checked in a fresh
interpreter: the settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fovea.worker import cpu_malloc

# Counts glibc's mmapped blocks (mallinfo2().hblks) around one 8 MiB malloc.
CODE = """
import ctypes, sys
from fovea.worker.cpu_malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2().hblks
p = libc.malloc(8 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(p)
print(tuned, mapped)
"""


def _run(mode: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CODE, mode], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_an_8_mib_block_comes_from_the_heap_once_tuned() -> None:
    assert _run("plain") == "None 1"  # glibc's own threshold: a fresh mapping
    assert _run("tuned") == "True 0"


@pytest.mark.parametrize(
    ("device", "environ", "gpu_node", "expected"),
    [
        ("cpu", {}, True, "/lib/tc.so"),
        ("cuda", {}, False, None),
        ("auto", {}, False, "/lib/tc.so"),
        ("auto", {}, True, None),  # a GPU serves it
        ("auto", {"CUDA_VISIBLE_DEVICES": ""}, True, "/lib/tc.so"),  # every GPU hidden
        ("auto", {"CUDA_VISIBLE_DEVICES": "-1"}, True, "/lib/tc.so"),
        ("auto", {"CUDA_VISIBLE_DEVICES": "0"}, True, None),
        ("cpu", {"LD_PRELOAD": "/opt/mine.so"}, False, None),  # the user's own: kept as it is
        ("cpu", {"LD_PRELOAD": ""}, False, None),
        ("cpu", {"FOVEA_TCMALLOC": ""}, False, None),  # opted out
        ("cpu", {"FOVEA_TCMALLOC": "{tmp}/libtcmalloc.so.4"}, False, "{tmp}/libtcmalloc.so.4"),
        ("cpu", {"FOVEA_TCMALLOC": "{tmp}/missing.so"}, False, None),  # logged, glibc kept
    ],
)  # fmt: skip
def test_which_workers_get_tcmalloc(
    device: str,
    environ: dict[str, str],
    gpu_node: bool,
    expected: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "libtcmalloc.so.4").touch()
    environ = {k: v.format(tmp=tmp_path) for k, v in environ.items()}
    expected = expected.format(tmp=tmp_path) if expected else None
    node = tmp_path / "nvidiactl"
    if gpu_node:
        node.touch()
    monkeypatch.setattr(cpu_malloc, "NVIDIA_CONTROL_NODE", str(node))
    monkeypatch.setattr(cpu_malloc, "TCMALLOC_GLOBS", ("/nonexistent/libtc*.so", "/lib/tc.so"))
    monkeypatch.setattr(cpu_malloc.glob, "glob", lambda p: [p] if p == "/lib/tc.so" else [])
    assert cpu_malloc.worker_preload(device, environ) == expected


def test_no_tcmalloc_installed_means_no_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_malloc, "TCMALLOC_GLOBS", ("/nonexistent/libtc*.so",))
    assert cpu_malloc.worker_preload("cpu", {}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_allocator_name_reads_what_the_process_loaded() -> None:
    code = "from fovea.worker.cpu_malloc import allocator_name; print(allocator_name())"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "glibc"
    tcmalloc = cpu_malloc.find_tcmalloc({})
    if tcmalloc is None:
        pytest.skip("no tcmalloc installed")
    env["LD_PRELOAD"] = tcmalloc
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "tcmalloc"


def test_a_missing_fovea_tcmalloc_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "nope.so")
    with caplog.at_level("WARNING", logger="fovea.worker.cpu_malloc"):
        assert cpu_malloc.find_tcmalloc({"FOVEA_TCMALLOC": missing}) is None
    assert caplog.messages == [
        f"FOVEA_TCMALLOC={missing} is not a file: the CPU worker keeps glibc malloc"
    ]
