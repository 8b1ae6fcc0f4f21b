"""The kernel's cached Process messages (kernel/convert.py ProcessViews): a listing reuses a
conversion only while nothing the message shows has changed."""

from __future__ import annotations

from dataclasses import replace

from kernel.convert import ProcessViews, process_to_pb
from kernel.process import ProcRecord, ProcState
from vfmos_runtime.types import ProcessSpec, Quota


def _record() -> ProcRecord:
    return ProcRecord(pid=7, tenant="alice", owner_uid=1000, spec=ProcessSpec(name="bot"),
                      state=ProcState.READY)


def test_an_unchanged_record_is_converted_once():
    views, record = ProcessViews(), _record()
    first = views.get(record, 0)
    assert views.get(record, 0) is first and first == process_to_pb(record, 0)


def test_every_change_the_message_shows_gives_a_new_message():
    views, record = ProcessViews(), _record()
    seen = views.get(record, 0)

    def changed(running: int = 0):
        nonlocal seen
        msg = views.get(record, running)
        assert msg is not seen and msg == process_to_pb(record, running)
        seen = msg
        return msg

    record.counters.tokens_out += 5            # counters are edited in place
    assert changed().counters.tokens_out == 5
    record.counters.page_hits += 1
    assert changed().counters.page_hits == 1
    record.spec = replace(record.spec, quota=Quota(max_tokens=10))  # specs are replaced
    assert changed().spec.quota.max_tokens == 10
    record.move(ProcState.RUNNING)
    assert changed(1).running == 1
    assert changed(0).running == 0


def test_the_cache_stays_bounded():
    views = ProcessViews(limit=8)
    for pid in range(1, 30):
        record = replace(_record(), pid=pid)
        assert views.get(record, 0).pid == pid
    assert len(views._views) <= 8
