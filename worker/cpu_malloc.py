"""The CPU worker's allocator: tcmalloc preloaded where it is installed, else glibc malloc set to
keep freed activation memory for the next step.

tcmalloc: the launcher starts a worker that will compute on CPU with tcmalloc in LD_PRELOAD
(as vLLM's CPU build does), unless the user set LD_PRELOAD ($FOVEA_TCMALLOC names a library
elsewhere; set empty, it keeps glibc): 5-7% faster model steps. The other processes keep glibc.

glibc: a step's activations are megabytes; above glibc's mmap threshold they are fresh mappings
unmapped when freed (and the heap top is trimmed), so each step would page-fault them in again.
With both thresholds raised, freed blocks stay in the heap, as fast as tcmalloc. Resident memory
grows by at most the largest step's activations, which the next step of that size needs again.
Only glibc is tuned; with another allocator preloaded the calls change nothing.
Measurements: docs/cpu.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


TCMALLOC_GLOBS = (  # Debian/Ubuntu (libtcmalloc-minimal4, libgoogle-perftools4), RHEL
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc*.so*",
)


def find_tcmalloc(environ: Mapping[str, str] = os.environ) -> str | None:
    """$FOVEA_TCMALLOC if set (a library elsewhere, e.g. conda's; empty: none), else the first
    of TCMALLOC_GLOBS installed."""
    if "FOVEA_TCMALLOC" in environ:
        path = environ["FOVEA_TCMALLOC"]
        if path and not os.path.isfile(path):
            log.warning("FOVEA_TCMALLOC=%s is not a file: the CPU worker keeps glibc malloc", path)
            return None
        return path or None
    for pattern in TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


NVIDIA_CONTROL_NODE = "/dev/nvidiactl"  # present wherever the NVIDIA driver can serve CUDA


def computes_on_cpu(device: str, environ: Mapping[str, str]) -> bool:
    """Whether a worker given `--device device` will compute on CPU, decided without importing
    torch (the launcher's start-up): CUDA needs the NVIDIA device nodes, and an empty
    CUDA_VISIBLE_DEVICES hides every GPU. A wrong guess only costs the allocator's speed."""
    if device != "auto":
        return device == "cpu"
    if environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return True
    return not os.path.exists(NVIDIA_CONTROL_NODE)


def worker_preload(device: str, environ: Mapping[str, str]) -> str | None:
    """The LD_PRELOAD to start a worker with: tcmalloc for a CPU worker where it is installed;
    None where the user set LD_PRELOAD (theirs is kept as it is) or for a GPU worker."""
    if "LD_PRELOAD" in environ or not computes_on_cpu(device, environ):
        return None
    return find_tcmalloc(environ)


def allocator_name() -> str:
    """"tcmalloc" when this process has it loaded, else "glibc" (for the start-up log line)."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "libtcmalloc" in f.read() else "glibc"
    except OSError:
        return "glibc"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process; False where there is no
    glibc mallopt (macOS, musl) or it refused."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        log.info("malloc: glibc refused the mmap/trim thresholds; left as they were")
    return ok
