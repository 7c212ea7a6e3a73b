"""`launch_server`: start every process, wait until each is ready, serve, supervise, shut down.

Children (spawned, each its own OS process): worker ranks, scheduler, tokenizer service and,
for launch_server, the HTTP server; with --dp-size N, N replicas (a scheduler and its worker
ranks each, roles `scheduler-dp<d>`, `worker<r>-dp<d>`) behind the one tokenizer and HTTP
server. If any child dies, everything is stopped and the launcher
exits non-zero (so systemd or Kubernetes restarts it) instead of hanging; SIGTERM and SIGINT
stop the children in order and exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from fovea.common import metrics as fovea_metrics
from fovea.common.config import ServerArgs, parse_args
from fovea.common.ipc import Addresses, Receiver
from fovea.common.messages import Heartbeat, ProcessReady, ToLauncher
from fovea.common.model_config import (
    ModelConfigError,
    ModelInfo,
    read_model_info,
    tp_size_problem,
)
from fovea.common.process import configure_logging
from fovea.launcher.sd_notify import Notifier
from fovea.worker.cpu_malloc import worker_preload

log = logging.getLogger("fovea.launcher")

# Children stopped first go first: nothing new enters while the backend winds down.
_STOP_ORDER = ("http", "tokenizer", "scheduler", "worker")


# Niceness of the HTTP and tokenizer processes (every thread) once a worker reports that it
# computes on this machine's CPUs: their bursts preempt compute threads, and an OpenMP region
# waits for its slowest thread (measured: docs/cpu.md). The scheduler keeps nice 0: the worker
# waits for its plans.
FRONTEND_NICE_ON_CPU = 5
_FRONTEND = ("http", "tokenizer")


class ChildDied(RuntimeError):
    pass


def renice(pid: int, nice: int) -> None:
    """Every thread of process `pid` to niceness `nice` (threads it starts later inherit it).
    Linux only; a no-op where /proc is missing or the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError:  # the thread ended meanwhile
            pass


def _run_http(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    from fovea.server.main import run_http_server

    run_http_server(args, addrs, model)


def _run_tokenizer(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    from fovea.tokenizer_service.main import run_tokenizer_service

    run_tokenizer_service(args, addrs, model)


def _run_scheduler(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    from fovea.scheduler.main import run_scheduler

    run_scheduler(args, addrs, model)


def _run_worker(args: ServerArgs, addrs: Addresses, model: ModelInfo, rank: int) -> None:
    from fovea.worker.main import run_worker

    run_worker(args, addrs, model, rank)


class ProcessGroup:
    """The children of one server (or one offline Engine) and their supervision."""

    def __init__(self, args: ServerArgs, model: ModelInfo, with_http: bool) -> None:
        self.args = args
        self.model = model
        self.addrs = Addresses.local(args.dp_size)
        if args.nnodes > 1:
            assert args.dist_init_addr is not None  # check_args
            host, _, port = args.dist_init_addr.rpartition(":")
            self.addrs = self.addrs.across_nodes(host.strip("[]"), int(port))
        self.with_http = with_http
        self.procs: dict[str, BaseProcess] = {}
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._ready_in: Receiver[ToLauncher] = Receiver(
            self._ctx, self.addrs.launcher_in, ToLauncher, bind=True
        )
        self.last_heartbeat = time.monotonic()  # the scheduler loop's last sign of life

    def start(self) -> None:
        if self.args.enable_metrics:
            # Children inherit this: each writes its samples under it (see common/metrics.py).
            base = self.addrs.ipc_dir or tempfile.mkdtemp(prefix="fovea-")
            os.environ[fovea_metrics.ENV_DIR] = os.path.join(base, "metrics")
            os.makedirs(os.environ[fovea_metrics.ENV_DIR], exist_ok=True)
        spawn = mp.get_context("spawn")
        common = (self.args, self.addrs, self.model)
        targets: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = []
        for d in range(self.args.dp_size):
            replica = (self.args, self.addrs.replica(d), self.model)
            targets += [
                (replica[1].role(f"worker{r}"), _run_worker, (*replica, r))
                for r in self.local_ranks
            ]
            if self.args.node_rank == 0:
                targets.append((replica[1].role("scheduler"), _run_scheduler, replica))
        if self.args.node_rank == 0:
            targets.append(("tokenizer", _run_tokenizer, common))
            if self.with_http:
                targets.append(("http", _run_http, common))
        # A spawned child inherits this process's environment as it is at start().
        preload = worker_preload(self.args.device, os.environ)
        for role, fn, fn_args in targets:
            proc = spawn.Process(target=fn, args=fn_args, name=f"fovea-{role}")
            if preload and role.startswith("worker"):
                os.environ["LD_PRELOAD"] = preload
                try:
                    proc.start()
                finally:
                    del os.environ["LD_PRELOAD"]
            else:
                proc.start()
            self.procs[role] = proc

    @property
    def local_ranks(self) -> range:
        """The tensor-parallel ranks whose workers run on this node."""
        per_node = self.args.tp_size // self.args.nnodes
        return range(self.args.node_rank * per_node, (self.args.node_rank + 1) * per_node)

    def wait_ready(
        self,
        timeout: float | None = None,
        on_ready: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        """Return once every child reported ready (on_ready(role, still pending) after each);
        raise ChildDied if one exits first."""
        pending = set(self.procs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            msg = self._ready_in.recv(timeout_ms=200)
            if isinstance(msg, ProcessReady):
                pending.discard(msg.role)
                log.info("%s ready (pid %d)", msg.role, msg.pid)
                if msg.role.startswith("worker") and msg.info.get("device") == "cpu":
                    for role in _FRONTEND:
                        proc = self.procs.get(role)
                        if proc is not None and proc.pid is not None:
                            renice(proc.pid, FRONTEND_NICE_ON_CPU)
                if on_ready is not None:
                    on_ready(msg.role, sorted(pending))
            self.check_alive()
            raise_if_signalled()
            if deadline is not None and time.monotonic() > deadline:
                raise ChildDied(f"not ready after {timeout:.0f} s: {', '.join(sorted(pending))}")

    def check_alive(self) -> None:
        for role, proc in self.procs.items():
            if not proc.is_alive():
                raise ChildDied(f"{role} (pid {proc.pid}) exited with code {proc.exitcode}")

    def wait_any_exit(self, timeout: float) -> None:
        """Block up to `timeout` s; raise ChildDied if a child exited meanwhile. Takes in the
        heartbeats that arrived (`last_heartbeat`)."""
        sentinels = [p.sentinel for p in self.procs.values()]
        if multiprocessing.connection.wait(sentinels, timeout):
            self.check_alive()
        if any(isinstance(m, Heartbeat) for m in self._ready_in.recv_all()):
            self.last_heartbeat = time.monotonic()
        raise_if_signalled()

    def stop(self, grace: float = 5.0, http_grace: float | None = None) -> None:
        """SIGTERM each kind in order, SIGKILL what is left after `grace` s (`http_grace` for
        the HTTP server, which drains requests in flight first)."""
        for kind in _STOP_ORDER:
            group = [p for role, p in self.procs.items() if role.startswith(kind)]
            for p in group:
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGTERM)
            wait = http_grace if kind == "http" and http_grace is not None else grace
            deadline = time.monotonic() + wait
            for p in group:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    log.warning("%s did not stop in %.0f s: killing it", p.name, wait)
                    p.kill()
                    p.join(1.0)
        self._ready_in.close()
        self._ctx.term()
        if self.addrs.ipc_dir:
            shutil.rmtree(self.addrs.ipc_dir, ignore_errors=True)


def prepare(args: ServerArgs) -> tuple[ServerArgs, ModelInfo]:
    """Resolve the model and tokenizer paths (a built-in alias, a hub id) to local directories,
    which the children read, read the model's config, and resolve --tool-call-parser. Raises ValueError subclasses with
    one-line messages."""
    from fovea.launcher.builtin_models import resolve_model_path
    from fovea.launcher.model_source import TOKENIZER
    from fovea.worker.models.registry import check_architecture

    path = resolve_model_path(args.model_path, args.revision, args.download_dir)
    tokenizer = args.tokenizer_path
    if tokenizer == args.model_path:
        tokenizer = path
    elif tokenizer is not None:  # --revision is the model's
        tokenizer = resolve_model_path(tokenizer, None, args.download_dir, TOKENIZER)
    model = read_model_info(path, args.context_length)
    check_architecture(model.architecture)
    with open(os.path.join(path, "config.json")) as f:
        problem = tp_size_problem(json.load(f), args.tp_size)
    if problem:
        raise ValueError(problem)
    served = args.served_model_name or args.model_path
    resolved = dataclasses.replace(
        args,
        model_path=path,
        tokenizer_path=tokenizer,
        served_model_name=served,
        tool_call_parser=resolve_tool_call_parser(args, tokenizer or path),
    )
    return resolved, model


def resolve_tool_call_parser(args: ServerArgs, tokenizer_dir: str) -> str:
    """--tool-call-parser as the HTTP server needs it: a format, or "none". auto reads the chat
    template the tokenizer service will render with (a bad --chat-template is that service's
    start-up error to report, so here it only means "none")."""
    from fovea.server.tool_calls.formats import detect_format
    from fovea.tokenizer_service.chat_templates import ChatTemplateError, template_text

    if args.tool_call_parser != "auto":
        return args.tool_call_parser
    try:
        template = template_text(args.chat_template, tokenizer_dir)
    except ChatTemplateError:
        template = None
    return detect_format(template) or "none"


class _Stop(Exception):
    pass


# Signals received, by name. An exception raised by a signal handler is lost when the signal
# lands inside a C extension's destructor (pyzmq's Frame.__dealloc__ prints "Exception ignored"
# and goes on), so the waiting loops also check this list (raise_if_signalled).
_signalled: list[str] = []


def _raise_stop(signum: int, frame: object) -> None:
    _signalled.append(signal.Signals(signum).name)
    raise _Stop(_signalled[-1])


def raise_if_signalled() -> None:
    if _signalled:
        raise _Stop(_signalled[-1])


def local_url(args: ServerArgs) -> str:
    """The server's URL as this machine reaches it (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    return f"http://[{host}]:{args.port}" if ":" in host else f"http://{host}:{args.port}"


def warm_up(args: ServerArgs, timeout: float = 300.0) -> None:
    """One generation through the HTTP server (GET /health_generate), retried until the port
    listens. Raises RuntimeError if it does not succeed in `timeout` s."""
    import httpx

    url = local_url(args) + "/health_generate"
    # /health_generate is behind the API key like every route but /health.
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(
                url,
                headers=headers,
                timeout=max(1.0, deadline - time.monotonic()),
                trust_env=False,
            )
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        raise_if_signalled()
        time.sleep(0.2)
    raise RuntimeError(f"warm-up generation failed: {last}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("launcher", args.log_level, args.log_format)
    try:
        args, model = prepare(args)
    except (ValueError, ModelConfigError) as e:
        print(f"launch_server: error: {e}", file=sys.stderr)
        sys.exit(2)
    group = ProcessGroup(args, model, with_http=True)
    log.info(
        "role=launcher pid=%d model=%s ipc=%s", os.getpid(), args.model_path, group.addrs.ipc_dir
    )
    notify = Notifier()
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    code = 0
    drain_s: float | None = None  # a clean stop lets the HTTP server drain first
    try:
        n = (len(group.local_ranks) + (args.node_rank == 0)) * args.dp_size
        n += 2 if args.node_rank == 0 else 0
        notify.send(STATUS=f"starting {n} processes for {args.model_name}")
        group.start()

        def on_ready(role: str, pending: list[str]) -> None:
            notify.send(STATUS=f"{role} ready; waiting for {', '.join(pending) or 'nothing'}")
            set_up(role, 1)

        group.wait_ready(on_ready=on_ready)
        if args.node_rank > 0:
            ranks = f"{group.local_ranks.start}..{group.local_ranks.stop - 1}"
            log.info("node %d ready: worker ranks %s joined %s", args.node_rank, ranks,
                     args.dist_init_addr)  # fmt: skip
            notify.send(READY=1, STATUS=f"worker ranks {ranks} of {args.model_name}")
            while True:  # no scheduler here: supervise the workers only
                group.wait_any_exit(1.0)
        notify.send(STATUS="warming up: one generation")
        warm_up(args)
        url = local_url(args)
        log.info("ready: serving %s at %s (OpenAI API at %s/v1)", args.model_name, url, url)
        notify.send(READY=1, STATUS=f"serving {args.model_name} at {url}")
        group.last_heartbeat = time.monotonic()
        beat = min(1.0, notify.watchdog_s / 2) if notify.watchdog_s else 1.0
        while True:
            group.wait_any_exit(beat)
            # A stuck scheduler stops its heartbeats, then our pings, then systemd restarts us.
            if notify.watchdog_s and time.monotonic() - group.last_heartbeat < notify.watchdog_s:
                notify.send(WATCHDOG=1)
    except _Stop as e:
        log.info("received %s: shutting down", e)
        drain_s = args.shutdown_timeout + 5.0
    except ChildDied as e:
        log.error("child died: %s; stopping the server", e)
        code = 1
    except RuntimeError as e:
        log.error("%s; stopping the server", e)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        notify.send(STOPPING=1, STATUS="stopping")
        for role in group.procs:
            set_up(role, 0)
        group.stop(http_grace=drain_s)
        notify.close()
    sys.exit(code)


def set_up(role: str, value: int) -> None:
    m = fovea_metrics.get()
    if m is not None:
        m.process_up.labels(role).set(value)


if __name__ == "__main__":
    main()
