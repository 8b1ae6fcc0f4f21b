"""vfm-datad behind the real kernel: memory, knowledge, working sets, restarts, tenants, bad input."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from libvfm import Client
from libvfm.errors import InvalidArgument, NotFound
from libvfm.types import MemoryEntry
from tests.conftest import Daemon, free_port, serving, start_kernel, wait_for


def start_datad(state_dir: Path, *extra: str) -> Daemon:
    return Daemon(["-m", "services.data.main", "--state-dir", str(state_dir),
                   "--kernel-socket", str(state_dir / "vfmd.sock"), "--summary-pages", "0",
                   *extra], state_dir / "logs" / "vfm-datad.log").start()


@pytest.fixture(scope="module")
def data_stack():
    state = Path(tempfile.mkdtemp(prefix="vfmd", dir="/tmp"))
    os.chmod(state, 0o755)
    port = free_port()
    parts = {"state": state, "kernel": start_kernel(state, "--listen", f"127.0.0.1:{port}"),
             "datad": start_datad(state)}
    client = Client(state / "vfmd.sock")
    wait_for(lambda: serving(client, "vfm-datad"), 120, "vfm-datad to serve",
             log=parts["datad"].log)
    bob_token, _ = client.token_create("bob")
    parts.update(client=client, bob=Client(target=f"127.0.0.1:{port}", token=bob_token))
    yield parts
    parts["bob"].close()
    client.close()
    parts["datad"].stop()
    parts["kernel"].stop()
    shutil.rmtree(state, ignore_errors=True)


def _at(day: str) -> float:
    return datetime.fromisoformat(day).replace(tzinfo=timezone.utc).timestamp()


DIARY = [
    ("Ana", "2023-03-02", "I adopted a grey cat called Pixel from the shelter."),
    ("Ben", "2023-03-02", "Congratulations! I am training for the Berlin marathon."),
    ("Ana", "2023-04-11", "Pixel knocked my sourdough starter off the counter again."),
    ("Ben", "2023-04-11", "My knee hurts, so I switched to swimming for two weeks."),
    ("Ana", "2023-05-20", "I started a pottery class on Thursday evenings."),
    ("Ben", "2023-05-20", "I finished the Berlin marathon in four hours and ten minutes."),
]


def _remember_diary(client: Client, pid: int) -> None:
    entries = [MemoryEntry(text=t, speaker=s, time=_at(d), meta={"turn": str(i)})
               for i, (s, d, t) in enumerate(DIARY)]
    first, count = client.remember(pid, entries)
    assert (first, count) == (0, len(DIARY))


def test_recall_ranks_the_relevant_turn_first(data_stack):
    client = data_stack["client"]
    pid = client.spawn("diary").pid
    _remember_diary(client, pid)
    hits = client.recall(pid, "What is the name of Ana's cat?", k=3)
    assert hits[0].entry.text.startswith("I adopted a grey cat")
    assert hits[0].entry.speaker == "Ana" and hits[0].entry.meta == {"turn": "0"}
    assert hits[0].score >= hits[-1].score
    hits = client.recall(pid, "How did Ben's race go?", k=2)
    assert any("four hours" in h.entry.text for h in hits)


def test_context_fits_the_budget_and_names_sources(data_stack):
    client = data_stack["client"]
    pid = client.spawn("ctx").pid
    _remember_diary(client, pid)
    full = client.context(pid, "What happened to the sourdough starter?")
    assert 0 < full.used <= full.budget == 1024
    texts = [i.text for i in full.items]
    assert any("sourdough" in t for t in texts)
    for item in full.items:
        assert any(s.startswith("mem:") for s in item.source_ids) and item.page >= 0
    small = client.context(pid, "What happened to the sourdough starter?", budget=40)
    assert small.used <= 40 and len(small.items) < len(full.items)
    assert any("sourdough" in i.text for i in small.items)  # the relevant one survives
    with pytest.raises(InvalidArgument):
        client.context(pid, "anything", budget=-5)


def test_page_faults_and_hits_are_counted(data_stack):
    client = data_stack["client"]
    pid = client.spawn("pager").pid
    _remember_diary(client, pid)
    first = client.context(pid, "Pixel the cat", touch=True)
    assert first.page_faults >= 1 and first.page_hits == 0 and first.resident_pages >= 1
    again = client.context(pid, "Pixel the cat", touch=True)
    assert again.page_hits == first.resident_pages and again.page_faults == 0
    proc = client.get(pid)
    assert proc.counters.page_faults == first.page_faults
    assert proc.counters.page_hits == again.page_hits


def test_fork_shares_memory_copy_on_write(data_stack):
    client = data_stack["client"]
    parent = client.spawn("parent").pid
    _remember_diary(client, parent)
    child = client.fork(parent, "child")
    assert child.name == "child" and child.pid != parent
    assert any("Pixel" in h.entry.text for h in client.recall(child.pid, "cat", k=3))
    client.remember(child.pid, [MemoryEntry("The child alone knows about the lighthouse.")])
    assert any("lighthouse" in h.entry.text for h in client.recall(child.pid, "lighthouse"))
    assert not any("lighthouse" in h.entry.text for h in client.recall(parent, "lighthouse"))


def test_collections_ingest_search_replace_and_delete(data_stack, tmp_path):
    client = data_stack["client"]
    client.collection_create("handbook", "support playbooks")
    doc = tmp_path / "refunds.md"
    doc.write_text("# Refunds\n\nCustomers get a full refund within 30 days of purchase.\n\n"
                   "# Shipping\n\nParcels to Norway take five working days.\n")
    result = client.ingest("handbook", str(doc), doc.read_bytes())
    assert result.chunks >= 1 and not result.unchanged
    hits = client.search("handbook", "how long do parcels to Norway take", k=3)
    assert hits and "five working days" in hits[0].text and hits[0].source == str(doc)
    again = client.ingest("handbook", str(doc), doc.read_bytes())
    assert again.unchanged
    doc.write_text("# Refunds\n\nRefunds are possible within 14 days only.\n")
    changed = client.ingest("handbook", str(doc), doc.read_bytes())
    assert changed.replaced == result.chunks
    texts = " ".join(h.text for h in client.search("handbook", "refund days", k=10))
    assert "14 days" in texts and "30 days" not in texts
    assert client.delete_source("handbook", str(doc)) == changed.chunks
    assert client.search("handbook", "refund", k=5) == []
    assert any(c.name == "handbook" for c in client.collections())


def test_bad_input_is_refused_and_nothing_is_lost(data_stack, tmp_path):
    client = data_stack["client"]
    client.collection_create("safe")
    good = client.ingest("safe", "notes.txt", b"The backup runs every night at two.")
    assert good.chunks == 1
    for data in (os.urandom(4096), b"", b"\x00\x01\x02" * 100):
        with pytest.raises(InvalidArgument):
            client.ingest("safe", "bad.txt", data)
    with pytest.raises(NotFound):
        client.ingest("nowhere", "a.txt", b"text")
    with pytest.raises(NotFound):
        client.search("nowhere", "anything")
    huge = client.ingest("safe", "long.txt", b"word " * 40_000)  # one 200 KB line
    assert huge.chunks > 10
    assert "backup runs every night" in client.search("safe", "when does the backup run")[0].text
    pid = client.spawn("badmem").pid
    with pytest.raises(InvalidArgument):
        client.remember(pid, [MemoryEntry("   ")])
    with pytest.raises(InvalidArgument):
        client.remember(pid, [MemoryEntry("ok"), MemoryEntry("x" * 100_000)])
    assert client.context(pid, "ok").items == []  # the refused batch left nothing behind


def test_tenants_never_see_each_other(data_stack):
    alice, bob = data_stack["client"], data_stack["bob"]
    alice.collection_create("secrets")
    alice.ingest("secrets", "vault.txt", b"The vault code is 7431.")
    pid = alice.spawn("alice-mem").pid
    alice.remember(pid, [MemoryEntry("My vault code is 7431.", speaker="alice")])
    with pytest.raises(NotFound):
        bob.search("secrets", "vault code")
    for call in (lambda: bob.recall(pid, "vault"), lambda: bob.context(pid, "vault"),
                 lambda: bob.remember(pid, [MemoryEntry("hi")]), lambda: bob.fork(pid)):
        with pytest.raises(NotFound):
            call()
    assert all(c.name != "secrets" for c in bob.collections())
    # Naming another tenant's collection retrieves nothing from it.
    spy = bob.spawn("spy", collections=["secrets"]).pid
    assert not any("7431" in i.text for i in bob.context(spy, "what is the vault code?").items)


def test_memory_survives_restarts(data_stack):
    client, state = data_stack["client"], data_stack["state"]
    pid = client.spawn("durable").pid
    _remember_diary(client, pid)
    data_stack["datad"].kill9()
    data_stack["datad"] = start_datad(state)
    wait_for(lambda: _recalls(client, pid), 120, "vfm-datad back with the memory",
             log=data_stack["datad"].log)
    data_stack["kernel"].stop()
    data_stack["kernel"] = start_kernel(state)
    wait_for(lambda: serving(client, "vfm-datad"), 30, "vfm-datad registered again")
    ws = client.context(pid, "Pixel the cat")
    assert any("Pixel" in i.text for i in ws.items)


def _recalls(client: Client, pid: int) -> bool:
    try:
        return any("Pixel" in h.entry.text for h in client.recall(pid, "cat", k=3))
    except Exception:
        return False
