"""vfmd configuration: a typed dataclass loaded once from file, then environment, then flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from kernel.process import DEFAULT_REAP_AFTER_S
from vfmos_runtime.config import listen_is_loopback, load_config, state_dir_named
from vfmos_runtime.paths import KERNEL_SOCKET, default_data_dir, default_state_dir


def _weights(items) -> dict[str, float]:
    """["alice=3", "bob=1"] (flags), "alice=3,bob=1" (environment) or a TOML table to a dict."""
    if isinstance(items, dict):
        return {str(k): float(v) for k, v in items.items()}
    if isinstance(items, str):
        items = [i for i in items.split(",") if i]
    weights = {}
    for item in items:
        tenant, _, weight = item.partition("=")
        try:
            weights[tenant.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"bad tenant weight {item!r}: use TENANT=NUMBER") from None
    return weights


@dataclass
class KernelConfig:
    state_dir: Path
    data_dir: Path | None = None      # None: resolved by load() from the state dir
    listen: str = ""                  # HOST:PORT for TCP clients (bearer tokens), off by default
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False            # --listen off loopback without TLS, knowingly
    health_interval_s: float = 2.0
    log_level: str = "INFO"
    policy: str = "fair"              # "fair" (weighted fair share) or "fifo" (baseline)
    max_slots: int = 0                # cap on concurrent asks per model (0 = its max_batch)
    tenant_weights: dict[str, float] = field(default_factory=dict, metadata={"parse": _weights})
    reap_after_s: float = DEFAULT_REAP_AFTER_S  # an ended process leaves the table then
    # "on": every Ask passes through vfm-trustd, and while it cannot be reached the last
    # policy seen decides (on_unavailable), else the Ask is refused. "off": no trust checks
    # (a stack run without vfm-trustd, knowingly).
    trust: str = "on"
    # vfmd's CPU priority (a Unix nice value). Below 0 the kernel's syscalls and its token
    # relay go before user load when the cores are busy, as an OS kernel's work does; that
    # needs root or CAP_SYS_NICE, and without it vfmd keeps the priority it was started with.
    nice: int = -5
    # Each Ask's stream to its client gets at most one message per this many milliseconds
    # after its first (which goes at once): text that comes faster is joined. A message
    # costs the kernel the same CPU whether it holds one token or ten, so a fast engine's
    # stream costs less, and a stream slower than this (a CPU model's 16 tokens/s) is sent
    # token by token as before. 0: send each piece as soon as it comes.
    stream_interval_ms: float = 20.0
    # Tests only, so no flag ($VFM_SLOW_COMMIT_MS): the store's writer sleeps this long in
    # every commit, as on a slow disk.
    slow_commit_ms: float = 0.0

    def validate(self) -> None:
        if self.trust not in ("on", "off"):
            raise ValueError(f"trust must be on or off, got {self.trust!r}")
        if self.policy not in ("fair", "fifo"):
            raise ValueError(f"policy must be fair or fifo, got {self.policy!r}")
        if not -20 <= self.nice <= 19:
            raise ValueError(f"--nice must be -20..19, got {self.nice}")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ValueError(f"--stream-interval must be 0..1000 ms, got {self.stream_interval_ms}")
        if self.max_slots < 0:
            raise ValueError("--max-slots must be >= 0")
        if not 0 < self.health_interval_s <= 3600:
            raise ValueError("--health-interval must be between 0 and 3600 seconds")
        if not 0 <= self.slow_commit_ms <= 60_000:
            raise ValueError("slow_commit_ms must be between 0 and 60000")
        if not 0 < self.reap_after_s <= 10 * 365 * 86400:
            raise ValueError("--reap-after must be between 0 and ten years (in seconds)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.listen and not self.tls_cert and not self.insecure \
                and not listen_is_loopback(self.listen):
            raise ValueError(f"--listen {self.listen} without TLS would send bearer tokens in "
                             "clear text across the network: give --tls-cert and --tls-key, "
                             "or --insecure to accept that")

    @property
    def clear_text_tcp(self) -> bool:
        """TCP without TLS: allowed on loopback (or with --insecure), worth a warning."""
        return bool(self.listen) and not self.tls_cert

    @property
    def socket(self) -> Path:
        return self.state_dir / KERNEL_SOCKET


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vfmd", description="VFMOS kernel daemon: FM processes, quotas, identity, services.")
    parser.add_argument("--config", type=Path, help="TOML file with the settings below")
    parser.add_argument("--state-dir", type=Path, help="sockets and pid files "
                        "(default: /run/vfmos for root, else $XDG_RUNTIME_DIR/vfmos)")
    parser.add_argument("--data-dir", type=Path, help="LMDB data (default: the state dir if "
                        "given, else /var/lib/vfmos or ~/.local/share/vfmos)")
    parser.add_argument("--listen", help="also serve TCP on HOST:PORT (bearer tokens required)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate for --listen")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --listen")
    parser.add_argument("--insecure", action="store_const", const=True,
                        help="allow --listen off loopback without TLS (tokens travel in clear)")
    parser.add_argument("--health-interval", type=float, dest="health_interval_s",
                        help="seconds between service health checks (default 2)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--policy", choices=("fair", "fifo"),
                        help="scheduling: weighted fair share across tenants (default) or fifo")
    parser.add_argument("--max-slots", type=int, help="at most this many asks per model "
                        "generate at once (default: the model's batch size)")
    parser.add_argument("--tenant-weight", action="append", dest="tenant_weights",
                        metavar="TENANT=W", help="fair-share weight of a tenant (repeatable; "
                        "default 1; 'vfmctl tenant weight' changes it at run time)")
    parser.add_argument("--reap-after", type=float, dest="reap_after_s", metavar="SECONDS",
                        help="remove exited and killed processes this long after they ended "
                        "(default 86400; their usage stays in the tenant's totals)")
    parser.add_argument("--trust", choices=("on", "off"),
                        help="check every Ask with vfm-trustd (default on: without it, asks "
                        "are refused unless the last policy seen allows them); off = no checks")
    parser.add_argument("--nice", type=int, metavar="N",
                        help="vfmd's CPU priority as a nice value (default -5: syscalls and "
                        "the token relay before user load; below 0 needs root or "
                        "CAP_SYS_NICE, else vfmd keeps the priority it started with)")
    parser.add_argument("--stream-interval", type=float, dest="stream_interval_ms",
                        metavar="MS", help="at most one message per MS milliseconds on each "
                        "Ask's stream after the first, faster text joined (default 20; 0: "
                        "every piece as it comes)")
    return parser.parse_args(argv)


def load(argv: list[str] | None = None, env: dict[str, str] | None = None) -> KernelConfig:
    """File, then VFM_* environment, then flags; later sources win."""
    env = os.environ if env is None else env
    args = parse_args(argv)
    cfg = load_config(KernelConfig, args, env, prefix="VFM_", state_dir=default_state_dir(env))
    if cfg.data_dir is None:
        named = state_dir_named(args, env)
        cfg.data_dir = default_data_dir(cfg.state_dir if named else None, env)
    return cfg
