"""Virtual context memory: page tables, and the working set assembled for each question."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kernel.store import KernelStore

DEFAULT_BUDGET = 1024
RECENT_TURNS = 4            # the conversation's last turns are always worth their tokens...
RECENT_SHARE = 0.10         # ...up to this share of the budget
KNOWLEDGE_SHARE = 0.40      # at most this share goes to knowledge chunks when memory competes
SUMMARY_SHARE = 0.10        # kept for summaries of left-out ranges, when there are any,
SUMMARY_SHARE_MAX = 0.25    # or as much as the shortest needs, up to this share
RANKED_LIMIT = 400          # ranked memory candidates asked of the data service


@dataclass
class Item:
    """One piece of a working set, before it is rendered into the context."""

    kind: str               # "pinned", "recent", "memory", "knowledge", "summary"
    text: str
    tokens: int
    source_ids: list[str]
    score: float = 0.0
    page: int = -1          # memory pages only
    seq: int = -1           # memory entries only
    speaker: str = ""
    time: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)
    group: str = ""         # a header shown once over all its items (the day, for memory)
    group_tokens: int = 0   # what that header costs, paid by the first item under it


@dataclass
class Candidates:
    """What the data service offered, in its order of preference."""

    pinned: list[Item]
    recent: list[Item]      # oldest first
    ranked: list[Item]      # best first
    knowledge: list[Item]   # best first
    summaries: list[Item] = field(default_factory=list)


@dataclass
class Assembly:
    items: list[Item]
    used: int
    budget: int


def assemble(c: Candidates, budget: int, max_pages: int = 0) -> Assembly:
    """Fill the budget: pinned entries, the latest turns (a small reserve), knowledge (capped
    while memory competes for room), ranked memory, and summaries of ranges left out (up
    to SUMMARY_SHARE of the budget, more if the shortest summary needs it).

    Greedy with skipping: an item that does not fit is passed over and smaller ones after it
    still get their chance. The result reads in a fixed order: pinned, summaries, memory in
    time order, knowledge, then the latest turns, closest to the question."""
    chosen: list[Item] = []
    seen: set[str] = set()
    headers: set[tuple[str, str]] = set()
    left = budget

    def take(item: Item, cap: int | None = None) -> bool:
        nonlocal left
        key = item.source_ids[0] if item.source_ids else id(item)
        header = (item.kind, item.group)
        price = item.tokens + (item.group_tokens if header not in headers else 0)
        if key in seen or price > left or (cap is not None and price > cap):
            return False
        seen.add(key)
        headers.add(header)
        chosen.append(item)
        left -= price
        return True

    for item in c.pinned:
        take(item)
    reserve = int(budget * RECENT_SHARE)
    for item in reversed(c.recent[-RECENT_TURNS:]):
        before = left
        if take(item, reserve):
            reserve -= before - left
    share = int(budget * KNOWLEDGE_SHARE) if c.ranked else left
    for item in c.knowledge:
        before = left
        if take(item, share):
            share -= before - left
    # Summaries stand in for ranges left out: room is kept for them while memory is ranked
    # in, then whatever they do not use goes back to memory.
    reserve = 0
    if c.summaries:  # room for at least the shortest one, within limits
        shortest = min(s.tokens for s in c.summaries)
        reserve = min(max(int(budget * SUMMARY_SHARE), shortest), int(budget * SUMMARY_SHARE_MAX),
                      sum(s.tokens for s in c.summaries))
    for item in c.ranked:
        take(item, left - reserve)
    covered = {i.page for i in chosen if i.page >= 0}
    for item in c.summaries:
        if item.meta.get("pages") and not covered & _pages(item):
            take(item)
    for item in c.ranked:
        take(item)
    if max_pages:
        chosen = _within_pages(chosen, max_pages)
    return Assembly(_reading_order(chosen), cost(chosen), budget)


def cost(items: list[Item]) -> int:
    """Tokens of a working set: every item, and each group's header once per section."""
    headers = {(i.kind, i.group): i.group_tokens for i in items if i.group}
    return sum(i.tokens for i in items) + sum(headers.values())


def _pages(summary: Item) -> set[int]:
    first, _, last = summary.meta["pages"].partition("-")
    return set(range(int(first), int(last or first) + 1))


def _within_pages(items: list[Item], max_pages: int) -> list[Item]:
    """Keep the items of the `max_pages` most valuable pages (pinned ones first)."""
    value: dict[int, float] = {}
    for rank, item in enumerate(items):
        if item.page >= 0:
            bonus = 1e9 if item.kind == "pinned" else 0.0
            value[item.page] = max(value.get(item.page, -1e18), bonus - rank)
    keep = set(sorted(value, key=value.get, reverse=True)[:max_pages])
    return [i for i in items if i.page < 0 or i.page in keep]


_ORDER = {"pinned": 0, "summary": 1, "memory": 2, "knowledge": 3, "recent": 4}


def _reading_order(items: list[Item]) -> list[Item]:
    return sorted(items, key=lambda i: (_ORDER[i.kind], i.seq if i.seq >= 0 else 0))


def render(items: list[Item]) -> str:
    """The context block that goes into the model's system message; within a section,
    consecutive items of one group (memory of one day) sit under one header."""
    lines, section, group = [], "", ""
    titles = {"pinned": "Rules", "summary": "Earlier (summarised)", "memory": "From memory",
              "knowledge": "From the knowledge base", "recent": "Latest conversation"}
    for item in items:
        if item.kind != section:
            section, group = item.kind, ""
            lines.append(f"## {titles[section]}")
        if item.group and item.group != group:
            group = item.group
            lines.append(f"[{group}]")
        lines.append(item.text)
    return "\n".join(lines)


class PageTable:
    """Residency of each process's memory pages, kept in the kernel store.

    A page is resident while it is part of the process's current working set. A page the
    next working set needs counts as a hit if it is resident and as a fault if it is not
    (never loaded, or evicted by an earlier assembly).

    The tables live in memory while the kernel runs (loaded from the store on first use); a
    touched table is staged in the store and written with its process's next record, which
    on the Ask path is the Ask's one write at its end."""

    def __init__(self, store: KernelStore):
        self._store = store
        self._tables: dict[int, dict] = {}

    def _table(self, pid: int) -> dict:
        table = self._tables.get(pid)
        if table is None:
            table = self._tables[pid] = self._store.get_page_table(pid) or {"pages": []}
        return table

    def touch(self, pid: int, items: list[Item]) -> tuple[int, int, int]:
        """Make the items' pages the resident set; returns (faults, hits, resident pages)."""
        # page -> [page, resident, last_use, relevance, pinned]
        pages = {p[0]: p for p in self._table(pid)["pages"]}
        needed: dict[int, tuple[float, bool]] = {}
        for item in items:
            if item.page >= 0:
                score, pinned = needed.get(item.page, (0.0, False))
                needed[item.page] = (max(score, item.score), pinned or item.kind == "pinned")
        hits = sum(1 for page in needed if page in pages and pages[page][1])
        for row in pages.values():
            row[1] = False
        now = time.time()
        for page, (score, pinned) in needed.items():
            pages[page] = [page, True, now, score, pinned]
        faults = len(needed) - hits
        self._tables[pid] = table = {"pages": sorted(pages.values())}
        self._store.stage_page_table(pid, table)
        return faults, hits, len(needed)

    def resident(self, pid: int) -> int:
        return sum(1 for p in self._table(pid)["pages"] if p[1])

    def forget(self, pid: int) -> None:
        """Drop the table from memory only (its process was reaped; the store removed it)."""
        self._tables.pop(pid, None)

    def drop(self, pid: int) -> None:
        self._tables.pop(pid, None)
        self._store.delete_page_table(pid)
