"""How vfmctl prints: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, is_dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from libvfm.types import (Collection, DaemonStatus, Process, RecallHit, SearchHit,
                          SystemUsage, TokenInfo, WorkingSet)


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def print_json(value) -> None:
    def plain(v):
        if is_dataclass(v):
            return asdict(v)
        raise TypeError(f"cannot print {type(v).__name__} as JSON")
    print(json.dumps(value, indent=2, sort_keys=True, default=plain))


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
    console().print(_process_rows(procs))


def _process_rows(procs: list[Process]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("PID", "NAME", "TENANT", "STATE", "PRI", "MODEL", "TOKENS", "ASKS", "TTFT",
                "COST", "AGE"):
        table.add_column(col, justify="right" if col in ("PID", "PRI", "ASKS", "TTFT") else "left")
    now = time.time()
    for p in procs:
        c = p.counters
        used = c.tokens_in + c.tokens_out
        ttft = f"{c.ttft_ms / c.asks:.0f}ms" if c.asks else "-"
        table.add_row(str(p.pid), p.name, p.tenant, p.state, str(p.spec.priority),
                      p.spec.model or "default", _quota_text(used, p.spec.quota.max_tokens),
                      str(c.asks), ttft, f"{c.cost:.4g}", _age(now - p.created_at))
    return table


def _route_text(r) -> str:
    parts = [f"quality {r.quality:g} of the best" if r.quality else "best within budget"]
    if r.max_cost_per_ask:
        parts.append(f"at most {r.max_cost_per_ask:g} per ask")
    if r.ttft_slo_ms:
        parts.append(f"first token within {r.ttft_slo_ms:g} ms")
    parts.append("models " + (", ".join(r.allowed_models) if r.allowed_models else "any"))
    if r.cascade_confidence:
        parts.append(f"cascade below confidence {r.cascade_confidence:g}")
    if r.cascade_rate:
        parts.append(f"cascade of the least sure {r.cascade_rate:.0%}")
    return "; ".join(parts)


def process_detail(p: Process) -> None:
    q, c = p.spec.quota, p.counters
    used = c.tokens_in + c.tokens_out
    rows = [
        ("pid", p.pid), ("name", p.name), ("tenant", p.tenant), ("state", p.state),
        ("priority", p.spec.priority), ("model", p.spec.model or "default"),
        *([("route", _route_text(p.spec.route))] if p.spec.model == "auto" else []),
        ("context budget", f"{p.spec.context_budget or 1024} tokens"
                           f"{'' if p.spec.context_budget else ' (default)'}"),
        ("collections", ", ".join(p.spec.collections) or "-"),
        ("max resident pages", q.max_resident_pages or "unlimited"),
        ("asks", f"{c.asks} ({p.running} running)"),
        ("tokens", f"{used} (in {c.tokens_in}, out {c.tokens_out}) of "
                   f"{q.max_tokens or 'unlimited'}"),
        ("tokens/minute", q.tokens_per_minute or "unlimited"),
        ("max concurrent", q.max_concurrent or "unlimited"),
        ("cost", f"{c.cost:g} of {q.cost_budget or 'unlimited'}"),
        ("page faults/hits", f"{c.page_faults}/{c.page_hits}"),
        ("time (total)", f"queue {c.queue_ms:.0f} ms, first token {c.ttft_ms:.0f} ms, "
                         f"decode {c.decode_ms:.0f} ms"),
        ("time (per ask)", f"queue {c.queue_ms / max(1, c.asks):.0f} ms, first token "
                           f"{c.ttft_ms / max(1, c.asks):.0f} ms") if c.asks else ("time (per ask)", "-"),
        ("preemptions", c.preemptions),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.created_at))),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    console().print(table)


def daemon_table(daemons: list[DaemonStatus], restarts: dict[str, int] | None = None) -> None:
    restarts = restarts or {}
    table = Table(box=None, pad_edge=False)
    for col in ("DAEMON", "PID", "HEALTH", "RSS", "CPU", "UPTIME", "RESTARTS", "ADDRESS"):
        table.add_column(col)
    for d in daemons:
        color = "green" if d.health == "SERVING" else "red"
        table.add_row(d.name, str(d.pid or "-"), f"[{color}]{d.health}[/{color}]",
                      f"{d.rss_mb:.0f} MB" if d.rss_mb else "-", f"{d.cpu_percent:.0f}%",
                      _age(d.uptime_s) if d.uptime_s else "-", str(restarts.get(d.name, 0)),
                      d.address or "-")
    console().print(table)


def token_table(tokens: list[TokenInfo]) -> None:
    """Each token with its usage against its limits ("-": no limit)."""
    table = Table(box=None, pad_edge=False)
    for col in ("ID", "TENANT", "TOKENS", "COST", "RPM", "CONCURRENT", "LABEL"):
        table.add_column(col)
    for t in tokens:
        lim = t.limits
        table.add_row(t.token_id, escape(t.tenant) + (" (admin)" if t.admin else ""),
                      _quota_text(t.tokens_used, lim.max_tokens),
                      _quota_text(round(t.cost_spent, 6), lim.cost_budget),
                      str(lim.requests_per_minute or "-"), str(lim.max_concurrent or "-"),
                      escape(t.label))
    console().print(table)


def err_console() -> Console:
    return Console(stderr=True, highlight=False)


def error(message: str) -> None:
    print(f"vfmctl: error: {message}", file=sys.stderr)


def top_frame(usage: SystemUsage, procs: list[Process], limit: int = 15):
    """One screen of `vfmctl top`: scheduler line, tenants, busiest processes."""
    from rich.console import Group

    head = (f"policy {usage.policy}   model slots {usage.running}/{usage.capacity} busy   "
            f"queued {usage.queued}   {time.strftime('%H:%M:%S')}")
    tenants = Table(box=None, pad_edge=False, title="tenants", title_justify="left")
    for col in ("TENANT", "WEIGHT", "PROCS", "RUNNING", "QUEUED", "TOKENS IN", "TOKENS OUT",
                "COST", "AVG QUEUE", "AVG TTFT"):
        tenants.add_column(col)
    for t in usage.tenants:
        c, asks = t.counters, max(1, t.counters.asks)
        tenants.add_row(t.tenant, f"{t.weight:g}", str(t.processes), str(t.running),
                        str(t.queued), str(c.tokens_in), str(c.tokens_out), f"{c.cost:.4g}",
                        f"{c.queue_ms / asks:.0f}ms", f"{c.ttft_ms / asks:.0f}ms")
    busiest = sorted(procs, key=lambda p: (p.state != "RUNNING", -p.counters.tokens_out))[:limit]
    return Group(head, tenants, _process_rows(busiest))


def say(text: str) -> None:
    """A line for people; names and paths in it are never read as rich markup."""
    console().print(text, markup=False)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else "-"


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return escape(text if len(text) <= width else text[:width - 1] + "…")


def collections_table(items: list[Collection]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("COLLECTION", "SOURCES", "CHUNKS", "CREATED", "DESCRIPTION"):
        table.add_column(col, justify="right" if col in ("SOURCES", "CHUNKS") else "left")
    for c in items:
        table.add_row(c.name, str(c.sources), str(c.chunks), _when(c.created_at),
                      escape(c.description))
    console().print(table)


def search_table(hits: list[SearchHit]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("#", "SCORE", "SOURCE", "WHERE", "TEXT"):
        table.add_column(col, justify="right" if col in ("#", "SCORE") else "left")
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), f"{h.score:.3f}", escape(h.source),
                      escape(h.title or h.position), _clip(h.text))
    console().print(table)


def recall_table(hits: list[RecallHit]) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("#", "SCORE", "SEQ", "WHEN", "SPEAKER", "TEXT"):
        table.add_column(col, justify="right" if col in ("#", "SCORE", "SEQ") else "left")
    for rank, h in enumerate(hits, 1):
        e = h.entry
        table.add_row(str(rank), f"{h.score:.3f}", str(e.seq), _when(e.time),
                      escape(e.speaker), _clip(e.text))
    console().print(table)


def working_set_table(ws: WorkingSet) -> None:
    table = Table(box=None, pad_edge=False)
    for col in ("KIND", "TOKENS", "SCORE", "SOURCES", "TEXT"):
        table.add_column(col, justify="right" if col in ("TOKENS", "SCORE") else "left")
    for item in ws.items:
        table.add_row(item.kind, str(item.tokens), f"{item.score:.3f}" if item.score else "-",
                      escape(" ".join(item.source_ids)), _clip(item.text, 80))
    console().print(table)
    console().print(f"{ws.used}/{ws.budget} tokens, {len(ws.items)} items; pages resident "
                    f"{ws.resident_pages} of {ws.pages}; faults {ws.page_faults}, hits "
                    f"{ws.page_hits}; page-in {ws.pagein_ms:.1f} ms")
