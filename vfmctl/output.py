"""How vfmctl prints: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, is_dataclass

from rich.console import Console
from rich.table import Table

from libvfm.types import DaemonStatus, Process


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def print_json(value) -> None:
    def plain(v):
        return asdict(v) if is_dataclass(v) else v
    if isinstance(value, list):
        value = [plain(v) for v in value]
    print(json.dumps(plain(value), indent=2, sort_keys=True))


def _quota_text(used: float, limit: float) -> str:
    return f"{used:g}/{limit:g}" if limit else f"{used:g}"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def process_table(procs: list[Process]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("PID", "NAME", "TENANT", "STATE", "PRI", "MODEL", "TOKENS", "ASKS", "AGE"):
        table.add_column(col, justify="right" if col in ("PID", "PRI", "ASKS") else "left")
    now = time.time()
    for p in procs:
        used = p.counters.tokens_in + p.counters.tokens_out
        table.add_row(str(p.pid), p.name, p.tenant, p.state, str(p.spec.priority),
                      p.spec.model or "default", _quota_text(used, p.spec.quota.max_tokens),
                      str(p.counters.asks), _age(now - p.created_at))
    console().print(table)


def process_detail(p: Process) -> None:
    q, c = p.spec.quota, p.counters
    used = c.tokens_in + c.tokens_out
    rows = [
        ("pid", p.pid), ("name", p.name), ("tenant", p.tenant), ("state", p.state),
        ("priority", p.spec.priority), ("model", p.spec.model or "default"),
        ("context budget", p.spec.context_budget or "model window"),
        ("asks", f"{c.asks} ({p.running} running)"),
        ("tokens", f"{used} (in {c.tokens_in}, out {c.tokens_out}) of "
                   f"{q.max_tokens or 'unlimited'}"),
        ("tokens/minute", q.tokens_per_minute or "unlimited"),
        ("max concurrent", q.max_concurrent or "unlimited"),
        ("cost", f"{c.cost:g} of {q.cost_budget or 'unlimited'}"),
        ("page faults/hits", f"{c.page_faults}/{c.page_hits}"),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.created_at))),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    console().print(table)


def daemon_table(daemons: list[DaemonStatus]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("DAEMON", "PID", "HEALTH", "RSS", "CPU", "UPTIME", "ADDRESS"):
        table.add_column(col)
    for d in daemons:
        color = "green" if d.health == "SERVING" else "red"
        table.add_row(d.name, str(d.pid or "-"), f"[{color}]{d.health}[/{color}]",
                      f"{d.rss_mb:.0f} MB" if d.rss_mb else "-", f"{d.cpu_percent:.0f}%",
                      _age(d.uptime_s) if d.uptime_s else "-", d.address or "-")
    console().print(table)


def error(message: str) -> None:
    print(f"vfmctl: error: {message}", file=sys.stderr)
