"""Background summaries are the served tenant's work: its process, its bill, its pause switch."""

from __future__ import annotations

import re

from libvfm.types import MemoryEntry
from tests.conftest import wait_for
from tests.integration.test_stack_memory import full_stack  # noqa: F401 (the fixture)

PROCESS = "vfm-datad-summaries"


def _summaries_of(log: str, pid: int) -> int:
    return len(re.findall(rf"summarised pages \d+-\d+ of process {pid} \(bob\)", log))


def _lines(first: int, n: int) -> list[MemoryEntry]:
    return [MemoryEntry(f"On day {d} Bob fixed fence number {d} by the north field.",
                        speaker="log") for d in range(first, first + n)]


def test_summaries_are_billed_to_the_tenant_served_and_pause_with_its_process(
        full_stack):  # noqa: F811
    admin, bob, datad = full_stack["client"], full_stack["bob"], full_stack["datad"]
    pid = bob.spawn("bob-diary").pid
    bob.remember(pid, _lines(0, 40))  # three pages: the first two are complete
    wait_for(lambda: _summaries_of(datad.log(), pid) >= 2, 300, "two summaries", log=datad.log)

    # Bob's own process did the work, and is charged for it; no one else's was.
    mine = [p for p in bob.ps() if p.name == PROCESS]
    assert len(mine) == 1 and mine[0].tenant == "bob"
    assert mine[0].counters.asks >= 2 and mine[0].counters.tokens_out > 0
    others = [p for p in admin.ps() if p.name == PROCESS and p.tenant != "bob"]
    assert all(p.counters.asks == 0 for p in others)

    # Suspending that process pauses Bob's summaries; resuming it lets them go on.
    bob.suspend(mine[0].pid)
    done = _summaries_of(datad.log(), pid)
    bob.remember(pid, _lines(40, 40))
    wait_for(lambda: "summaries of tenant bob paused" in datad.log(), 60, "the pause",
             log=datad.log)
    assert _summaries_of(datad.log(), pid) == done
    bob.resume(mine[0].pid)
    wait_for(lambda: _summaries_of(datad.log(), pid) > done, 300, "summaries after resume",
             log=datad.log)
