"""SIGTERM under load: new requests get 503, requests in flight finish (within
--shutdown-timeout), the launcher exits 0 and leaves no process behind."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_harness import Server, role_children, wait_gone

pytestmark = pytest.mark.slow

# Long enough that the queue (N_QUEUED requests, one running at a time) outlasts the checks
# made after SIGTERM on a fast CPU: 1,000 tokens of the tiny model take ~0.5 s or more.
N_TOKENS = 1000
N_QUEUED = 4


def stream_tokens(base: str, first: cf.Future[float]) -> tuple[int, str | None]:
    """One streaming completion; returns (chunks with text, finish_reason). Sets `first` when
    the first chunk arrives."""
    body = {
        "model": "tiny", "prompt": "The quick brown fox", "max_tokens": N_TOKENS,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    finish, usage = None, None
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not first.done():
                first.set_result(time.monotonic())
            for c in chunk.get("choices", []):
                finish = c.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return (usage or {}).get("completion_tokens", 0), finish


def first_chunk_of_any(firsts: list[cf.Future[float]]) -> None:
    """Waits until some request streams. Requests reach the scheduler in any order, so the
    first one submitted may be the last to run: waiting on it alone could leave only its own
    remaining tokens (~0.5 s) in flight at SIGTERM."""
    done, _ = cf.wait(firsts, timeout=60, return_when=cf.FIRST_COMPLETED)
    assert done


def test_sigterm_drains_in_flight_and_refuses_new(tiny_llama: Path, tmp_path: Path) -> None:
    srv = Server(
        tiny_llama, "--served-model-name", "tiny", "--max-running-requests", "1",
        "--shutdown-timeout", "60", log_path=tmp_path / "server.log",
    ).wait_ready()  # fmt: skip
    children = role_children(srv.proc.pid)
    with cf.ThreadPoolExecutor(N_QUEUED) as pool:
        firsts = [cf.Future() for _ in range(N_QUEUED)]  # type: ignore[var-annotated]
        futs = [pool.submit(stream_tokens, srv.base, f) for f in firsts]
        first_chunk_of_any(firsts)
        time.sleep(0.2)  # the others are queued behind it (one runs at a time)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal handled; three requests (~1.4 s here) still to run
        r = httpx.post(
            srv.base + "/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 2},
            timeout=10,
        )
        assert r.status_code == 503
        assert r.json()["error"]["message"] == (
            "the server is shutting down; retry on another replica"
        )
        assert httpx.get(srv.base + "/health", timeout=10).status_code == 503
        results = [f.result(timeout=120) for f in futs]
    assert results == [(N_TOKENS, "length")] * N_QUEUED
    assert srv.proc.wait(60) == 0
    assert wait_gone(children) == []
    assert srv.log_path is not None
    log = srv.log_path.read_text()
    assert "SIGTERM: draining" in log and "Traceback" not in log


def test_drain_gives_up_after_the_timeout(tiny_llama: Path, tmp_path: Path) -> None:
    srv = Server(
        tiny_llama, "--served-model-name", "tiny", "--max-running-requests", "1",
        "--shutdown-timeout", "0.2", log_path=tmp_path / "server.log",
    ).wait_ready()  # fmt: skip
    with cf.ThreadPoolExecutor(N_QUEUED) as pool:
        firsts = [cf.Future() for _ in range(N_QUEUED)]  # type: ignore[var-annotated]
        futs = [pool.submit(stream_tokens, srv.base, f) for f in firsts]
        first_chunk_of_any(firsts)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15
        for f in futs:
            try:
                f.result(timeout=30)
            except Exception:
                pass  # cut off: the point is that shutdown did not wait for them
    assert srv.log_path is not None
    log = srv.log_path.read_text()
    assert "still in flight after 0.2 s: ending them" in log
    assert "Traceback" not in log
