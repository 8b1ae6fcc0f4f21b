"""Episodic memory of FM processes: entries in LMDB, grouped into token pages, ranked on demand."""

from __future__ import annotations

import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import lmdb
import numpy as np

from vfmos_runtime.storage import pack as _pack
from vfmos_runtime.storage import unpack as _unpack
from vfmos_runtime.errors import InvalidArgument, NotFound
from vfmos_runtime.embed import Embedder
from services.data.episodic import Entry, EpisodicIndex, day_header, day_label, render
from services.data.tokens import TokenCounter

PAGE_TOKENS = 256          # a page holds whole entries up to this many tokens
MAX_ENTRY_CHARS = 64 * 1024
MAX_BATCH = 10_000
MAX_EXCHANGE_ID = 64
EMBED_BATCH = 8            # entries per embedder call, with a checkpoint between two calls
_KEY = struct.Struct(">QQ")  # pid, seq: big-endian so LMDB's order is memory order


def _prefix(tenant: str) -> bytes:
    return tenant.encode() + b"\x00"


@dataclass
class Stored:
    """One remembered entry as stored, with what the service derived from it."""

    seq: int
    speaker: str
    text: str
    time: float
    meta: dict[str, str]
    pinned: bool
    tokens: int
    page: int
    line: str
    group: str = ""         # the day header it sits under in a context
    group_tokens: int = 0

    def entry(self) -> Entry:
        when = datetime.fromtimestamp(self.time, timezone.utc) if self.time else None
        return Entry(seq=self.seq, speaker=self.speaker, text=self.text, time=when,
                     meta=self.meta, tokens=self.tokens)


@dataclass
class MemoryHead:
    """Where a process's memory ends, and what it inherited from a parent (copy-on-write)."""

    next_seq: int = 0
    page: int = 0
    page_fill: int = 0
    # (pid, upto_seq): the parent's entries below upto_seq are ours too, shared, not copied.
    base: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Candidates:
    pinned: list[Stored]
    recent: list[Stored]
    ranked: list[tuple[Stored, float]]
    pages: int
    entries: int


class EpisodicMemory:
    """Per-process memories of one tenant namespace each; safe to call from worker threads."""

    def __init__(self, env: lmdb.Environment, embedder: Embedder, counter: TokenCounter,
                 cached_indexes: int = 64):
        self._env = env
        self._embedder = embedder
        self._counter = counter
        self._entries = env.open_db(b"m_entries")
        self._vectors = env.open_db(b"m_vectors")
        self._heads = env.open_db(b"m_heads")
        self._exchanges = env.open_db(b"m_exchanges")  # exchange ids already appended
        self._lock = threading.RLock()
        self._indexes: OrderedDict[tuple[str, int], tuple[EpisodicIndex, list[Stored]]] = \
            OrderedDict()
        self._cached = cached_indexes
        # Processes whose memory grew: the summariser looks at these (all of them after a start).
        self.dirty: set[tuple[str, int]] = set()
        with env.begin() as txn:
            for key, _ in txn.cursor(db=self._heads):
                key = bytes(key)  # tenant, NUL, 8-byte pid (which may hold NULs itself)
                self.dirty.add((key[:-9].decode(), struct.unpack(">Q", key[-8:])[0]))

    # writing
    def remember(self, tenant: str, pid: int, items: list[dict],
                 exchange_id: str = "",
                 checkpoint: Callable[[], None] = lambda: None) -> tuple[int, int, int]:
        """Append entries (dicts: speaker, text, time, meta, pinned); returns
        (first seq, count, pages). One transaction: a batch is stored whole or not at all.
        A batch with an `exchange_id` this process already has appends nothing and returns
        what the first one did (the kernel delivers again when it did not hear the reply).
        `checkpoint()` runs between embedding batches (raising there stores nothing)."""
        if len(exchange_id) > MAX_EXCHANGE_ID:
            raise InvalidArgument(f"exchange_id is longer than {MAX_EXCHANGE_ID} characters")
        if not items:
            raise InvalidArgument("nothing to remember: no entries")
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} entries per call, got {len(items)}")
        now = time.time()
        clean = [self._validate(item, now) for item in items]
        lines = [render(Entry(seq=0, speaker=c["speaker"], text=c["text"], time=None))
                 for c in clean]
        tokens = self._counter.count(lines)
        groups = [day_label(datetime.fromtimestamp(c["time"], timezone.utc)) for c in clean]
        labels = sorted(set(groups))
        header_tokens = dict(zip(labels, self._counter.count([day_header(g) for g in labels])))
        vectors = self._embed([c["text"] for c in clean], checkpoint)  # before the write lock
        with self._lock:
            head = self._head(tenant, pid)
            first, stored = head.next_seq, []
            done_key = exchange_id and (_prefix(tenant) + struct.pack(">Q", pid)
                                        + exchange_id.encode())
            with self._env.begin(write=True) as txn:
                done = done_key and txn.get(done_key, db=self._exchanges)
                if done:
                    return tuple(_unpack(done))
                for c, line, n, vec, group in zip(clean, lines, tokens, vectors, groups):
                    if head.page_fill and head.page_fill + n > PAGE_TOKENS:
                        head.page, head.page_fill = head.page + 1, 0
                    head.page_fill += n
                    s = Stored(head.next_seq, c["speaker"], c["text"], c["time"], c["meta"],
                               c["pinned"], n, head.page, line, group, header_tokens[group])
                    key = _prefix(tenant) + _KEY.pack(pid, s.seq)
                    txn.put(key, _pack({k: v for k, v in s.__dict__.items() if k != "seq"}),
                            db=self._entries)
                    txn.put(key, np.asarray(vec, dtype=np.float32).tobytes(), db=self._vectors)
                    stored.append(s)
                    head.next_seq += 1
                self._put_head(txn, tenant, pid, head)
                if done_key:
                    txn.put(done_key, _pack([first, len(stored), head.page + 1]),
                            db=self._exchanges)
            self.dirty.add((tenant, pid))
            cached = self._indexes.get((tenant, pid))
            if cached is not None:
                # A new (index, entries) pair, swapped in whole: readers holding the old pair
                # rank a memory whose every column has the same length.
                index, all_entries = cached
                self._indexes[(tenant, pid)] = (
                    index.extended([s.entry() for s in stored],
                                   np.asarray(vectors, dtype=np.float32)),
                    all_entries + stored)
        return first, len(stored), head.page + 1

    def _embed(self, texts: list[str], checkpoint: Callable[[], None]) -> np.ndarray:
        parts = []
        for i in range(0, len(texts), EMBED_BATCH):
            parts.append(self._embedder.embed(texts[i:i + EMBED_BATCH]))
            checkpoint()
        return np.concatenate(parts)

    def forget(self, tenant: str, pid: int) -> int:
        """Drop a process's own entries (inherited ones stay with the parent)."""
        with self._lock, self._env.begin(write=True) as txn:
            start = _prefix(tenant) + _KEY.pack(pid, 0)
            end = _prefix(tenant) + _KEY.pack(pid + 1, 0)
            keys = [bytes(k) for k, _ in self._scan(txn, self._entries, start, end)]
            for key in keys:
                txn.delete(key, db=self._entries)
                txn.delete(key, db=self._vectors)
            txn.delete(_prefix(tenant) + struct.pack(">Q", pid), db=self._heads)
            self._indexes.pop((tenant, pid), None)
        return len(keys)

    def fork(self, tenant: str, parent: int, child: int) -> int:
        """The child starts with the parent's memory, shared: nothing is copied."""
        with self._lock, self._env.begin(write=True) as txn:
            head = self._head(tenant, parent, txn)
            if self._head(tenant, child, txn).next_seq:
                raise InvalidArgument(f"process {child} already has a memory")
            child_head = MemoryHead(next_seq=head.next_seq, page=head.page,
                                    page_fill=head.page_fill,
                                    base=head.base + [(parent, head.next_seq)])
            self._put_head(txn, tenant, child, child_head)
        return head.next_seq

    def dirty_processes(self) -> list[tuple[str, int]]:
        """(tenant, pid) of the memories that grew since the summariser last looked."""
        with self._lock:
            return list(self.dirty)

    def clean(self, tenant: str, pid: int) -> None:
        with self._lock:
            self.dirty.discard((tenant, pid))

    # reading
    def entries(self, tenant: str, pid: int) -> list[Stored]:
        with self._env.begin() as txn:
            return self._load(txn, tenant, pid)

    def recall(self, tenant: str, pid: int, query: str, k: int,
               now: float = 0.0) -> list[tuple[Stored, float]]:
        if not query.strip():
            raise InvalidArgument("the query is empty")
        index, stored = self._index(tenant, pid)
        return self._ranked(index, stored, query, k, now)

    def _ranked(self, index: EpisodicIndex, stored: list[Stored], query: str, k: int,
                now: float) -> list[tuple[Stored, float]]:
        by_seq = {s.seq: s for s in stored}
        moment = self._moment(now, stored)
        return [(by_seq[seq], score) for seq, score in index.rank(query, now=moment, limit=k)]

    def candidates(self, tenant: str, pid: int, question: str, limit: int, recent: int,
                   now: float = 0.0) -> Candidates:
        index, stored = self._index(tenant, pid)
        pinned = [s for s in stored if s.pinned]
        tail = [s for s in stored if not s.pinned][-recent:] if recent else []
        ranked = self._ranked(index, stored, question, limit, now) \
            if question.strip() and stored else []
        pages = (stored[-1].page + 1) if stored else 0
        return Candidates(pinned, tail, ranked, pages, len(stored))

    # internals
    @staticmethod
    def _validate(item: dict, now: float) -> dict:
        text = str(item.get("text", ""))
        if not text.strip():
            raise InvalidArgument("an entry has no text")
        if len(text) > MAX_ENTRY_CHARS:
            raise InvalidArgument(f"an entry is longer than {MAX_ENTRY_CHARS} characters; "
                                  "ingest long documents into a collection instead")
        when = float(item.get("time") or 0.0) or now
        if not 0 < when < 32503680000:  # year 3000
            raise InvalidArgument(f"bad entry time {when}")
        meta = {str(k): str(v) for k, v in (item.get("meta") or {}).items()}
        return {"speaker": str(item.get("speaker") or "user")[:128], "text": text, "time": when,
                "meta": meta, "pinned": bool(item.get("pinned"))}

    @staticmethod
    def _moment(now: float, stored: list[Stored]) -> datetime | None:
        if now:
            return datetime.fromtimestamp(now, timezone.utc)
        if stored:
            return datetime.fromtimestamp(max(s.time for s in stored), timezone.utc)
        return None

    def _index(self, tenant: str, pid: int) -> tuple[EpisodicIndex, list[Stored]]:
        """The process's index, built from LMDB on first use and kept (LRU) after."""
        with self._lock:
            cached = self._indexes.get((tenant, pid))
            if cached is not None:
                self._indexes.move_to_end((tenant, pid))
                return cached
            with self._env.begin() as txn:
                stored = self._load(txn, tenant, pid)
                vectors = self._load_vectors(txn, tenant, pid, stored)
            index = EpisodicIndex(self._embedder)
            if stored:
                index.add([s.entry() for s in stored], vectors)
            self._indexes[(tenant, pid)] = (index, stored)
            while len(self._indexes) > self._cached:
                self._indexes.popitem(last=False)
            return index, stored

    def _ranges(self, txn, tenant: str, pid: int) -> list[tuple[int, int, int]]:
        """(owner pid, first seq, end seq) spans making up a process's memory, oldest first."""
        head = self._head(tenant, pid, txn)
        spans, start = [], 0
        for owner, upto in head.base:
            spans.append((owner, start, upto))
            start = upto
        spans.append((pid, start, 1 << 62))
        return spans

    def _load(self, txn, tenant: str, pid: int) -> list[Stored]:
        out = []
        for owner, first, end in self._ranges(txn, tenant, pid):
            lo = _prefix(tenant) + _KEY.pack(owner, first)
            hi = _prefix(tenant) + _KEY.pack(owner, end)
            for key, raw in self._scan(txn, self._entries, lo, hi):
                seq = _KEY.unpack(bytes(key)[-_KEY.size:])[1]
                out.append(Stored(seq=seq, **_unpack(raw)))
        return out

    def _load_vectors(self, txn, tenant: str, pid: int, stored: list[Stored]) -> np.ndarray:
        rows = []
        for owner, first, end in self._ranges(txn, tenant, pid):
            lo = _prefix(tenant) + _KEY.pack(owner, first)
            hi = _prefix(tenant) + _KEY.pack(owner, end)
            rows.extend(np.frombuffer(raw, dtype=np.float32)
                        for _, raw in self._scan(txn, self._vectors, lo, hi))
        if len(rows) != len(stored):
            raise NotFound(f"memory of process {pid} is missing vectors")
        return np.stack(rows) if rows else np.zeros((0, self._embedder.dim), np.float32)

    @staticmethod
    def _scan(txn, db, lo: bytes, hi: bytes):
        cursor = txn.cursor(db=db)
        if not cursor.set_range(lo):
            return
        for key, raw in cursor:
            if bytes(key) >= hi:
                return
            yield key, raw

    def _head(self, tenant: str, pid: int, txn=None) -> MemoryHead:
        key = _prefix(tenant) + struct.pack(">Q", pid)
        if txn is None:
            with self._env.begin() as own:
                raw = own.get(key, db=self._heads)
        else:
            raw = txn.get(key, db=self._heads)
        if raw is None:
            return MemoryHead()
        data = _unpack(raw)
        data["base"] = [tuple(b) for b in data.get("base", [])]
        return MemoryHead(**data)

    def _put_head(self, txn, tenant: str, pid: int, head: MemoryHead) -> None:
        txn.put(_prefix(tenant) + struct.pack(">Q", pid),
                _pack({**head.__dict__, "base": [list(b) for b in head.base]}), db=self._heads)
