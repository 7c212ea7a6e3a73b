"""How many compute threads a CPU worker runs.

torch's default is one per CPU. The worker shares the machine with the scheduler, tokenizer and
HTTP processes, which wake briefly every step; an OpenMP region waits for its slowest thread, so
a compute thread that loses its CPU to them stalls the whole region. On a 2-core box both
threads still win (a W1-like load: inter-token p50 about 0.7x of one thread's), as the front
end needs little CPU. From three CPUs on, one is left to the front end. Tensor-parallel ranks
on one machine share those CPUs: each takes its share (at least one), as ranks that
oversubscribe the CPUs spin in each other's OpenMP barriers (SmolLM2 at tp 3 on two CPUs, two
threads a rank: >1 s a token).

Also this CPU's feature flags (cpu_flags), which choose the dtype, the weight layouts and key the
compiled kernels' build.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (avx2, avx512f, avx512_bf16, ...); empty
    where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads(cpus: int, local_ranks: int = 1) -> int:
    compute = cpus if cpus <= 2 else cpus - 1
    return max(1, compute // local_ranks)


def set_cpu_threads(requested: int, local_ranks: int = 1) -> int:
    """Set torch's intra-op threads (requested, or auto when 0: this rank's share of the CPUs
    among the `local_ranks` worker ranks on this machine) and return the number."""
    n = requested or auto_threads(usable_cpus(), local_ranks)
    torch.set_num_threads(n)
    return n
