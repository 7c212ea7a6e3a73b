"""Starting `launch_server` as a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces: fields after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def role_children(pid: int) -> list[int]:
    """The launcher's children that serve a role (not multiprocessing's resource tracker)."""
    return [
        p for p in child_pids(pid)
        if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
    ]  # fmt: skip


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """The pids still alive after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Server:
    def __init__(
        self,
        model_path: str | Path,
        *extra: str,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "fovea.launch_server",
            "--model-path", str(model_path), "--port", str(self.port), *extra,
        ]  # fmt: skip
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env
        )

    def wait_ready(self, timeout: float = 240.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {timeout} s: {self.log_tail()}")

    def openai_client(self) -> Any:
        """An `openai.OpenAI` client for this server (no retries: a failure shows at once)."""
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0)

    def log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def stats(self) -> dict[str, int]:
        r = httpx.get(self.base + "/get_server_info", timeout=10)
        r.raise_for_status()
        return r.json()["scheduler"]  # type: ignore[no-any-return]

    def wait_idle(self, timeout: float = 30.0) -> dict[str, int]:
        """Scheduler stats once nothing runs or waits (fails the test otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {s}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]
        return self.proc.returncode


def served(srv: Server) -> Iterator[Server]:
    """The body of a module-scoped server fixture (`yield from served(Server(...))`): the
    ready server, then a clean stop (exit status 0) asserted at teardown."""
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log_tail()
