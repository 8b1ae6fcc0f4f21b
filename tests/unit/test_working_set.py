"""Working-set assembly and page residency: pure kernel logic, a real LMDB for the page table."""

from __future__ import annotations

from kernel.memory import Candidates, Item, PageTable, assemble, render
from kernel.store import KernelStore


def mem(seq: int, tokens: int = 10, kind: str = "memory", page: int | None = None,
        score: float = 0.0) -> Item:
    page = seq // 4 if page is None else page
    return Item(kind=kind, text=f"turn {seq}", tokens=tokens, source_ids=[f"mem:{seq}"],
                score=score, page=page, seq=seq)


def chunk(n: int, tokens: int = 30) -> Item:
    return Item(kind="knowledge", text=f"chunk {n}", tokens=tokens, source_ids=[f"kb/{n}"])


def test_never_exceeds_the_budget_and_skips_what_does_not_fit():
    ranked = [mem(1, 60), mem(2, 50), mem(3, 5), mem(4, 30)]
    ws = assemble(Candidates([], [], ranked, []), budget=70)
    assert ws.used <= 70
    assert [i.seq for i in ws.items] == [1, 3]  # 50 and 30 did not fit after 60, 5 did


def test_pinned_first_then_a_small_recent_reserve_then_ranked():
    pinned = [mem(0, 20, "pinned")]
    recent = [mem(s, 10, "recent") for s in range(90, 96)]
    ranked = [mem(s, 10) for s in range(10, 40)]
    ws = assemble(Candidates(pinned, recent, ranked, []), budget=100)
    kinds = [i.kind for i in ws.items]
    assert kinds[0] == "pinned" and ws.used == 100
    # the reserve is 10% of the budget: one 10-token recent turn, the latest
    assert [i.seq for i in ws.items if i.kind == "recent"] == [95]
    assert [i.seq for i in ws.items if i.kind == "memory"] == list(range(10, 17))


def test_a_turn_is_never_included_twice():
    recent = [mem(5, 10, "recent")]
    ranked = [mem(5, 10), mem(6, 10)]
    ws = assemble(Candidates([], recent, ranked, []), budget=1000)
    assert sorted(i.seq for i in ws.items) == [5, 6]


def test_knowledge_is_capped_while_memory_competes_but_not_alone():
    knowledge = [chunk(n) for n in range(10)]
    alone = assemble(Candidates([], [], [], knowledge), budget=200)
    assert sum(1 for i in alone.items if i.kind == "knowledge") == 6
    mixed = assemble(Candidates([], [], [mem(s) for s in range(20)], knowledge), budget=200)
    assert sum(i.tokens for i in mixed.items if i.kind == "knowledge") <= 80
    assert mixed.used <= 200 and any(i.kind == "memory" for i in mixed.items)


def test_summaries_stand_in_only_for_ranges_left_out():
    covered = Item("summary", "pages 0-1", 8, ["pages:0-1"], meta={"pages": "0-1"})
    missing = Item("summary", "pages 2-3", 8, ["pages:2-3"], meta={"pages": "2-3"})
    ws = assemble(Candidates([], [], [mem(1, page=0)], [], [covered, missing]), budget=100)
    assert [i.text for i in ws.items if i.kind == "summary"] == ["pages 2-3"]


def test_summaries_keep_room_when_memory_would_fill_the_budget():
    ranked = [mem(s, 10, page=s) for s in range(20)]
    summary = Item("summary", "pages 30-31", 9, ["pages:30-31"], meta={"pages": "30-31"})
    ws = assemble(Candidates([], [], ranked, [], [summary]), budget=100)
    assert [i.kind for i in ws.items].count("summary") == 1
    assert ws.used == 99 and [i.kind for i in ws.items].count("memory") == 9


def test_a_long_summary_still_gets_room_up_to_a_quarter():
    ranked = [mem(s, 10, page=s) for s in range(40)]
    long = Item("summary", "pages 50-53", 60, ["pages:50-53"], meta={"pages": "50-53"})
    assert "summary" in [i.kind for i in assemble(Candidates([], [], ranked, [], [long]),
                                                  budget=300).items]
    assert "summary" not in [i.kind for i in assemble(Candidates([], [], ranked, [], [long]),
                                                      budget=200).items]


def test_max_resident_pages_keeps_the_best_pages():
    ranked = [mem(1, page=7), mem(2, page=3), mem(3, page=7), mem(4, page=9)]
    ws = assemble(Candidates([mem(0, kind="pinned", page=0)], [], ranked, []), 1000, max_pages=2)
    assert {i.page for i in ws.items} == {0, 7}


def test_reading_order_is_pinned_memory_in_time_then_knowledge_then_latest():
    ws = assemble(Candidates([mem(0, kind="pinned")], [mem(50, kind="recent")],
                             [mem(30), mem(10)], [chunk(1)]), budget=1000)
    assert [(i.kind, i.seq) for i in ws.items] == [
        ("pinned", 0), ("memory", 10), ("memory", 30), ("knowledge", -1), ("recent", 50)]
    text = render(ws.items)
    assert text.index("turn 10") < text.index("turn 30") < text.index("chunk 1")


def test_a_day_header_is_paid_once_and_shown_once():
    def day(seq, label):
        item = mem(seq, 10)
        item.group, item.group_tokens = label, 5
        return item
    ranked = [day(1, "8 May 2023"), day(2, "8 May 2023"), day(3, "9 May 2023")]
    ws = assemble(Candidates([], [], ranked, []), budget=40)  # (5 + 10 + 10) + (5 + 10)
    assert [i.seq for i in ws.items] == [1, 2, 3] and ws.used == 40
    tight = assemble(Candidates([], [], ranked, []), budget=39)
    assert [i.seq for i in tight.items] == [1, 2] and tight.used == 25
    text = render(ws.items)
    assert text.count("[8 May 2023]") == 1 and text.count("[9 May 2023]") == 1
    assert text.index("[8 May 2023]") < text.index("turn 1") < text.index("[9 May 2023]")


def test_page_table_counts_faults_then_hits_and_evicts(tmp_path):
    table = PageTable(KernelStore(tmp_path))
    first = table.touch(1, [mem(1, page=0), mem(2, page=0), mem(9, page=2)])
    assert first == (2, 0, 2)  # two pages loaded, nothing was resident
    assert table.touch(1, [mem(1, page=0)]) == (0, 1, 1)  # page 2 is evicted now
    assert table.touch(1, [mem(9, page=2)]) == (1, 0, 1)  # ...so needing it again faults
    assert table.resident(1) == 1 and table.resident(2) == 0
    table.drop(1)
    assert table.resident(1) == 0
