"""Where VFMOS keeps its sockets and data: one resolution rule for every client and daemon."""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path
from typing import Iterable

KERNEL_SOCKET = "vfmd.sock"
MODEL_SOCKET = "modeld.sock"
DATA_SOCKET = "datad.sock"
TRUST_SOCKET = "trustd.sock"
SYSTEM_SOCKET = Path("/run/vfmos") / KERNEL_SOCKET

# Tenants' memories, documents and tokens sit in these files: what a daemon creates is its
# user's alone. The one exception is reaching vfmd.sock: the state dir lets anyone through
# (x) but not list or read it; the kernel authenticates callers by peer credentials.
PRIVATE_UMASK = 0o077
STATE_DIR_MODE = 0o711
DATA_DIR_MODE = 0o700
# What VFMOS keeps in a state or data dir; nothing else there is touched (it may be a dir
# shared with other things, such as a test's temp dir).
OURS = ("*.lmdb", "logs", "*.pid", "supervisor.*")


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


def secure_state(state_dir: Path, data_dirs: Iterable[Path | None] = ()) -> list[str]:
    """Create the state dir (0711) and the data dirs (0700), or tighten existing ones and
    what an older version left in them readable by others (files 0600, dirs 0700; sockets
    keep the mode their daemon gives them). Returns a line per change, to log. A dir that
    belongs to another user is refused (OSError): its owner could read or swap our files."""
    state_dir = Path(state_dir)
    dirs = {state_dir: STATE_DIR_MODE}
    for path in data_dirs:
        if path is not None:
            dirs.setdefault(Path(path), DATA_DIR_MODE)
    changes = []
    for path, mode in dirs.items():
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        changes += _own(path, mode)
        for entry in _tree(path):
            changes += _own(entry, DATA_DIR_MODE, inner=True)
    return changes


def _tree(top: Path):
    """VFMOS's own entries below `top` (OURS, and all inside them), never through a link."""
    for entry in sorted(top.iterdir()):
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in OURS):
            continue
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            for root, dirnames, filenames in os.walk(entry):
                for name in (*dirnames, *filenames):
                    yield Path(root) / name


def _own(path: Path, dir_mode: int, inner: bool = False) -> list[str]:
    """Tighten one entry; `inner`: below a state or data dir (it may vanish meanwhile, and
    another user's entry that is already private is left alone)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        if inner:
            return []
        raise
    if stat.S_ISDIR(info.st_mode):
        want = dir_mode
    elif stat.S_ISREG(info.st_mode):
        want = stat.S_IMODE(info.st_mode) & 0o700
    else:
        return []  # sockets, links: their modes are set where they are made
    if info.st_uid != os.geteuid():
        if inner and stat.S_IMODE(info.st_mode) & 0o077 == 0:
            return []
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not to this daemon's "
                              f"uid {os.geteuid()}: refusing to keep VFMOS state there "
                              f"(use a state dir of your own, or chown it)")
    if stat.S_IMODE(info.st_mode) == want:
        return []
    os.chmod(path, want)
    return [f"{path} was {stat.S_IMODE(info.st_mode):04o}, now {want:04o} "
            f"(VFMOS state is private)"]
