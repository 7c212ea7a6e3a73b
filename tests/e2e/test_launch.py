"""The launch_server command: argument errors, supervision, shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_harness import Server, child_pids, role_children, wait_gone

from fovea.launcher.launch import renice


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fovea.launch_server", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_help_lists_flags() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in (
        "--model-path", "--host", "--port", "--tp-size", "--dtype", "--context-length",
        "--served-model-name", "--api-key", "--mem-fraction-static", "--chunked-prefill-size",
        "--max-running-requests", "--log-level", "--chat-template",
    ):  # fmt: skip
        assert flag in out.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model-path", "/nonexistent/model"], "/nonexistent/model"),
        (["--model-path", "x", "--tp-size", "0"], "--tp-size must be >= 1"),
        (["--model-path", "x", "--dtype", "int3"], "invalid choice"),
        (
            ["--model-path", "x", "--prefill-batch-tokens", "-1"],
            "--prefill-batch-tokens must be >= 0, got -1",
        ),
        ([], "--model-path is required"),
    ],
)
def test_bad_arguments_one_line_and_exit_2(args: list[str], needle: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert needle in last
    assert "Traceback" not in out.stderr


def test_config_without_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    out = run_cli("--model-path", str(tmp_path))
    assert out.returncode == 2
    assert "names no architectures" in out.stderr


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.monotonic()
    proc.wait(timeout)
    return time.monotonic() - t0


@pytest.mark.slow
def test_child_death_stops_server(tiny_llama: Path, tmp_path: Path) -> None:
    srv = Server(tiny_llama, log_path=tmp_path / "log").wait_ready()
    children = role_children(srv.proc.pid)
    assert len(children) == 4  # worker0, scheduler, tokenizer, http
    victim = children[1]
    import os

    os.kill(victim, signal.SIGKILL)
    elapsed = _wait_exit(srv.proc, 10)
    assert srv.proc.returncode == 1
    assert elapsed <= 5.0
    assert "exited with code -9" in srv.log_tail()
    assert wait_gone(children) == []


@pytest.mark.slow
def test_sigterm_stops_cleanly(tiny_llama: Path, tmp_path: Path) -> None:
    srv = Server(tiny_llama, log_path=tmp_path / "log").wait_ready()
    children = child_pids(srv.proc.pid)  # the resource tracker too: nothing may outlive it
    assert srv.stop() == 0
    assert wait_gone(children) == []


def _thread_nices(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_renice_reaches_every_thread() -> None:
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start()"
    proc = subprocess.Popen([sys.executable, "-c", code + "; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        renice(proc.pid, base + 3)
        assert _thread_nices(proc.pid) == {base + 3}
    finally:
        proc.kill()
        proc.wait()
    renice(proc.pid, 5)  # gone: nothing to do, no error


@pytest.mark.slow
def test_a_cpu_worker_sets_the_front_end_nice_and_the_prefill_batch(
    tiny_llama: Path, tmp_path: Path
) -> None:
    srv = Server(tiny_llama, log_path=tmp_path / "log").wait_ready()
    try:
        nices = {
            Path(f"/proc/{p}/comm").read_text().strip(): _thread_nices(p)
            for p in role_children(srv.proc.pid)
        }
    finally:
        srv.stop()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    front = max(base, 5)  # raising a process's nice needs no privilege; lowering it does
    assert nices == {
        "fovea-worker0": {base},
        "fovea-scheduler": {base},
        "fovea-tokenizer": {front},
        "fovea-http": {front},
    }
    # The scheduler's auto batch target comes from the device the worker reported.
    assert " prefill_batch=32 " in (tmp_path / "log").read_text()


@pytest.mark.slow
@pytest.mark.skipif("LD_PRELOAD" in os.environ, reason="the user's LD_PRELOAD is kept as it is")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds a stand-in library with gcc")
def test_only_a_cpu_worker_is_started_with_the_allocator(tiny_llama: Path, tmp_path: Path) -> None:
    # A stand-in for tcmalloc: a library that does nothing, so what is checked is only which
    # processes the launcher preloads it into.
    lib = tmp_path / "libstandin.so"
    (tmp_path / "standin.c").write_text("int fovea_standin(void) { return 7; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "standin.c")],
                   check=True)  # fmt: skip
    srv = Server(
        tiny_llama, "--device", "cpu", log_path=tmp_path / "log", env={"FOVEA_TCMALLOC": str(lib)}
    ).wait_ready()
    try:
        loaded = {
            Path(f"/proc/{p}/comm").read_text().strip(): str(lib)
            in Path(f"/proc/{p}/maps").read_text()
            for p in role_children(srv.proc.pid)
        }
    finally:
        srv.stop()
    assert loaded == {
        "fovea-worker0": True,
        "fovea-scheduler": False,
        "fovea-tokenizer": False,
        "fovea-http": False,
    }


@pytest.mark.slow
def test_api_key_required(tiny_llama: Path, tmp_path: Path) -> None:
    import httpx
    import openai

    srv = Server(tiny_llama, "--api-key", "sekret", log_path=tmp_path / "log").wait_ready()
    try:
        r = httpx.get(srv.base + "/v1/models")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        bad = httpx.get(srv.base + "/v1/models", headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="sekret", max_retries=0)
        r2 = client.chat.completions.create(
            model=str(tiny_llama), messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert (r2.usage.completion_tokens, r2.choices[0].finish_reason) == (2, "length")
    finally:
        assert srv.stop() == 0


def test_a_signal_whose_exception_was_swallowed_still_stops_the_launcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler's exception raised inside a C destructor is lost (pyzmq prints "Exception
    ignored"); the launcher's loops find the signal in the record and stop anyway."""
    from fovea.launcher import launch

    monkeypatch.setattr(launch, "_signalled", [])
    launch.raise_if_signalled()  # nothing received: no stop
    try:
        launch._raise_stop(signal.SIGTERM, None)
    except launch._Stop:
        pass  # the exception the destructor would swallow
    with pytest.raises(launch._Stop, match=r"^SIGTERM$"):
        launch.raise_if_signalled()
