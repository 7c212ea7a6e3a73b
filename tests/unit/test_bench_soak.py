"""bench/soak.py's memory windows, growth figure and image options (issue 26's W4 loop)."""

from __future__ import annotations

import os

import pytest

from fovea.bench import soak
from fovea.bench.image_server import parse_sizes


def test_windows_keep_each_process_peak_and_fill_late_starters() -> None:
    mem = soak.MemoryWindows(root=0, n=3)
    mib = 2**20
    mem.add_window([{"a": 10 * mib, "b": 4 * mib}, {"a": 12 * mib, "b": 2 * mib}])
    mem.add_window([{"a": 11 * mib, "c": 1 * mib}])  # b gone, c new
    mem.add_window([{"a": 13 * mib, "b": 5 * mib, "c": 3 * mib}])
    assert mem.total == [14.0, 12.0, 21.0]  # the largest sum of one sample, not of peaks
    assert mem.by_process == {
        "a": [12.0, 11.0, 13.0],
        "b": [4.0, 0.0, 5.0],
        "c": [0.0, 1.0, 3.0],
    }
    assert soak.growth(mem.by_process["a"]) == 0.0833
    assert soak.growth(mem.by_process["c"]) is None  # absent in the first window
    # Net of the encoder cache: 100 -> 130 MB with the cache 0 -> 20 MB is 100 -> 110.
    assert soak.growth([100.0, 120.0, 130.0], [0.0, 10.0, 20.0]) == 0.1


def test_sample_names_this_process_by_label_and_pid() -> None:
    sample = soak.MemoryWindows(os.getpid(), 2).sample()
    (name,) = [n for n in sample if n.endswith(f"[{os.getpid()}]")]
    assert sample[name] > 0


def test_w4_loop_options() -> None:
    args = soak.parse_args([
        "--model", "m", "--distinct-images", "0", "--image-size", "448x448,1024x768",
        "--image-format", "jpeg", "--exact-tokens", "--windows", "10",
    ])  # fmt: skip
    assert args.image_sizes == [(448, 448), (1024, 768)]
    assert (args.distinct_images, args.exact_tokens, args.windows) == (0, True, 10)
    assert parse_sizes("64X32") == [(64, 32)]
    for bad in (["--image-size", "448"], ["--image-size", "0x4"], ["--windows", "1"]):
        with pytest.raises(SystemExit) as e:
            soak.parse_args(["--model", "m", *bad])
        assert e.value.code == 2


def test_window_reads_do_not_wait_for_the_loads_connections() -> None:
    """Every one of the load's `concurrency` connections streams a 3 s response; the first
    window ends after 0.25 s, and its /get_server_info read must find both still streaming
    (it once shared their connection pool and waited for one to finish)."""
    import asyncio
    import socket
    import threading
    from collections.abc import AsyncIterator

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    streaming: list[int] = [0]
    seen_at_reads: list[int] = []

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            streaming[0] += 1
            try:
                await asyncio.sleep(3.0)
                yield 'data: {"choices": [{"finish_reason": "length"}]}\n\n'
                yield "data: [DONE]\n\n"
            finally:
                streaming[0] -= 1

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/get_server_info")
    async def info() -> dict[str, object]:
        seen_at_reads.append(streaming[0])
        idle = {"running": 0, "waiting": 0, "total_slots": 8, "free_slots": 8, "tree_slots": 0}
        return {"scheduler": {**idle, "image_cache_bytes": 0}}

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        args = soak.parse_args([
            "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--concurrency", "2",
            "--duration", "0.5", "--windows", "2", "--image-share", "0",
            "--server-pid", str(os.getpid()),
        ])  # fmt: skip
        out = soak.run(args)
    finally:
        server.should_exit = True
        thread.join(10)
    assert (out["completed"], out["errors"], out["kv_leak_slots"]) == (2, 0, 0)
    assert seen_at_reads[0] == 2
    assert out["image_cache_mb_windows"] == [0.0, 0.0]
