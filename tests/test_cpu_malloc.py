"""glibc's malloc in a CPU worker keeps freed blocks of a step's size instead of unmapping
them (checked in a fresh interpreter: the settings are process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
