"""The whole stack with the tiny real model: Ask uses retrieved knowledge and its own memory,
exchanges are remembered, and full page ranges get summaries in the background."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from libvfm import Client
from libvfm.types import MemoryEntry
from tests.conftest import Daemon, free_port, serving, start_kernel, wait_for
from tests.integration.test_stack_ask import start_modeld


@pytest.fixture(scope="module")
def full_stack():
    state = Path(tempfile.mkdtemp(prefix="vfmm", dir="/tmp"))
    os.chmod(state, 0o755)
    port = free_port()
    kernel = start_kernel(state, "--listen", f"127.0.0.1:{port}")
    modeld = start_modeld(state)
    datad: Daemon = Daemon(["-m", "services.data.main", "--state-dir", str(state),
                            "--kernel-socket", str(state / "vfmd.sock"), "--summary-pages", "1",
                            "--summary-interval", "0.5"],
                           state / "logs" / "vfm-datad.log").start()
    client = Client(state / "vfmd.sock")
    wait_for(lambda: serving(client, "vfm-modeld") and serving(client, "vfm-datad"), 600,
             "vfm-modeld and vfm-datad to serve", log=modeld.log)
    bob_token, _ = client.token_create("bob")
    bob = Client(target=f"127.0.0.1:{port}", token=bob_token)
    yield {"client": client, "datad": datad, "bob": bob}
    bob.close()
    client.close()
    for daemon in (datad, modeld, kernel):
        daemon.stop()
    shutil.rmtree(state, ignore_errors=True)


def test_ask_answers_from_the_collection(full_stack):
    client = full_stack["client"]
    client.collection_create("vault-docs")
    client.ingest("vault-docs", "vault.md", b"# Zephyr vault\n\nThe access code of the Zephyr "
                  b"vault is 7431. Only the night shift may open it.\n\n# Parking\n\nStaff "
                  b"park on level two of the north garage.\n")
    pid = client.spawn("guard", collections=["vault-docs"]).pid
    ws = client.context(pid, "What is the access code of the Zephyr vault?")
    knowledge = [i for i in ws.items if i.kind == "knowledge"]
    assert knowledge and "7431" in knowledge[0].text
    assert knowledge[0].source_ids[0].startswith("vault-docs/")
    assert knowledge[0].meta["source"] == "vault.md"
    answer = client.ask(pid, "What is the access code of the Zephyr vault?", max_new_tokens=24)
    assert "7431" in answer.text
    # Without the collection the model cannot know it: the answer came from retrieval.
    bare = client.spawn("no-docs").pid
    assert "7431" not in client.ask(bare, "What is the access code of the Zephyr vault?",
                                    max_new_tokens=24).text
    # Another tenant naming the same collection gets nothing from it, in Ask too.
    bob = full_stack["bob"]
    spy = bob.spawn("spy", collections=["vault-docs"]).pid
    assert not [i for i in bob.context(spy, "Zephyr vault access code").items
                if i.kind == "knowledge"]
    assert "7431" not in bob.ask(spy, "What is the access code of the Zephyr vault?",
                                 max_new_tokens=24).text


def test_exchanges_are_remembered_and_recalled(full_stack):
    client = full_stack["client"]
    pid = client.spawn("chatty").pid
    client.ask(pid, "My secret pet is a ferret. Say OK.", max_new_tokens=4, stateless=True)
    result = client.ask(pid, "My favourite colour is teal. Say OK.", max_new_tokens=8)
    hits = wait_for(lambda: client.recall(pid, "favourite colour", k=4), 30,
                    "the exchange to be remembered")
    speakers = {h.entry.speaker for h in hits}
    assert "user" in speakers and any("teal" in h.entry.text for h in hits)
    if result.text.strip():
        assert "assistant" in speakers
    ws = client.context(pid, "What is my favourite colour?")
    assert any("teal" in i.text for i in ws.items)
    # The stateless ask, made first, was not remembered.
    assert not any("ferret" in h.entry.text for h in client.recall(pid, "secret pet ferret"))


def test_full_pages_get_summaries_that_stand_in_for_them(full_stack):
    client = full_stack["client"]
    pid = client.spawn("historian").pid
    lines = [f"On day {d} the team repaired bridge number {d} near the old mill."
             for d in range(40)]
    client.remember(pid, [MemoryEntry(text, speaker="log") for text in lines])

    def summarised():
        ws = client.context(pid, "What happened on day 39?", budget=400)
        return [i for i in ws.items if i.kind == "summary"]

    found = wait_for(summarised, 240, "a summary in the working set",
                     log=full_stack["datad"].log)
    assert found[0].source_ids[0].startswith("pages:") and found[0].text.strip()
    assert found[0].tokens > 0
