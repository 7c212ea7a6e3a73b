"""The systemd notify protocol, spoken directly: one datagram per message to $NOTIFY_SOCKET
(a path, or an abstract socket when it starts with "@"). Without NOTIFY_SOCKET every call is a
no-op, so launch_server behaves the same outside systemd.

Messages used: STATUS=... while loading, READY=1 after every child is ready and a warm-up
generation succeeded, WATCHDOG=1 while the scheduler loop is alive (WatchdogSec= in the unit
sets $WATCHDOG_USEC), STOPPING=1 on shutdown.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("fovea.launcher")


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        addr = environ.get("NOTIFY_SOCKET", "")
        self.addr: str | None = None
        if addr.startswith("@"):
            self.addr = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.addr = addr
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # The watchdog is ours unless systemd named another pid.
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._sock: socket.socket | None = None

    @property
    def active(self) -> bool:
        return self.addr is not None

    def send(self, **fields: str | int) -> None:
        """notify(READY=1, STATUS="...") sends "READY=1\\nSTATUS=...". Errors are logged once
        per call, never raised: a lost status line must not take the server down."""
        if self.addr is None:
            return
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.addr)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.addr.replace("\0", "@"), e)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
