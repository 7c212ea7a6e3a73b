"""Tensor parallelism through launch_server: tp=2 across two "nodes" on loopback gives
transformers' greedy tokens and goes down when the other node dies; the real SmolLM2 at tp=3
gives tp=1's tokens; a size that cannot split the model is refused naming the valid ones; a VLM
at tp=2 gives transformers' answer for an image."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_harness import Server, free_port
from vision_helpers import SYSTEM, ImageHost, Reference

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 99, 300, 42, 7, 8, 250, 11]


def free_port_run(n: int = 3) -> int:
    """A port p with p .. p + n - 1 all free."""
    for _ in range(50):
        p = free_port()
        try:
            socks = []
            for q in range(p, p + n):
                s = socket.socket()
                s.bind(("127.0.0.1", q))
                socks.append(s)
            for s in socks:
                s.close()
            return p
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free port run")


def greedy_ids(base: str, ids: list[int], n: int = 32) -> list[int]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0,
                                                  "ignore_eos": True}}  # fmt: skip
    r = httpx.post(base + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return list(r.json()["output_ids"])


def hf_greedy(path: Path, ids: list[int], n: int = 32) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return [int(t) for t in out[0, len(ids) :]]


def test_two_nodes_on_loopback(tiny_llama: Path, tmp_path: Path) -> None:
    port = free_port_run()
    common = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{port}"]
    node1_log = open(tmp_path / "node1.log", "wb")
    node1 = subprocess.Popen(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", str(tiny_llama),
         *common, "--node-rank", "1"],
        stdout=node1_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    node0 = Server(tiny_llama, *common, "--node-rank", "0", log_path=tmp_path / "node0.log")
    try:
        node0.wait_ready()
        assert greedy_ids(node0.base, PROMPT) == hf_greedy(tiny_llama, PROMPT)
        assert "node 1 ready: worker ranks 1..1 joined" in (tmp_path / "node1.log").read_text()
        # Node 1 dies whole: node 0 notices unanswered keep-alives and exits non-zero.
        node1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert node0.proc.wait(30) == 1
        assert time.monotonic() - t0 < 10
        assert "worker rank 1 answered none of the last" in node0.log_tail()
    finally:
        for p in (node0.proc, node1):
            if p.poll() is None:
                p.kill()
                p.wait()
        node1_log.close()


def test_node_without_scheduler_exits_when_node0_goes(tiny_llama: Path, tmp_path: Path) -> None:
    """The other direction: node 0 killed, node 1's worker leaves after its silence limit."""
    from fovea.worker import main as worker_main

    assert worker_main.SILENCE_S == 30  # what the exit below waits for, at most
    port = free_port_run()
    common = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{port}"]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", str(tiny_llama),
         *common, "--node-rank", "1"],
        stdout=open(tmp_path / "node1.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    node0 = Server(tiny_llama, *common, "--node-rank", "0", log_path=tmp_path / "node0.log")
    try:
        node0.wait_ready()
        node0.proc.send_signal(signal.SIGKILL)  # its children follow (PDEATHSIG)
        assert node1.wait(60) == 1
        assert "no word from the scheduler" in (tmp_path / "node1.log").read_text()
    finally:
        for p in (node0.proc, node1):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_tp_size_that_cannot_split_is_refused(tiny_llama: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", str(tiny_llama),
         "--tp-size", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "launch_server: error: --tp-size 3 cannot split this model (4 attention heads, 2 KV "
        "heads, MLP width 256); valid sizes: 1, 2, 4"
    )


def test_smollm2_tp3_equals_tp1(tmp_path: Path) -> None:
    prompts = [[1, 4093, 28, 253, 3575, 282, 4649, 47], [504, 2365, 5336], [29, 30, 31, 32] * 8]
    outs = {}
    for tp in (1, 3):
        srv = Server("SmolLM2-135M-Instruct", "--dtype", "float32", "--tp-size", str(tp),
                     "--max-total-tokens", "4096", log_path=tmp_path / f"tp{tp}.log")  # fmt: skip
        try:
            srv.wait_ready()
            outs[tp] = [greedy_ids(srv.base, p) for p in prompts]
        finally:
            assert srv.stop() == 0, srv.log_tail()
    assert outs[3] == outs[1]


def test_qwen2_vl_tp2_image_answer(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    import openai

    ref = Reference(tiny_qwen2_vl)
    host = ImageHost()
    srv = Server(tiny_qwen2_vl, "--tp-size", "2", "--chat-template", "qwen2-vl",
                 "--allow-private-media-urls", "--served-model-name", "vl",
                 log_path=tmp_path / "log")  # fmt: skip
    try:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0)
        msgs = [SYSTEM, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": host.url("cat")}},
            {"type": "text", "text": "What?"}]}]  # fmt: skip
        r = client.chat.completions.create(
            model="vl",
            messages=msgs,
            max_tokens=32,
            temperature=0,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )
        assert r.choices[0].message.content == ref.tok.decode(
            ref.greedy(msgs), skip_special_tokens=True
        )
    finally:
        host.httpd.shutdown()
        assert srv.stop() == 0, srv.log_tail()
