"""Faults and load: a dead child of any kind takes the server down fast and names it; a soak of
concurrent streaming requests (text and images) loses nothing and leaks no KV slot; a client
gone mid-prefill frees its slots; a KV cache far too small still completes every request that
can fit and refuses, clearly, the one that never can."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_harness import Server, role_children, wait_gone

pytestmark = pytest.mark.slow


def role_pid(srv: Server, role: str) -> int:
    assert srv.log_path is not None
    for line in srv.log_path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("role") == role and str(rec.get("message", "")).startswith("role="):
                return int(rec["pid"])
    raise AssertionError(f"no start line of {role}")


@pytest.mark.parametrize("role", ["worker0", "scheduler", "tokenizer", "http"])
def test_killing_any_child_stops_the_server_naming_it(
    tiny_llama: Path, tmp_path: Path, role: str
) -> None:
    srv = Server(tiny_llama, "--log-format", "json", log_path=tmp_path / "log").wait_ready()
    children = role_children(srv.proc.pid)
    victim = role_pid(srv, role)
    assert victim in children
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    assert srv.proc.wait(10) == 1
    assert time.monotonic() - t0 <= 5.0
    assert f"child died: {role} (pid {victim}) exited with code -9" in srv.log_tail()
    assert wait_gone(children) == []


def test_soak_ci_sized(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    from fovea.bench.soak import parse_args, run

    srv = Server(
        tiny_qwen2_vl, "--chat-template", "qwen2-vl", "--allow-private-media-urls",
        "--served-model-name", "tiny-vl", "--max-total-tokens", "6000",
        log_path=tmp_path / "log",
    ).wait_ready()  # fmt: skip
    try:
        args: argparse.Namespace = parse_args([
            "--base-url", srv.base, "--model", "tiny-vl", "--concurrency", "32",
            "--duration", "10", "--max-tokens", "16", "--image-share", "0.3",
            "--distinct-images", "6", "--server-pid", str(srv.proc.pid),
        ])  # fmt: skip
        out = run(args)
        assert out["errors"] == 0, out["first_errors"]
        assert out["incomplete"] == 0 and out["completed"] >= 32
        assert out["idle"] and out["kv_leak_slots"] == 0
        assert len(out["rss_windows_mb"]) == 6
        cache = out["image_cache_mb_windows"]  # six small images: the cache never evicts
        assert len(cache) == 6 and cache == sorted(cache) and cache[-1] > 0
        (worker,) = [p for p in out["processes"] if "worker" in p["name"]]
        assert worker["growth_net_of_image_cache"] is not None
        roles = {p["name"].split(" [")[0] for p in out["processes"]}
        assert {"fovea-scheduler", "fovea-tokenizer"} <= roles, roles
    finally:
        assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def small_kv(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    log = tmp_path_factory.mktemp("small") / "log"
    srv = Server(
        tiny_llama, "--max-total-tokens", "400", "--chunked-prefill-size", "32",
        "--served-model-name", "tiny", log_path=log,
    ).wait_ready()  # fmt: skip
    yield srv  # type: ignore[misc]
    assert srv.stop() == 0, srv.log_tail()


def test_client_gone_mid_prefill_frees_its_slots(small_kv: Server) -> None:
    before = small_kv.wait_idle()
    # 300 prompt tokens in chunks of 32, then 50 more: 60 steps, 48-62 ms on the 2-vCPU test
    # machine (ignore_eos: an early EOS ended some in 37 ms, before the client gave up at the
    # 50 ms it had here). The client leaves after 20 ms, in the prefill or just after it.
    body = {"input_ids": [7] * 300, "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_kv.base + "/generate", json=body, timeout=0.02)
    after = small_kv.wait_idle()
    assert after["free_slots"] + after["tree_slots"] == after["total_slots"]
    assert after["generated_tokens"] - before["generated_tokens"] < 50  # aborted, not finished


def test_kv_exhaustion_retracts_and_completes_or_refuses(small_kv: Server) -> None:
    def gen(prompt: list[int], n: int) -> httpx.Response:
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": n, "ignore_eos": True}}
        return httpx.post(small_kv.base + "/generate", json=body, timeout=120)

    # Six requests of 60 + 60 tokens each: 720 slots wanted of 400, so some must retract.
    retractions = small_kv.wait_idle()["retractions"]
    prompts = [[10 + i] * 60 for i in range(6)]
    with cf.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda p: gen(p, 60), prompts))
    for r in outs:
        assert r.status_code == 200
        assert r.json()["meta_info"]["completion_tokens"] == 60
    assert small_kv.wait_idle()["retractions"] > retractions
    # One that can never fit: a clear 400, and the server goes on.
    r = gen([5] * 350, 100)
    assert r.status_code == 400
    assert "needs 450 KV slots" in r.json()["error"]["message"]
    assert gen([5, 6], 3).status_code == 200
    s = small_kv.wait_idle()
    assert s["free_slots"] + s["tree_slots"] == s["total_slots"]
