"""Resident memory of a process tree, read from /proc (Linux only; no psutil needed).

`MemorySampler(pid)` samples the tree rooted at `pid` every `interval_s` in a thread and keeps,
per sample, the summed RSS; `peak()` gives the largest sum and each process's largest RSS,
labelled by its command line, so "scheduler ≤ 250 MB" can be read off directly.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def label(pid: int) -> str:
    """The process name (Fovea's children name themselves fovea-<role>), or for a Python
    process the script or module it runs."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return str(pid)
    if comm.startswith("python") and len(argv) > 1:
        rest = argv[2] if argv[1] in ("-m", "-c") and len(argv) > 2 else argv[1]
        return f"{comm} {os.path.basename(rest)}"[:60]
    return comm


@dataclass
class MemorySampler:
    root: int
    interval_s: float = 0.5
    peak_total: int = 0
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        total = 0
        for pid in tree_pids(self.root):
            rss = rss_bytes(pid)
            total += rss
            if rss > self.peak_by_pid.get(pid, 0):
                self.peak_by_pid[pid] = rss
                self.labels.setdefault(pid, label(pid))
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def report(self) -> dict[str, object]:
        """{"peak_total_mb": ..., "processes": [{"pid", "name", "peak_mb"}, ...] biggest first}."""
        procs = sorted(self.peak_by_pid.items(), key=lambda kv: -kv[1])
        return {
            "peak_total_mb": round(self.peak_total / 2**20, 1),
            "processes": [
                {"pid": pid, "name": self.labels.get(pid, ""), "peak_mb": round(rss / 2**20, 1)}
                for pid, rss in procs
            ],
        }
