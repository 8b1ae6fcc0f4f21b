"""gRPC adapters of the kernel's ports: the only kernel code that builds model/data protobufs.

Each adapter gets its channel from the `ServiceRegistry`, converts between the wire's
messages and the domain types of `kernel/ports.py`, and turns RPC errors into the kernel's
vocabulary (an UNAVAILABLE makes the registry check the service's health at once).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from kernel.memory import Candidates, Item
from kernel.ports import (CandidatesQuery, CandidatesReply, GenerateCall, GenPiece, MemoryEntry,
                          ModelInfo)
from kernel.registry import ServiceRegistry
from vfmos_runtime.errors import Unavailable, VfmError, from_rpc_error
from vfmos_runtime.protocol import DATA_SERVICE, MODEL_SERVICE
from vfmos.data.v1 import data_pb2, data_pb2_grpc
from vfmos.model.v1 import model_pb2, model_pb2_grpc

LIST_MODELS_TIMEOUT_S = 5.0
DATA_CALL_TIMEOUT_S = 30.0
INGEST_TIMEOUT_S = 3600.0


def _service_error(registry: ServiceRegistry, service: str, exc: grpc.RpcError) -> VfmError:
    err = from_rpc_error(exc)
    if err.code == grpc.StatusCode.UNAVAILABLE:
        registry.suspect(service)
        return Unavailable(f"service {service} is unavailable: {err.message}")
    return err


# model service
class GrpcModelClient:
    """`ModelClient` over vfm-modeld's gRPC API."""

    def __init__(self, registry: ServiceRegistry):
        self._registry = registry

    def _stub(self) -> model_pb2_grpc.ModelStub:
        return model_pb2_grpc.ModelStub(self._registry.channel(MODEL_SERVICE))

    def generate(self, call: GenerateCall) -> "_GenerateStream":
        return _GenerateStream(self, _generate_request(call))

    async def list_models(self) -> list[ModelInfo]:
        try:
            reply = await self._stub().ListModels(
                model_pb2.ListModelsRequest(), timeout=LIST_MODELS_TIMEOUT_S,
                metadata=self._registry.metadata(MODEL_SERVICE))
        except grpc.RpcError as exc:
            # Whatever went wrong, the kernel cannot route asks without the model list.
            self._registry.suspect(MODEL_SERVICE)
            raise Unavailable(f"service {MODEL_SERVICE} is unavailable: "
                              f"{from_rpc_error(exc).message}") from None
        return [ModelInfo(name=m.name, backend=m.backend, context_window=m.context_window,
                          cost_per_1k_tokens=m.cost_per_1k_tokens, loaded=m.loaded,
                          is_default=m.is_default, max_batch=m.max_batch)
                for m in reply.models]


class _GenerateStream:
    """One `Generate` call read message by message (`call.read()`: no async generator in
    between, this loop runs once per streamed token)."""

    def __init__(self, client: GrpcModelClient, request: model_pb2.GenerateRequest):
        self._client = client
        self._request = request
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()  # the model service drops the sequence within one decode step

    def __aiter__(self) -> AsyncIterator[GenPiece]:
        return self

    async def __anext__(self) -> GenPiece:
        call = self._call
        if call is None:
            if self._cancelled:
                raise StopAsyncIteration
            call = self._call = self._client._stub().Generate(
                self._request, metadata=self._client._registry.metadata(MODEL_SERVICE))
        try:
            chunk = await call.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._cancelled and not (task and task.cancelling()):
                raise StopAsyncIteration from None  # our own cancel: the stream just ends
            raise
        except grpc.RpcError as exc:
            raise _service_error(self._client._registry, MODEL_SERVICE, exc) from None
        if chunk is grpc.aio.EOF:
            raise StopAsyncIteration
        return GenPiece(chunk.text, chunk.tokens, chunk.token_ids, chunk.prompt_tokens,
                        chunk.done, chunk.finish_reason)


def _generate_request(call: GenerateCall) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        model=call.model,
        messages=[model_pb2.ChatMessage(role=m.role, content=m.content) for m in call.messages],
        max_new_tokens=call.max_new_tokens, assistant_prefix=call.assistant_prefix,
        assistant_prefix_ids=call.assistant_prefix_ids, temperature=call.temperature,
        top_p=call.top_p, seed=call.seed, stop=list(call.stop), priority=call.priority)


# data service
class GrpcDataClient:
    """`DataClient` (and the syscalls' `DataRelay`) over vfm-datad's gRPC API."""

    def __init__(self, registry: ServiceRegistry):
        self._registry = registry

    def _stub(self) -> data_pb2_grpc.DataStub:
        return data_pb2_grpc.DataStub(self._registry.channel(DATA_SERVICE))

    def _error(self, exc: grpc.RpcError) -> VfmError:
        return _service_error(self._registry, DATA_SERVICE, exc)

    async def forward(self, method: str, request, timeout: float = DATA_CALL_TIMEOUT_S):
        """One unary call to vfm-datad, its errors in our vocabulary."""
        try:
            return await getattr(self._stub(), method)(
                request, timeout=timeout, metadata=self._registry.metadata(DATA_SERVICE))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def ingest(self, parts: AsyncIterator):
        try:
            return await self._stub().Ingest(parts, timeout=INGEST_TIMEOUT_S,
                                             metadata=self._registry.metadata(DATA_SERVICE))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def candidates(self, query: CandidatesQuery) -> CandidatesReply:
        reply = await self.forward("Candidates", data_pb2.CandidatesRequest(
            tenant=query.tenant, pid=query.pid, question=query.question, limit=query.limit,
            recent=query.recent, collections=list(query.collections),
            knowledge_k=query.knowledge_k, now=query.now))
        return CandidatesReply(_candidates(reply), reply.pages)

    async def remember(self, tenant: str, pid: int, entries: list[MemoryEntry]) -> None:
        await self.forward("Remember", data_pb2.RememberRequest(
            tenant=tenant, pid=pid,
            entries=[data_pb2.MemoryEntry(speaker=e.speaker, text=e.text, time=e.time)
                     for e in entries]))

    async def fork_memory(self, tenant: str, parent: int, child: int) -> None:
        await self.forward("ForkMemory", data_pb2.ForkMemoryRequest(
            tenant=tenant, parent=parent, child=child))


def _entry_item(kind: str, e: data_pb2.MemoryEntry, score: float = 0.0) -> Item:
    return Item(kind=kind, text=e.line or f"{e.speaker}: {e.text}", tokens=e.tokens,
                source_ids=[f"mem:{e.seq}", f"page:{e.page}"], score=score, page=e.page,
                seq=e.seq, speaker=e.speaker, time=e.time, meta=dict(e.meta), group=e.group,
                group_tokens=e.group_tokens)


def _candidates(reply: data_pb2.CandidatesResponse) -> Candidates:
    knowledge = [Item(kind="knowledge", text=f"[{h.title or h.source}] {h.text}",
                      tokens=h.tokens or max(1, len(h.text) // 4),
                      source_ids=[f"{h.collection}/{h.chunk_id}"], score=h.score,
                      meta={**h.meta, "source": h.source, "position": h.position})
                 for h in reply.knowledge]
    summaries = [Item(kind="summary", text=s.text, tokens=s.tokens,
                      source_ids=[f"pages:{s.first_page}-{s.last_page}"],
                      meta={"pages": f"{s.first_page}-{s.last_page}"})
                 for s in reply.summaries]
    return Candidates(pinned=[_entry_item("pinned", e) for e in reply.pinned],
                      recent=[_entry_item("recent", e) for e in reply.recent],
                      ranked=[_entry_item("memory", h.entry, h.score) for h in reply.ranked],
                      knowledge=knowledge, summaries=summaries)
