"""Where VFMOS keeps its sockets and data: one resolution rule for every client and daemon."""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_SOCKET = "vfmd.sock"
MODEL_SOCKET = "modeld.sock"
DATA_SOCKET = "datad.sock"
SYSTEM_SOCKET = Path("/run/vfmos") / KERNEL_SOCKET


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    """Runtime dir for sockets and pid files: /run/vfmos for root, else per user."""
    env = os.environ if env is None else env
    if env.get("VFM_STATE_DIR"):
        return Path(env["VFM_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/run/vfmos")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "vfmos"
    return Path.home() / ".local" / "state" / "vfmos"


def default_data_dir(state_dir: Path | None, env: dict[str, str] | None = None) -> Path:
    """Durable dir for LMDB: the state dir when one was named, else a per-host default.

    An explicit state dir keeps everything together (tests, `vfmctl up --state-dir`);
    the default runtime dir may be a tmpfs, so data then goes where it survives a reboot.
    """
    env = os.environ if env is None else env
    if env.get("VFM_DATA_DIR"):
        return Path(env["VFM_DATA_DIR"])
    if state_dir is not None:
        return Path(state_dir)
    if os.geteuid() == 0:
        return Path("/var/lib/vfmos")
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vfmos"


def cache_root(env: dict[str, str] | None = None) -> Path:
    """Converted models and other rebuildable files: $VFM_CACHE_DIR, else the XDG cache."""
    env = os.environ if env is None else env
    if env.get("VFM_CACHE_DIR"):
        return Path(env["VFM_CACHE_DIR"])
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vfmos"


def kernel_socket(socket: str | None = None, env: dict[str, str] | None = None) -> Path:
    """The kernel socket: --socket, else $VFM_SOCKET, else the state dir's vfmd.sock."""
    env = os.environ if env is None else env
    if socket:
        return Path(socket)
    if env.get("VFM_SOCKET"):
        return Path(env["VFM_SOCKET"])
    own = default_state_dir(env) / KERNEL_SOCKET
    # A user with no kernel of their own talks to the host service, if there is one.
    if not env.get("VFM_STATE_DIR") and not own.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return own


def credentials_socket(kernel_sock: Path) -> Path:
    """The socket where a local client trades its peer credentials for a session ticket."""
    return kernel_sock.with_name(kernel_sock.name + ".cred")
