"""Running as a service: the sd_notify protocol against a fake NOTIFY_SOCKET (READY only after a
warm-up generation, watchdog pings that stop while the scheduler is stuck, STOPPING), Prometheus
metrics with exact counts, one log line per request (text and JSON), the deploy unit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import Server, role_children

from fovea.launcher.sd_notify import Notifier

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


class FakeSystemd:
    """A NOTIFY_SOCKET datagram socket that collects what the service sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def drain(self, wait: float = 0.0) -> list[str]:
        """Messages received within `wait` s (and any already queued)."""
        deadline = time.monotonic() + wait
        out = []
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except (TimeoutError, BlockingIOError):
                if time.monotonic() >= deadline:
                    return out
                continue
            self.messages.append((time.monotonic(), data))
            out.append(data)

    def wait_for(self, line: str, timeout: float) -> list[str]:
        """Every message up to the one holding `line` (fails after `timeout` s)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.drain(0.2):
                seen.append(msg)
                if line in msg.split("\n"):
                    return seen
        raise AssertionError(f"no {line!r} in {timeout} s; got {seen}")


def test_notifier_formats_and_addresses(tmp_path: Path) -> None:
    fake = FakeSystemd(tmp_path / "notify")
    n = Notifier({"NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "3000000"})
    assert n.active and n.watchdog_s == 3.0
    n.send(READY=1, STATUS="serving x")
    assert fake.drain(0.5) == ["READY=1\nSTATUS=serving x"]
    assert Notifier({}).active is False
    n_abstract = Notifier({"NOTIFY_SOCKET": "@fovea-test-abstract"})
    assert n_abstract.addr == "\0fovea-test-abstract"
    # Another process owns the watchdog: not us.
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_s is None
    n.close()


@pytest.fixture(scope="module")
def notified(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, FakeSystemd]]:
    d = tmp_path_factory.mktemp("ops")
    fake = FakeSystemd(d / "notify")
    srv = Server(
        tiny_llama, "--enable-metrics", "--log-format", "json", "--max-total-tokens", "2000",
        "--served-model-name", "tiny", log_path=d / "server.log",
        env={"NOTIFY_SOCKET": str(fake.path), "WATCHDOG_USEC": "1500000"},
    )  # fmt: skip
    try:
        yield srv, fake
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def test_ready_only_after_warm_up_then_watchdog_then_stopping(
    notified: tuple[Server, FakeSystemd],
) -> None:
    srv, fake = notified
    before_ready = fake.wait_for("READY=1", timeout=240)
    statuses = [m for m in before_ready if m.startswith("STATUS=")]
    assert statuses[0] == "STATUS=starting 4 processes for tiny"
    assert "STATUS=warming up: one generation" in statuses
    assert before_ready[-1] == f"READY=1\nSTATUS=serving tiny at {srv.base}"
    # READY came after a real generation: the scheduler has computed one already.
    stats = srv.stats()
    assert stats["generated_tokens"] >= 1 and stats["prompt_tokens"] >= 1
    pings = [m for m in fake.drain(3.0) if m == "WATCHDOG=1"]
    assert len(pings) >= 3  # every 0.75 s while the scheduler loop is alive
    # A stuck scheduler (stopped) stops the pings; they resume when it runs again.
    sched = json_lines(srv, role="scheduler")[0]["pid"]
    assert sched in role_children(srv.proc.pid)
    os.kill(sched, signal.SIGSTOP)
    try:
        fake.drain(2.0)  # the last heartbeat ages past WATCHDOG_USEC
        assert "WATCHDOG=1" not in fake.drain(2.0)
    finally:
        os.kill(sched, signal.SIGCONT)
    assert "WATCHDOG=1" in fake.wait_for("WATCHDOG=1", timeout=5)


def json_lines(srv: Server, **match: object) -> list[dict[str, object]]:
    """The server's JSON log lines whose fields equal `match`."""
    assert srv.log_path is not None
    out = []
    for line in srv.log_path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if all(rec.get(k) == v for k, v in match.items()):
                out.append(rec)
    return out


def metric_values(srv: Server) -> dict[str, float]:
    """name{labels} -> value, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(srv.base + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_count_exactly_and_requests_log_one_line_each(
    notified: tuple[Server, FakeSystemd],
) -> None:
    srv, _ = notified
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    for _ in range(2):
        assert httpx.post(srv.base + "/generate", json=body, timeout=60).status_code == 200
    srv.wait_idle()
    time.sleep(1.5)  # the scheduler publishes its figures once a second
    m = metric_values(srv)
    # The warm-up (1 prompt token, 1 new token) and the two requests; the second hit 2 tokens.
    # The scheduler's figures carry its replica (dp_rank; one replica here).
    assert m['fovea:prompt_tokens_total{dp_rank="0"}'] == 1 + 3 + 3
    assert m['fovea:generation_tokens_total{dp_rank="0"}'] == 1 + 4 + 4
    assert m['fovea:cached_tokens_total{dp_rank="0"}'] == 2
    assert m['fovea:requests_total{finish_reason="length"}'] == 3
    assert m["fovea:time_to_first_token_seconds_count"] == 3
    assert m["fovea:e2e_request_latency_seconds_count"] == 3
    assert m["fovea:inter_token_latency_seconds_count"] == 3 + 3  # 3 gaps in each request
    # Steps: each request's prefill (the warm-up's too), then 3 decode steps each.
    assert m['fovea:step_forward_seconds_count{dp_rank="0",kind="prefill"}'] == 3
    assert m['fovea:step_forward_seconds_count{dp_rank="0",kind="decode"}'] == 3 + 3
    assert 0 < m['fovea:step_forward_seconds_sum{dp_rank="0",kind="decode"}'] < 60
    assert m['fovea:num_running_reqs{dp_rank="0"}'] == 0
    assert m['fovea:num_queue_reqs{dp_rank="0"}'] == 0
    assert m['fovea:token_usage{dp_rank="0"}'] == 0
    assert m['fovea:cache_hit_rate{dp_rank="0"}'] == pytest.approx(2 / 7)
    for role in ("scheduler", "tokenizer", "http", "worker0"):
        assert m[f'fovea:process_up{{role="{role}"}}'] == 1
    done = [r for r in json_lines(srv, role="http") if str(r["message"]).startswith("request done")]
    assert len(done) == 3
    last = done[-1]
    assert {k: last[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens")} == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cached_tokens": 2,
    }
    assert (last["images"], last["finish_reason"]) == (0, "length")
    assert isinstance(last["ttft_ms"], float) and last["total_ms"] >= last["ttft_ms"]
    assert "prompt" not in last  # only with --log-requests


def test_sigterm_sends_stopping_and_exits_0(notified: tuple[Server, FakeSystemd]) -> None:
    srv, fake = notified
    srv.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1\nSTATUS=stopping" in fake.wait_for("STOPPING=1", timeout=10)
    assert srv.proc.wait(30) == 0


def test_deploy_unit_and_env_file() -> None:
    from fovea.common.config import ENV_PREFIX, ServerArgs

    unit = (DEPLOY / "fovea.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "ProtectSystem=strict", "EnvironmentFile=/etc/fovea/fovea.env"):  # fmt: skip
        assert line in unit.splitlines(), line
    fields = {ENV_PREFIX + name.upper() for name in ServerArgs.__dataclass_fields__}
    env_lines = [
        ln.lstrip("# ").split("=", 1)[0]
        for ln in (DEPLOY / "fovea.env").read_text().splitlines()
        if "=" in ln and ln.lstrip("# ").startswith(ENV_PREFIX)
    ]
    assert env_lines and set(env_lines) <= fields
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(DEPLOY / "fovea.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # launch_server is not installed at /usr/local/bin here: that one complaint is expected.
    problems = [
        ln for ln in (r.stdout + r.stderr).splitlines()
        if ln.strip() and "launch_server" not in ln and "fovea.service" in ln
    ]  # fmt: skip
    assert problems == [], r.stdout + r.stderr
