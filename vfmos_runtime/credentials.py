"""The client side of the local credentials handshake: trade this process's uid for a ticket.

The kernel listens on `<kernel socket>.cred`; on connect it reads the peer's uid with
SO_PEERCRED, writes one msgpack map {"ticket", "tenant", "uid", "admin"} and closes. The
ticket goes with every call as TICKET_HEADER metadata; after a kernel restart calls answer
UNAUTHENTICATED and the client fetches a new one.
"""

from __future__ import annotations

import socket
from pathlib import Path

import msgpack

from vfmos_runtime.errors import Unavailable
from vfmos_runtime.paths import credentials_socket


def fetch_ticket(kernel_sock: Path, timeout: float = 5.0) -> str:
    path = credentials_socket(kernel_sock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except FileNotFoundError:
        raise Unavailable(f"vfmd is not running (no socket at {kernel_sock}); "
                          f"start it with 'vfmctl up'") from None
    except OSError as exc:
        raise Unavailable(f"cannot reach vfmd at {kernel_sock}: {exc}") from None
    try:
        return msgpack.unpackb(data)["ticket"]
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as exc:
        raise Unavailable(f"vfmd at {kernel_sock} sent a malformed ticket: {exc}") from None
