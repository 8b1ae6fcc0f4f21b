"""sd_notify without libsystemd: tell systemd that a daemon is ready, busy or stopping."""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("vfmos.notify")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram of KEY=VALUE lines; False when not under systemd or when sending fails.

    Never raises: a daemon that cannot reach its supervisor keeps serving, systemd's
    start timeout is what reports the problem.
    """
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET=%r: not an absolute path or an @abstract name", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %r failed: %s", env["NOTIFY_SOCKET"], exc)
        return False
    return True


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())  # one line per variable in the protocol


def notify_ready(status: str = "", env: Mapping[str, str] | None = None) -> bool:
    """READY=1 with our pid, so NotifyAccess=main accepts it even from a wrapper-started python."""
    lines = ["READY=1"]
    if status:
        lines.append(_status_line(status))
    lines.append(f"MAINPID={os.getpid()}")
    return notify("\n".join(lines), env)


def notify_stopping(env: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", env)


def notify_status(text: str, env: Mapping[str, str] | None = None) -> bool:
    return notify(_status_line(text), env)


def notify_watchdog(env: Mapping[str, str] | None = None) -> bool:
    """Keep-alive ping; send it at about half of watchdog_interval()."""
    return notify("WATCHDOG=1", env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds systemd waits for a WATCHDOG=1 ping (WatchdogSec=); None when no watchdog is ours."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process (a parent that exec'd us is fine)
    return usec / 1_000_000 if usec > 0 else None
