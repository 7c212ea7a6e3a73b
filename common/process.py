"""What every child process does at start: logging, dying with its parent, reporting ready."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

import zmq

from fovea.common.ipc import Addresses, Sender
from fovea.common.messages import ProcessReady

_PR_SET_PDEATHSIG = 1


def setup_process(role: str, log_level: str) -> logging.Logger:
    """Configure logging as `role pid` lines and make the kernel kill this child with SIGKILL
    if the launcher dies, so no orphan outlives a crashed server."""
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
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
