"""Thin gRPC servicer for vfmos.data.v1: translate, delegate to DataService, map errors."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError

from vfmos_runtime import validate
from vfmos_runtime.boundary import rpc as boundary
from vfmos_runtime.convert import enum_str, seconds, timestamp
from vfmos_runtime.errors import InvalidArgument
from services.data.memory import Stored
from services.data.service import DataService, check_tenant
from vfmos.data.v1 import data_pb2 as pb
from vfmos.data.v1 import data_pb2_grpc

log = logging.getLogger("vfm-datad.rpc")
rpc = boundary(log)
MAX_DOCUMENT_BYTES = 512 << 20


def entry_to_pb(s: Stored) -> pb.MemoryEntry:
    return pb.MemoryEntry(seq=s.seq, speaker=s.speaker, text=s.text, time=timestamp(s.time),
                          meta=s.meta,
                          pinned=s.pinned, tokens=s.tokens, page=s.page, line=s.line,
                          group=s.group, group_tokens=s.group_tokens)


def hit_to_pb(hit, collection: str = "", tokens: int = 0) -> pb.Hit:
    return pb.Hit(chunk_id=str(hit.chunk_id), score=hit.score, text=hit.text, source=hit.source,
                  title=hit.title or "", position=str(hit.position),
                  meta={str(k): str(v) for k, v in (hit.meta or {}).items()}, tokens=tokens,
                  collection=collection)


class DataServicer(data_pb2_grpc.DataServiceServicer):
    def __init__(self, service: DataService):
        self.s = service

    # knowledge
    @rpc
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context):
        tenant = check_tenant(request.tenant)
        c = await self.s.run(tenant, self.s.knowledge.create_collection, tenant, request.name,
                             request.description)
        return pb.CreateCollectionResponse(collection=_collection(c))

    @rpc
    async def ListCollections(self, request: pb.ListCollectionsRequest, context):
        tenant = check_tenant(request.tenant)
        items = await self.s.run(tenant, self.s.knowledge.list_collections, tenant)
        return pb.ListCollectionsResponse(collections=[_collection(c) for c in items])

    @rpc
    async def DeleteCollection(self, request: pb.DeleteCollectionRequest, context):
        tenant = check_tenant(request.tenant)
        n = await self.s.run(tenant, self.s.knowledge.delete_collection, tenant, request.name)
        return pb.DeleteCollectionResponse(chunks=n)

    @rpc
    async def Ingest(self, request_iterator, context):
        head, data = await _read_document(request_iterator)
        return await self._ingest(head, data)

    @rpc
    async def IngestWithProgress(self, request_iterator, context):
        head, data = await _read_document(_parts_of(request_iterator))
        loop, heard = asyncio.get_running_loop(), asyncio.Queue()

        def progress(stage: str, done: int, total: int) -> None:  # on the worker thread
            if stage != "parsing":
                loop.call_soon_threadsafe(heard.put_nowait, (done, total))

        work = asyncio.ensure_future(self._ingest(head, data, progress))
        try:
            while not work.done():
                waiting = asyncio.ensure_future(heard.get())
                await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    done, total = waiting.result()
                    yield pb.IngestWithProgressResponse(embedded=done, total=total)
                else:
                    waiting.cancel()
            yield pb.IngestWithProgressResponse(result=work.result())
        finally:
            work.cancel()  # the caller went away: its ingest stops at the next checkpoint

    async def _ingest(self, head: pb.IngestRequest, data: bytes,
                      progress=None) -> pb.IngestResponse:
        tenant = check_tenant(head.tenant)
        result = await self.s.run_batches(
            tenant, self.s.knowledge.ingest, tenant, head.collection, head.source,
            data, kind=enum_str(pb.DocumentKind, head.kind) or None,
            mtime=seconds(head, "mtime") or None, meta=dict(head.meta), progress=progress)
        return pb.IngestResponse(source=head.source, chunks=result.chunks,
                                 unchanged=result.skipped_unchanged, replaced=result.replaced)

    @rpc
    async def DeleteSource(self, request: pb.DeleteSourceRequest, context):
        tenant = check_tenant(request.tenant)
        n = await self.s.run(tenant, self.s.knowledge.delete_source, tenant, request.collection,
                             request.source)
        return pb.DeleteSourceResponse(chunks=n)

    @rpc
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        tenant = check_tenant(request.tenant)
        hits = await self.s.run(tenant, self.s.knowledge.search, tenant,
                                request.collection, request.query, k=request.k or 10,
                                filters=dict(request.filters) or None,
                                since=_when(seconds(request, "since")),
                                until=_when(seconds(request, "until")))
        return pb.SearchResponse(hits=[hit_to_pb(h, request.collection) for h in hits])

    @rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        tenant = check_tenant(request.tenant)
        texts = validate.embed_texts(request.texts)
        vectors, tokens = await self.s.run(tenant, self.s.embed, texts)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=row.tolist()) for row in vectors],
                                model=self.s.embedder.name, tokens=tokens)

    # episodic memory
    @rpc
    async def Remember(self, request: pb.RememberRequest, context) -> pb.RememberResponse:
        items = [{"speaker": e.speaker, "text": e.text, "time": seconds(e, "time"),
                  "meta": dict(e.meta), "pinned": e.pinned} for e in request.entries]
        tenant = check_tenant(request.tenant)
        first, count, pages = await self.s.run_batches(tenant, self.s.memory.remember, tenant,
                                                       request.pid, items,
                                                       exchange_id=request.exchange_id)
        return pb.RememberResponse(first_seq=first, count=count, pages=pages)

    @rpc
    async def Recall(self, request: pb.RecallRequest, context) -> pb.RecallResponse:
        tenant = check_tenant(request.tenant)
        hits = await self.s.run(tenant, self.s.memory.recall, tenant, request.pid,
                                request.query, request.k or 10, seconds(request, "now"))
        return pb.RecallResponse(hits=[pb.RecallHit(entry=entry_to_pb(s), score=score)
                                       for s, score in hits])

    @rpc
    async def Candidates(self, request: pb.CandidatesRequest, context) -> pb.CandidatesResponse:
        tenant = check_tenant(request.tenant)

        def gather():  # one turn on a CPU slot for the three lookups, not three waits
            found = self.s.memory.candidates(tenant, request.pid, request.question,
                                             request.limit or 200, request.recent,
                                             seconds(request, "now"))
            chunks = self.s.knowledge_for(tenant, list(request.collections), request.question,
                                          request.knowledge_k or 8) \
                if request.collections and request.question.strip() else []
            return found, chunks, self.s.summaries.list(tenant, request.pid)

        found, chunks, summaries = await self.s.run(tenant, gather)
        knowledge = [hit_to_pb(h, name, n) for h, name, n in chunks]
        return pb.CandidatesResponse(
            summaries=[pb.Summary(first_page=x.first_page, last_page=x.last_page, text=x.text,
                                  tokens=x.tokens) for x in summaries],
            pinned=[entry_to_pb(s) for s in found.pinned],
            recent=[entry_to_pb(s) for s in found.recent],
            ranked=[pb.RecallHit(entry=entry_to_pb(s), score=score) for s, score in found.ranked],
            knowledge=knowledge, pages=found.pages,
            entries=found.entries)

    @rpc
    async def Forget(self, request: pb.ForgetRequest, context) -> pb.ForgetResponse:
        tenant = check_tenant(request.tenant)
        n = await self.s.run(tenant, self.s.memory.forget, tenant, request.pid)
        return pb.ForgetResponse(entries=n)

    @rpc
    async def ForkMemory(self, request: pb.ForkMemoryRequest, context) -> pb.ForkMemoryResponse:
        tenant = check_tenant(request.tenant)
        n = await self.s.run(tenant, self.s.memory.fork, tenant, request.parent, request.child)
        return pb.ForkMemoryResponse(shared=n)


def _collection(c) -> pb.Collection:
    return pb.Collection(name=c.name, description=c.description, chunks=c.chunks,
                         sources=c.sources, create_time=timestamp(c.created_at))


def _when(seconds: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc) if seconds else None


async def _read_document(parts) -> tuple[pb.IngestRequest, bytes]:
    """The header (first part) and the whole document, refusing oversize uploads early."""
    head, chunks, size = None, [], 0
    async for part in _decoded(parts):
        if head is None:
            head = part
        size += len(part.data)
        if size > MAX_DOCUMENT_BYTES:
            raise InvalidArgument(f"document larger than {MAX_DOCUMENT_BYTES >> 20} MiB; "
                                  "split it before ingesting")
        chunks.append(part.data)
    if head is None:
        raise InvalidArgument("empty ingest stream: no document header")
    if not head.source:
        raise InvalidArgument("a document needs a source name")
    return head, b"".join(chunks)


async def _parts_of(messages):
    async for message in _decoded(messages):
        yield message.part


async def _decoded(parts):
    """The stream's parts; one that is not an IngestRequest is bad input, not a crash."""
    parts, n = aiter(parts), 0
    while True:
        try:
            part = await anext(parts)
        except StopAsyncIteration:
            return
        except DecodeError:
            raise InvalidArgument(f"part {n} of the Ingest stream is not an IngestRequest "
                                  "message") from None
        n += 1
        yield part
