"""What every process does at start: logging (text or JSON lines), and for children: dying with
the parent, reporting ready."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from typing import Any

import zmq

from fovea.common.ipc import Addresses, Sender
from fovea.common.messages import ProcessReady

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15  # the name ps, top and /proc/<pid>/comm show (15 bytes at most)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, role, pid, level, logger, message, plus the `fields`
    dict a record carries (`log.info(..., extra={"fields": {...}})`), for log shippers."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "role": self.role,
            "pid": record.process,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(role: str, level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every image fetch at INFO ("HTTP Request: GET ..."): one line per image is
    # noise at the default level; its warnings still show, and --log-level debug shows all.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def setup_process(role: str, log_level: str, log_format: str = "text") -> logging.Logger:
    """Configure logging as `role pid` lines and make the kernel kill this child with SIGKILL
    if the launcher dies, so no orphan outlives a crashed server."""
    configure_logging(role, log_level, log_format)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            libc.prctl(_PR_SET_NAME, f"fovea-{role}".encode()[:15])
        except OSError:
            pass
    # The launcher owns shutdown: a child leaves the terminal's process group, so Ctrl-C
    # reaches only the launcher, which then stops the children in order.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return logging.getLogger(f"fovea.{role}")


def report_ready(ctx: zmq.Context[Any], addrs: Addresses, role: str, **info: str) -> None:
    sender = Sender(ctx, addrs.launcher_in, bind=False)
    sender.send(ProcessReady(role=role, pid=os.getpid(), info=info))
    # LINGER is 0 on our sockets: let the message leave before the socket closes.
    sender.sock.close(linger=5000)
