"""KnowledgeBase over a real LMDB and the real MiniLM: ingest, replace, delete, search, tenants."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import lmdb
import numpy as np
import pytest

from libvfm.errors import AlreadyExists, InvalidArgument, NotFound
from vfmos_runtime.embed import load_embedder
from services.data.knowledge import KnowledgeBase, Position, _rrf

HANDBOOK = (b"# Handbook\n\n## Refunds\n\nCustomers get a full refund within 30 days of "
            b"purchase.\n\n## Shipping\n\nParcels to Norway take five working days.\n\n"
            b"## Pets\n\nOur office dog is a golden retriever called Biscuit.\n")


class FlakyEmbedder:
    """The real embedder, made to fail after `budget` texts: an ingest dying mid-document."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.budget: int | None = None

    def embed(self, texts):
        if self.budget is not None:
            if self.budget < len(texts):
                raise RuntimeError("embedder died mid-document")
            self.budget -= len(texts)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def embedder():
    return FlakyEmbedder(load_embedder())


@pytest.fixture
def env(tmp_path):
    env = lmdb.open(str(tmp_path / "data.lmdb"), map_size=1 << 30, max_dbs=32)
    yield env
    env.close()


@pytest.fixture
def kb(env, embedder):
    embedder.budget = None
    kb = KnowledgeBase(env, embedder)
    kb.create_collection("acme", "docs", "the handbook")
    return kb


def texts(hits) -> str:
    return " | ".join(h.text for h in hits)


def test_ingest_then_search_finds_the_chunk_with_its_metadata(kb):
    result = kb.ingest("acme", "docs", "/srv/handbook.md", HANDBOOK, mtime=1_700_000_000.0,
                       meta={"team": "support"})
    assert (result.chunks, result.skipped_unchanged, result.replaced) == (3, False, 0)
    hits = kb.search("acme", "docs", "how long do parcels to Norway take?", k=3)
    top = hits[0]
    assert "five working days" in top.text and top.source == "/srv/handbook.md"
    assert top.title == "Handbook > Shipping" and top.position == Position(1, heading=top.title)
    assert top.meta["team"] == "support" and top.meta["kind"] == "markdown"
    assert top.meta["source_mtime"].startswith("2023-11-14")
    # a paraphrase with no shared word: the dense half of the fusion finds it
    assert "Biscuit" in kb.search("acme", "docs", "What breed is the canine?", k=1)[0].text
    info = kb.get_collection("acme", "docs")
    assert (info.chunks, info.sources, info.description) == (3, 1, "the handbook")


def test_unchanged_source_is_skipped_and_a_changed_one_replaced(kb):
    kb.ingest("acme", "docs", "/srv/handbook.md", HANDBOOK)
    again = kb.ingest("acme", "docs", "/srv/handbook.md", HANDBOOK)
    assert again.skipped_unchanged and again.chunks == 3
    changed = kb.ingest("acme", "docs", "/srv/handbook.md",
                        b"# Handbook\n\n## Refunds\n\nRefunds are possible within 14 days only.\n")
    assert (changed.chunks, changed.replaced, changed.skipped_unchanged) == (1, 3, False)
    found = texts(kb.search("acme", "docs", "refund days", k=10))
    assert "14 days" in found and "30 days" not in found and "Norway" not in found
    assert kb.get_collection("acme", "docs").chunks == 1
    # new meta is a change too: the chunks carry it
    assert not kb.ingest("acme", "docs", "/srv/handbook.md", b"Refunds: 14 days.",
                         meta={"v": "2"}).skipped_unchanged


def test_delete_by_source_leaves_the_other_sources(kb):
    kb.ingest("acme", "docs", "a.md", HANDBOOK)
    kb.ingest("acme", "docs", "b.txt", b"The VPN password rotates every quarter.")
    assert kb.delete_source("acme", "docs", "a.md") == 3
    hits = kb.search("acme", "docs", "refund", k=10)
    assert [h.source for h in hits] == ["b.txt"]
    assert kb.get_collection("acme", "docs").sources == 1
    with pytest.raises(NotFound):
        kb.delete_source("acme", "docs", "a.md")
    assert kb.delete_collection("acme", "docs") == 1
    assert kb.list_collections("acme") == []


def test_tenants_never_see_each_others_collections(kb):
    kb.ingest("acme", "docs", "h.md", HANDBOOK)
    with pytest.raises(NotFound):
        kb.search("globex", "docs", "refund")
    with pytest.raises(NotFound):
        kb.ingest("globex", "docs", "x.txt", b"sneaky")
    with pytest.raises(NotFound):
        kb.delete_collection("globex", "docs")
    kb.create_collection("globex", "docs")  # same name, another tenant: its own
    kb.ingest("globex", "docs", "g.txt", b"Globex sells turbines.")
    assert [c.name for c in kb.list_collections("globex")] == ["docs"]
    assert "turbines" not in texts(kb.search("acme", "docs", "turbines", k=10))
    assert "refund" not in texts(kb.search("globex", "docs", "refund", k=10))
    # a tenant whose name prefixes another's is still another tenant
    kb.create_collection("acm", "e")
    assert [c.name for c in kb.list_collections("acm")] == ["e"]


def test_unknown_collection_bad_names_and_duplicates(kb):
    with pytest.raises(NotFound):
        kb.search("acme", "nope", "x")
    with pytest.raises(NotFound):
        kb.ingest("acme", "nope", "s.txt", b"text")
    with pytest.raises(AlreadyExists):
        kb.create_collection("acme", "docs")
    for name in ("", "a/b", "x" * 65, "a\x00b", ".hidden"):
        with pytest.raises(InvalidArgument):
            kb.create_collection("acme", name)
    with pytest.raises(InvalidArgument):
        kb.create_collection("", "docs")


def test_bad_documents_write_nothing(kb):
    for data in (b"", b"\x89PNG\r\n\x1a\n" + bytes(64), bytes(range(256)) * 8):
        with pytest.raises(InvalidArgument):
            kb.ingest("acme", "docs", "bad.txt", data)
    with pytest.raises(InvalidArgument):
        kb.ingest("acme", "docs", "ok.txt", b"fine", meta={"kind": "x"})  # reserved key
    info = kb.get_collection("acme", "docs")
    assert (info.chunks, info.sources) == (0, 0)


def test_an_ingest_dying_mid_document_leaves_the_old_version_whole(env, kb, embedder):
    kb = KnowledgeBase(env, embedder, embed_batch=8)
    kb.ingest("acme", "docs", "h.md", HANDBOOK)
    big = "\n\n".join(f"## Part {i}\n\nSection {i} explains widget model {i}."
                      for i in range(20)).encode()
    embedder.budget = 10  # the first batch of 8 chunks passes, the second dies
    with pytest.raises(RuntimeError, match="mid-document"):
        kb.ingest("acme", "docs", "h.md", big)
    assert embedder.budget == 2
    embedder.budget = None
    for base in (kb, KnowledgeBase(env, embedder)):  # as loaded, and as reloaded from LMDB
        info = base.get_collection("acme", "docs")
        assert (info.chunks, info.sources) == (3, 1)
        found = texts(base.search("acme", "docs", "widget model refund", k=10))
        assert "30 days" in found and "widget" not in found
    assert kb.ingest("acme", "docs", "h.md", HANDBOOK).skipped_unchanged


def test_filters_on_meta_and_time(kb):
    kb.ingest("acme", "docs", "q1.txt", b"Revenue grew by four percent.",
              meta={"team": "finance", "date": "2023-03-31"})
    kb.ingest("acme", "docs", "q2.txt", b"Revenue grew by nine percent.",
              meta={"team": "finance", "date": "2023-06-30"})
    kb.ingest("acme", "docs", "h.txt", b"Hiring grew by nine people.", meta={"team": "hr"})
    assert {h.source for h in kb.search("acme", "docs", "grew", filters={"team": "finance"})} \
        == {"q1.txt", "q2.txt"}
    may = datetime(2023, 5, 1, tzinfo=timezone.utc)
    assert [h.source for h in kb.search("acme", "docs", "revenue", since=may,
                                        until=datetime(2023, 12, 31))] == ["q2.txt"]
    assert [h.source for h in kb.search("acme", "docs", "revenue", until=may)] == ["q1.txt"]
    assert [h.source for h in kb.search("acme", "docs", "grew", filters={"source": "h.txt"})] \
        == ["h.txt"]
    assert kb.search("acme", "docs", "grew", filters={"team": "legal"}) == []


def test_restart_rebuilds_from_lmdb_and_the_ann_path_agrees(env, kb, embedder):
    docs = {f"n{i}.txt": f"Note {i}: the {w} is kept in room {i}.".encode()
            for i, w in enumerate(["stapler", "kettle", "ladder", "printer", "projector",
                                   "whiteboard", "umbrella", "bicycle"])}
    for source, data in docs.items():
        kb.ingest("acme", "docs", source, data)
    reopened = KnowledgeBase(env, embedder, ann_threshold=4)  # HNSW from 4 chunks on
    for base in (kb, reopened):
        assert base.search("acme", "docs", "where is the kettle?", k=1)[0].source == "n1.txt"
    reopened.delete_source("acme", "docs", "n1.txt")
    assert "kettle" not in texts(reopened.search("acme", "docs", "kettle", k=8))
    reopened.ingest("acme", "docs", "n1.txt", b"The kettle moved to the kitchen.")
    assert "kitchen" in reopened.search("acme", "docs", "kettle", k=1)[0].text


def test_concurrent_ingests_from_worker_threads(kb):
    errors = []

    def work(n):
        try:
            for j in range(3):
                kb.ingest("acme", "docs", f"t{n}-{j}.txt", f"Thread {n} note {j}.".encode())
        except Exception as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = kb.get_collection("acme", "docs")
    assert (info.chunks, info.sources) == (12, 12)
    ids = {h.chunk_id for h in kb.search("acme", "docs", "thread note", k=100)}
    assert len(ids) == 12


def test_search_arguments_are_checked(kb):
    with pytest.raises(InvalidArgument):
        kb.search("acme", "docs", "  ")
    with pytest.raises(InvalidArgument):
        kb.search("acme", "docs", "x", k=0)
    assert kb.search("acme", "docs", "anything") == []


def test_rrf_rewards_agreement_between_rankings():
    fused = _rrf([[1, 2, 3], [3, 1, 4]], k=60)
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert np.isclose(dict(fused)[4], 1 / 63)
