"""How many compute threads a CPU worker runs.

torch's default is one per CPU. The worker shares the machine with the scheduler, tokenizer and
HTTP processes, which wake briefly every step; an OpenMP region waits for its slowest thread, so
a compute thread that loses its CPU to them stalls the whole region. On a 2-core box both
threads still win (a W1-like load: inter-token p50 about 0.7x of one thread's), as the front
end needs little CPU. From three CPUs on, one is left to the front end. Tensor-parallel ranks
on one machine share those CPUs: each takes its share (at least one), as ranks that
oversubscribe the CPUs spin in each other's OpenMP barriers (SmolLM2 at tp 3 on two CPUs, two
threads a rank: >1 s a token).

Data-parallel replicas (--dp-size) on CPU each run on their own CPUs (replica_cpus): whole NUMA
nodes where there are at least as many nodes as replicas, else an equal contiguous share of
the CPUs in NUMA order; the auto thread count then applies to the replica's share.

Also this CPU's feature flags (cpu_flags), which choose the dtype, the weight layouts and key the
compiled kernels' build.
"""

from __future__ import annotations

import functools
import glob
import os
import re

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


def numa_nodes() -> list[list[int]]:
    """The CPUs of each NUMA node with CPUs, in node order, from sysfs; one node holding every
    CPU where sysfs has none."""
    nodes: list[tuple[int, list[int]]] = []
    for path in glob.glob("/sys/devices/system/node/node[0-9]*/cpulist"):
        try:
            with open(path) as f:
                cpus = parse_cpulist(f.read())
        except OSError:
            continue
        if cpus:
            node = re.search(r"node(\d+)/cpulist$", path)
            assert node is not None
            nodes.append((int(node.group(1)), cpus))
    if not nodes:
        return [list(range(os.cpu_count() or 1))]
    return [cpus for _, cpus in sorted(nodes)]


def parse_cpulist(text: str) -> list[int]:
    """A kernel cpulist ("0-3,8,10-11") as CPU ids."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def replica_cpus(usable: list[int], nodes: list[list[int]], dp_rank: int, dp_size: int) -> set[int]:
    """The CPUs replica `dp_rank` of `dp_size` runs on, out of the `usable` ones: the NUMA
    nodes i with i % dp_size == dp_rank when every replica gets a node of its own, else its
    contiguous share of the usable CPUs taken node by node (replicas share CPUs only when
    there are fewer CPUs than replicas)."""
    allowed = set(usable)
    per_node = [[c for c in node if c in allowed] for node in nodes]
    per_node = [n for n in per_node if n]
    if len(per_node) >= dp_size:
        return {c for i, n in enumerate(per_node) if i % dp_size == dp_rank for c in n}
    ordered = [c for n in per_node for c in n] or sorted(allowed)
    if len(ordered) < dp_size:
        return {ordered[dp_rank % len(ordered)]}
    lo = dp_rank * len(ordered) // dp_size
    hi = (dp_rank + 1) * len(ordered) // dp_size
    return set(ordered[lo:hi])
