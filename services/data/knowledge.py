"""Tenant knowledge collections: documents as chunks in LMDB, hybrid BM25 + dense search."""

from __future__ import annotations

import hashlib
import re
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import lmdb
import numpy as np

from vfmos_runtime.storage import pack as _pack
from vfmos_runtime.storage import unpack as _unpack
from vfmos_runtime.protocol import MAX_TENANT
from vfmos_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.data.chunking import Chunk, chunk_blocks
from vfmos_runtime.embed import Embedder
from services.data.lexical import BM25Index
from services.data.parsers import Document, normalise_kind, parse
from services.data.vindex import ANN_THRESHOLD, VectorIndex

# Bump when parsing or chunking changes, so re-ingesting an unchanged file re-chunks it.
CHUNKER_VERSION = 1
# Texts per embedder call: between two calls an ingest checks whether its caller went away and
# lets a waiting tenant have its CPU slot (~0.3 s of MiniLM on one core; measured: batches
# of 8 to 128 chunks embed at the same rate).
EMBED_BATCH = 8
RRF_K = 60
MIN_DEPTH = 50             # candidates each retriever contributes to the fusion
MAX_K = 1000
MAX_SOURCE_CHARS = 4096
MAX_META_KEYS = 64
MAX_META_CHARS = 4096
RESERVED_META = frozenset({"ingested_at", "source_mtime", "kind"})
# Filters on these keys match the chunk's own fields; any other key matches caller meta.
BUILTIN_FILTERS = ("source", "kind", "title", "page")
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID = struct.Struct(">Q")  # big-endian: LMDB's key order is chunk id order
# A loaded collection with this share of removed rows is dropped and reloaded on next search
# (BM25 cannot remove documents; their scores are masked until then).
MAX_DEAD_SHARE = 0.3


@dataclass
class CollectionInfo:
    name: str
    description: str
    chunks: int
    sources: int
    created_at: float
    embedder: str = ""


@dataclass
class IngestResult:
    source: str
    chunks: int
    skipped_unchanged: bool
    replaced: int


@dataclass(frozen=True)
class Position:
    """Where a chunk sits in its source: chunk index, and page, heading or records."""

    index: int
    page: int | None = None
    heading: str = ""
    records: tuple[int, int] | None = None

    def __str__(self) -> str:
        parts = [f"chunk {self.index}"]
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.records:
            first, last = self.records
            parts.append(f"record {first}" if first == last else f"records {first}-{last}")
        if self.heading:
            parts.append(self.heading)
        return ", ".join(parts)


@dataclass
class Hit:
    chunk_id: int
    score: float
    text: str
    source: str
    title: str
    position: Position
    meta: dict[str, str]
    ingested_at: float = 0.0
    mtime: float | None = None


# stage ("parsing", "embedding", "storing"), done, total (bytes for parsing, else chunks)
Progress = Callable[[str, int, int], None]


def _no_checkpoint() -> None:
    pass


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# storage
def _tenant_key(tenant: str) -> bytes:
    if not tenant or len(tenant) > MAX_TENANT or "\x00" in tenant:
        raise InvalidArgument("a tenant is required (the kernel sets it)")
    return tenant.encode() + b"\x00"


def _check_name(name: str) -> str:
    if not _COLLECTION_NAME.match(name or ""):
        raise InvalidArgument(f"bad collection name {name!r}: 1-64 letters, digits, . _ -, "
                              "starting with a letter or digit")
    return name


class KnowledgeStore:
    """The LMDB layout. Every key starts with tenant NUL (collection NUL), so one tenant's
    data is one prefix and no listing can cross tenants; sources are keyed by a hash of
    their name because LMDB keys stop at 511 bytes."""

    def __init__(self, env: lmdb.Environment):
        self.env = env
        self.collections = env.open_db(b"k_collections")
        self.chunks = env.open_db(b"k_chunks")
        self.vectors = env.open_db(b"k_vectors")
        self.sources = env.open_db(b"k_sources")

    @staticmethod
    def prefix(tenant: str, collection: str) -> bytes:
        return _tenant_key(tenant) + collection.encode() + b"\x00"

    def collection(self, txn, tenant: str, name: str) -> dict | None:
        raw = txn.get(_tenant_key(tenant) + name.encode(), db=self.collections)
        return _unpack(raw) if raw is not None else None

    def put_collection(self, txn, tenant: str, name: str, record: dict) -> None:
        txn.put(_tenant_key(tenant) + name.encode(), _pack(record), db=self.collections)

    def list_collections(self, txn, tenant: str) -> list[tuple[str, dict]]:
        prefix = _tenant_key(tenant)
        return [(bytes(k[len(prefix):]).decode(), _unpack(v))
                for k, v in self._scan(txn, self.collections, prefix)]

    @staticmethod
    def source_key(prefix: bytes, source: str) -> bytes:
        return prefix + hashlib.blake2b(source.encode(), digest_size=16).digest()

    def source(self, txn, prefix: bytes, source: str) -> dict | None:
        raw = txn.get(self.source_key(prefix, source), db=self.sources)
        return _unpack(raw) if raw is not None else None

    def put_chunk(self, txn, prefix: bytes, chunk_id: int, record: dict,
                  vector: np.ndarray) -> None:
        key = prefix + _ID.pack(chunk_id)
        txn.put(key, _pack(record), db=self.chunks)
        txn.put(key, np.ascontiguousarray(vector, dtype=np.float32).tobytes(), db=self.vectors)

    def chunk(self, txn, prefix: bytes, chunk_id: int) -> dict | None:
        raw = txn.get(prefix + _ID.pack(chunk_id), db=self.chunks)
        return _unpack(raw) if raw is not None else None

    def delete_chunks(self, txn, prefix: bytes, ids: list[int]) -> None:
        for chunk_id in ids:
            key = prefix + _ID.pack(chunk_id)
            txn.delete(key, db=self.chunks)
            txn.delete(key, db=self.vectors)

    def scan_chunks(self, txn, prefix: bytes) -> Iterator[tuple[int, dict, np.ndarray]]:
        """Every chunk of a collection with its vector, in id order (both databases share
        the keys, so two cursors walk them in step)."""
        vectors = self._scan(txn, self.vectors, prefix)
        for (key, raw), (vkey, vraw) in zip(self._scan(txn, self.chunks, prefix), vectors):
            if bytes(key) != bytes(vkey):
                raise lmdb.CorruptedError(f"chunk and vector keys differ at {bytes(key)!r}")
            yield (_ID.unpack(bytes(key[len(prefix):]))[0], _unpack(raw),
                   np.frombuffer(bytes(vraw), dtype=np.float32))

    def delete_collection(self, txn, tenant: str, name: str) -> None:
        prefix = self.prefix(tenant, name)
        for db in (self.chunks, self.vectors, self.sources):
            keys = [bytes(k) for k, _ in self._scan(txn, db, prefix)]
            for key in keys:
                txn.delete(key, db=db)
        txn.delete(_tenant_key(tenant) + name.encode(), db=self.collections)

    @staticmethod
    def _scan(txn, db, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cursor = txn.cursor(db=db)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not bytes(key).startswith(prefix):
                return
            yield key, value


# time and metadata
def _as_epoch(when: datetime | float | None) -> float | None:
    if when is None:
        return None
    if isinstance(when, (int, float)):
        return float(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # naive times are UTC, as the wire's are
    return when.timestamp()


def _meta_time(meta: dict[str, str]) -> float | None:
    """A caller's `time` or `date` meta as unix seconds (a number or ISO 8601)."""
    for key in ("time", "date"):
        value = meta.get(key, "").strip()
        if not value:
            continue
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return _as_epoch(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
    return None


def _clean_meta(meta: dict | None) -> dict[str, str]:
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    if len(meta) > MAX_META_KEYS:
        raise InvalidArgument(f"at most {MAX_META_KEYS} meta keys, got {len(meta)}")
    for key, value in meta.items():
        if not key or len(key) > 128 or len(value) > MAX_META_CHARS:
            raise InvalidArgument(f"bad meta {key[:40]!r}: keys 1-128 characters, values at "
                                  f"most {MAX_META_CHARS}")
        if key in RESERVED_META:
            raise InvalidArgument(f"meta key {key!r} is reserved (set by the Data Agent)")
    return meta


def _check_source(source: str) -> str:
    if not source or len(source) > MAX_SOURCE_CHARS or "\x00" in source:
        raise InvalidArgument(f"a source name is required (1-{MAX_SOURCE_CHARS} characters)")
    return source


def _title(doc: Document, chunk: Chunk) -> str:
    return " > ".join(chunk.headings) if chunk.headings else doc.title


def _indexed_text(title: str, text: str) -> str:
    # The heading path is part of what a chunk is about: "## Refunds" above "within 30
    # days" is what makes it answer "refund window".
    return f"{title}\n{text}" if title else text


def _rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked id lists: sum of 1 / (k + rank), best first.
    (services/data/fusion.rrf works on dense score arrays; ours are short id lists.)"""
    total: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            total[item] = total.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(total.items(), key=lambda pair: (-pair[1], pair[0]))


# search structures
class _LoadedCollection:
    """One collection's search structures in memory, built from LMDB on its first search.
    Rows are BM25 document numbers; removed rows stay (masked) until a reload."""

    def __init__(self, dim: int, ann_threshold: int):
        self.vectors = VectorIndex(dim, ann_threshold)
        self.bm25 = BM25Index()
        self.ids: list[int] = []
        self.row_of: dict[int, int] = {}
        self._times: list[float] = []
        self._alive: list[bool] = []
        self._postings: dict[str, dict[str, list[int]]] = {}
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def dead_share(self) -> float:
        return 1.0 - len(self.row_of) / len(self.ids) if self.ids else 0.0

    def add(self, items: list[tuple[int, dict, np.ndarray]]) -> None:
        if not items:
            return
        for chunk_id, record, _ in items:
            row = len(self.ids)
            self.ids.append(chunk_id)
            self.row_of[chunk_id] = row
            self._times.append(record["time"])
            self._alive.append(True)
            fields = {**record["meta"], "source": record["source"], "kind": record["kind"],
                      "title": record["title"], "page": str(record.get("page") or "")}
            for key, value in fields.items():
                self._postings.setdefault(key, {}).setdefault(value, []).append(row)
        self.bm25.add([_indexed_text(r["title"], r["text"]) for _, r, _ in items])
        self.vectors.add([i for i, _, _ in items], np.stack([v for _, _, v in items]))
        self._arrays = None

    def remove(self, ids: list[int]) -> None:
        for chunk_id in ids:
            row = self.row_of.pop(chunk_id, None)
            if row is not None:
                self._alive[row] = False
        self.vectors.remove(ids)
        self._arrays = None

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.asarray(self.ids, dtype=np.int64),
                            np.asarray(self._times, dtype=np.float64),
                            np.asarray(self._alive, dtype=bool))
        return self._arrays

    def allowed_rows(self, filters: dict[str, str], since: float | None,
                     until: float | None) -> np.ndarray:
        """Mask of the live rows that pass the metadata equality filters and time window."""
        _, times, alive = self._columns()
        mask = alive.copy()
        for key, value in filters.items():
            rows = self._postings.get(key, {}).get(value, [])
            keep = np.zeros(len(mask), dtype=bool)
            keep[rows] = True
            mask &= keep
        if since is not None:
            mask &= times >= since
        if until is not None:
            mask &= times <= until
        return mask

    def search(self, query: str, vector: np.ndarray, k: int, filters: dict[str, str],
               since: float | None, until: float | None) -> list[tuple[int, float]]:
        """Fused BM25 + dense ranking of chunk ids, best first."""
        if not self.row_of:
            return []
        ids, _, alive = self._columns()
        narrowed = bool(filters) or since is not None or until is not None
        mask = self.allowed_rows(filters, since, until) if narrowed else alive
        if not mask.any():
            return []
        depth = max(MIN_DEPTH, 4 * k)
        dense = self.vectors.search(vector, depth, allowed=ids[mask] if narrowed else None)
        scores = np.where(mask, self.bm25.scores(query), 0.0)
        top = np.argpartition(-scores, depth)[:depth] if len(scores) > depth \
            else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        lexical = [int(ids[row]) for row in top if scores[row] > 0]
        return _rrf([[i for i, _ in dense], lexical])[:k]


class KnowledgeBase:
    """Knowledge collections of every tenant over one LMDB environment; thread-safe."""

    def __init__(self, env: lmdb.Environment, embedder: Embedder,
                 ann_threshold: int = ANN_THRESHOLD, cached_collections: int = 16,
                 embed_batch: int = EMBED_BATCH):
        self.store = KnowledgeStore(env)
        self._embed_batch = embed_batch
        self._env = env
        self._embedder = embedder
        self._ann_threshold = ann_threshold
        self._cached = cached_collections
        # One lock for writes and the loaded indexes (neither BM25 nor faiss is thread-safe);
        # parsing and embedding run outside it.
        self._lock = threading.RLock()
        self._loaded: OrderedDict[tuple[str, str], _LoadedCollection] = OrderedDict()

    # collections
    def create_collection(self, tenant: str, name: str, description: str = "") -> CollectionInfo:
        _check_name(name)
        if len(description) > 1024:
            raise InvalidArgument("a description is at most 1024 characters")
        record = {"description": description, "created_at": time.time(), "next_id": 0,
                  "chunks": 0, "sources": 0, "embedder": self._embedder.name,
                  "dim": int(self._embedder.dim)}
        with self._lock, self._env.begin(write=True) as txn:
            if self.store.collection(txn, tenant, name) is not None:
                raise AlreadyExists(f"collection {name!r} exists")
            self.store.put_collection(txn, tenant, name, record)
        return _info(name, record)

    def list_collections(self, tenant: str) -> list[CollectionInfo]:
        with self._env.begin() as txn:
            return [_info(name, rec) for name, rec in self.store.list_collections(txn, tenant)]

    def get_collection(self, tenant: str, name: str) -> CollectionInfo:
        with self._env.begin() as txn:
            return _info(name, self._collection(txn, tenant, name))

    def delete_collection(self, tenant: str, name: str) -> int:
        """Delete a collection with all its chunks; returns how many chunks it had."""
        with self._lock, self._env.begin(write=True) as txn:
            record = self._collection(txn, tenant, name)
            self.store.delete_collection(txn, tenant, name)
            self._loaded.pop((tenant, name), None)
        return record["chunks"]

    def _collection(self, txn, tenant: str, name: str) -> dict:
        record = self.store.collection(txn, tenant, name) if _COLLECTION_NAME.match(name or "") \
            else None
        if record is None:
            raise NotFound(f"no collection {name!r}")
        return record

    def _check_embedder(self, name: str, record: dict) -> None:
        if record["dim"] != self._embedder.dim or record["embedder"] != self._embedder.name:
            raise FailedPrecondition(
                f"collection {name!r} was embedded with {record['embedder']} "
                f"({record['dim']}-d) but the Data Agent runs {self._embedder.name}; "
                "re-create the collection and ingest again")

    # documents
    def ingest(self, tenant: str, collection: str, source: str, data: bytes,
               kind: str | None = None, mtime: float | None = None,
               meta: dict | None = None, checkpoint: Callable[[], None] = _no_checkpoint,
               progress: Progress | None = None) -> IngestResult:
        """Parse, chunk, embed and store one document. A source ingested before is replaced
        (all its old chunks, in the same transaction) unless its content is unchanged.
        `checkpoint()` is called between batches (it raises to stop the ingest: nothing is
        stored then); `progress(stage, done, total)` hears how far it is."""
        _check_source(source)
        meta = _clean_meta(meta)
        kind = normalise_kind(kind)
        digest = _digest(data, kind, meta, self._embedder.name)
        prefix = self.store.prefix(tenant, collection)
        with self._env.begin() as txn:
            self._check_embedder(collection, self._collection(txn, tenant, collection))
            old = self.store.source(txn, prefix, source)
        if old is not None and old["hash"] == digest:
            return IngestResult(source, len(old["ids"]), skipped_unchanged=True, replaced=0)
        report = progress or _no_progress
        report("parsing", 0, len(data))
        doc = parse(data, source, kind)
        checkpoint()
        chunks = chunk_blocks(doc.blocks)
        records = self._chunk_records(doc, chunks, source, mtime, meta)
        checkpoint()
        vectors = self._embed([_indexed_text(r["title"], r["text"]) for r in records],
                              checkpoint, report)
        report("storing", len(records), len(records))
        return self._commit(tenant, collection, source, digest, doc.kind, mtime, records,
                            vectors)

    def _chunk_records(self, doc: Document, chunks: list[Chunk], source: str,
                       mtime: float | None, meta: dict[str, str]) -> list[dict]:
        now = time.time()
        when = _meta_time(meta)
        return [{"text": c.text, "title": _title(doc, c), "headings": list(c.headings),
                 "index": c.index, "page": c.page,
                 "records": list(c.records) if c.records else None, "source": source,
                 "kind": doc.kind, "ingested_at": now, "mtime": mtime, "meta": meta,
                 # what since/until filter on: the caller's time or date, else ingestion
                 "time": when if when is not None else now}
                for c in chunks]

    def _embed(self, texts: list[str], checkpoint: Callable[[], None] = _no_checkpoint,
               report: Progress | None = None) -> np.ndarray:
        step, parts = self._embed_batch, []
        for i in range(0, len(texts), step):
            if report:
                report("embedding", i, len(texts))
            parts.append(self._embedder.embed(texts[i:i + step]))
            checkpoint()
        return np.concatenate(parts) if parts else np.zeros((0, self._embedder.dim), np.float32)

    def _commit(self, tenant: str, collection: str, source: str, digest: str, kind: str,
                mtime: float | None, records: list[dict], vectors: np.ndarray) -> IngestResult:
        """Replace the source's chunks in one write transaction: readers and a crash see
        either all of the old chunks or all of the new ones."""
        prefix = self.store.prefix(tenant, collection)
        with self._lock:
            with self._env.begin(write=True) as txn:
                info = self._collection(txn, tenant, collection)  # it may be gone meanwhile
                old = self.store.source(txn, prefix, source)
                old_ids = old["ids"] if old else []
                self.store.delete_chunks(txn, prefix, old_ids)
                ids = list(range(info["next_id"], info["next_id"] + len(records)))
                for chunk_id, record, vector in zip(ids, records, vectors):
                    self.store.put_chunk(txn, prefix, chunk_id, record, vector)
                txn.put(self.store.source_key(prefix, source), _pack(
                    {"source": source, "hash": digest, "ids": ids, "kind": kind,
                     "ingested_at": time.time(), "mtime": mtime}), db=self.store.sources)
                info.update(next_id=info["next_id"] + len(records),
                            chunks=info["chunks"] - len(old_ids) + len(records),
                            sources=info["sources"] + (old is None))
                self.store.put_collection(txn, tenant, collection, info)
            self._update_loaded((tenant, collection), old_ids,
                                list(zip(ids, records, vectors)))
        return IngestResult(source, len(records), skipped_unchanged=False, replaced=len(old_ids))

    def delete_source(self, tenant: str, collection: str, source: str) -> int:
        """Remove every chunk of one source; returns how many there were."""
        prefix = self.store.prefix(tenant, collection)
        with self._lock:
            with self._env.begin(write=True) as txn:
                info = self._collection(txn, tenant, collection)
                old = self.store.source(txn, prefix, source)
                if old is None:
                    raise NotFound(f"no source {source!r} in collection {collection!r}")
                self.store.delete_chunks(txn, prefix, old["ids"])
                txn.delete(self.store.source_key(prefix, source), db=self.store.sources)
                info.update(chunks=info["chunks"] - len(old["ids"]), sources=info["sources"] - 1)
                self.store.put_collection(txn, tenant, collection, info)
            self._update_loaded((tenant, collection), old["ids"], [])
        return len(old["ids"])

    def _update_loaded(self, key: tuple[str, str], removed: list[int],
                       added: list[tuple[int, dict, np.ndarray]]) -> None:
        loaded = self._loaded.get(key)
        if loaded is None:
            return  # loads fresh from LMDB on its next search
        loaded.remove(removed)
        loaded.add(added)
        if loaded.dead_share > MAX_DEAD_SHARE:
            del self._loaded[key]

    # search
    def search(self, tenant: str, collection: str, query: str, k: int = 10,
               filters: dict | None = None, since: datetime | float | None = None,
               until: datetime | float | None = None) -> list[Hit]:
        """The k best chunks for `query`: BM25 and dense rankings fused by reciprocal rank.
        `filters` match chunk meta (or source, kind, title, page) exactly; since/until bound
        the chunk's time (its `time`/`date` meta, else when it was ingested)."""
        if not query or not query.strip():
            raise InvalidArgument("an empty query")
        if not 0 < k <= MAX_K:
            raise InvalidArgument(f"k must be 1..{MAX_K}, got {k}")
        filters = {str(key): str(value) for key, value in (filters or {}).items()}
        with self._env.begin() as txn:
            self._check_embedder(collection, self._collection(txn, tenant, collection))
        vector = self._embedder.embed([query])[0]
        prefix = self.store.prefix(tenant, collection)
        with self._lock:
            loaded = self._load(tenant, collection)
            ranked = loaded.search(query, vector, k, filters, _as_epoch(since), _as_epoch(until))
            with self._env.begin() as txn:
                found = [(self.store.chunk(txn, prefix, i), score) for i, score in ranked]
        return [_hit(i, score, record) for (i, _), (record, score) in zip(ranked, found)
                if record is not None]

    def _load(self, tenant: str, collection: str) -> _LoadedCollection:
        key = (tenant, collection)
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            return loaded
        loaded = _LoadedCollection(self._embedder.dim, self._ann_threshold)
        batch: list[tuple[int, dict, np.ndarray]] = []
        with self._env.begin() as txn:
            self._collection(txn, tenant, collection)
            for item in self.store.scan_chunks(txn, self.store.prefix(tenant, collection)):
                batch.append(item)
                if len(batch) == 8192:  # bounds the vector copies made per add
                    loaded.add(batch)
                    batch = []
        loaded.add(batch)
        self._loaded[key] = loaded
        while len(self._loaded) > self._cached:
            self._loaded.popitem(last=False)
        return loaded


def _digest(data: bytes, kind: str | None, meta: dict[str, str], embedder: str) -> str:
    """What decides "unchanged": the bytes, and everything that shapes the chunks."""
    h = hashlib.sha256(data)
    h.update(_pack([CHUNKER_VERSION, kind or "", sorted(meta.items()), embedder]))
    return h.hexdigest()


def _info(name: str, record: dict) -> CollectionInfo:
    return CollectionInfo(name=name, description=record["description"],
                          chunks=record["chunks"], sources=record["sources"],
                          created_at=record["created_at"], embedder=record["embedder"])


def _hit(chunk_id: int, score: float, record: dict) -> Hit:
    meta = dict(record["meta"])
    meta["kind"] = record["kind"]
    meta["ingested_at"] = datetime.fromtimestamp(record["ingested_at"], timezone.utc).isoformat()
    if record["mtime"]:
        meta["source_mtime"] = datetime.fromtimestamp(record["mtime"], timezone.utc).isoformat()
    records = tuple(record["records"]) if record["records"] else None
    position = Position(index=record["index"], page=record["page"],
                        heading=" > ".join(record["headings"]), records=records)
    return Hit(chunk_id=chunk_id, score=score, text=record["text"], source=record["source"],
               title=record["title"], position=position, meta=meta,
               ingested_at=record["ingested_at"], mtime=record["mtime"])
