"""gRPC adapters of the kernel's ports: the only kernel code that builds model/data/trust protobufs.

Each adapter gets its channel from the `ServiceRegistry`, converts between the wire's
messages and the domain types of `kernel/ports.py`, and turns RPC errors into the kernel's
vocabulary (an UNAVAILABLE makes the registry check the service's health at once).
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Sequence

import grpc

from kernel.memory import Candidates, Item
from kernel.ports import (AdaptJob, CandidatesQuery, CandidatesReply, CheckResult, GenerateCall,
                          RouteCandidate, RouteDecision,
                          ItemVerdict, MemoryEntry, ModelInfo, OutputDecision, Placeholder,
                          Pseudonymized, ScreenItem, Screening, TrustPolicy, TrustScope,
                          TrustSpan, Verdict, Verification)
from kernel.model_mux import ModelMux, MuxStream
from kernel.registry import ServiceRegistry
from vfmos_runtime.convert import enum_str, enum_value, seconds, timestamp
from vfmos_runtime.errors import DeadlineExceeded, Unavailable, VfmError, from_rpc_error
from vfmos_runtime.protocol import DATA_SERVICE, MODEL_SERVICE, TRUST_SERVICE
from vfmos_runtime.types import RoutePolicy
from vfmos.data.v1 import data_pb2, data_pb2_grpc
from vfmos.kernel.v1 import kernel_pb2 as kpb
from vfmos.model.v1 import model_pb2, model_pb2_grpc
from vfmos.trust.v1 import trust_pb2, trust_pb2_grpc

# Every call to a service has a deadline sized by its work, with room for a busy machine.
LIST_MODELS_TIMEOUT_S = 5.0
DATA_CALL_TIMEOUT_S = 30.0          # a lookup, a search, a working set's candidates
# Embedding one entry takes 5-10 ms on an idle core; under fair sharing with other tenants'
# work a bulk Remember of 200 took over 40 s (bench noisy_neighbour), so: 4 entries/s.
REMEMBER_S_PER_ENTRY = 0.25
EMBED_S_PER_TEXT = 0.25            # a 256-token text on a busy core
GENERATE_BASE_S = 120.0             # prefill of a long prompt on CPU, and a wait for a slot
GENERATE_S_PER_TOKEN = 0.5          # decode runs at 5-20 tokens/s per row here
INGEST_PART_TIMEOUT_S = 60.0        # between two parts of an upload, either way
INGEST_BASE_S = 120.0
# A thirteenth of the measured parse + embed rate (26 KB/s): bulk embedding runs niced and
# fair-shared, so on a busy machine (a 200 KB document while two other tenants worked, under
# a soak) it ran far below that; the deadline is there to catch a stuck service, not slow work.
INGEST_BYTES_PER_S = 2_000.0
INGEST_MAX_S = INGEST_BASE_S + (512 << 20) / INGEST_BYTES_PER_S  # the largest document
# System 1 answers in milliseconds; the deadline catches a stuck vfm-trustd, with room for a
# busy machine (and a first call that loads the checks' models).
TRUST_CALL_TIMEOUT_S = 10.0
TRUST_S_PER_KB = 0.05               # a long answer or working set takes longer to screen
VERIFY_TIMEOUT_S = 120.0            # system 2 may ask a judge model for several samples


# The router's first call loads its weights and the embedder (seconds); later ones take ms.
ROUTE_TIMEOUT_S = 60.0
ADAPT_TIMEOUT_S = 120.0   # the exchanges travel in the request


def ingest_timeout(size: int) -> float:
    """Seconds vfm-datad may take to parse, embed and store a document of `size` bytes."""
    return INGEST_BASE_S + size / INGEST_BYTES_PER_S


def generate_timeout(max_new_tokens: int) -> float:
    return GENERATE_BASE_S + GENERATE_S_PER_TOKEN * max(max_new_tokens, 1)


def _data_timeout(method: str, request) -> float:
    if method == "Remember":
        return DATA_CALL_TIMEOUT_S + REMEMBER_S_PER_ENTRY * len(request.entries)
    if method == "Embed":
        return DATA_CALL_TIMEOUT_S + EMBED_S_PER_TEXT * len(request.texts)
    return DATA_CALL_TIMEOUT_S


def _service_error(registry: ServiceRegistry, service: str, exc: grpc.RpcError) -> VfmError:
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        # An older build of the service (or a stand-in) without this call: not the caller's
        # fault and not a kernel bug.
        return Unavailable(f"service {service} does not offer this call (an older version?)")
    return _service_failure(registry, service, from_rpc_error(exc))


def _service_failure(registry: ServiceRegistry, service: str, err: VfmError) -> VfmError:
    """What a service's error means to the kernel's caller."""
    if err.code == grpc.StatusCode.UNAVAILABLE:
        registry.suspect(service)
        return Unavailable(f"service {service} is unavailable: {err.message}")
    if err.code == grpc.StatusCode.UNAUTHENTICATED:
        # The service refused the kernel's secret: it restarted and has not registered again
        # yet (a caller's own credentials were checked by the kernel, not by the service).
        registry.suspect(service)
        return Unavailable(f"service {service} restarted and is not registered again yet")
    return err


# model service
class GrpcModelClient:
    """`ModelClient` over vfm-modeld's gRPC API."""

    def __init__(self, registry: ServiceRegistry):
        self._registry = registry
        self._mux: ModelMux | None = None

    def _stub(self) -> model_pb2_grpc.ModelServiceStub:
        return model_pb2_grpc.ModelServiceStub(self._registry.channel(MODEL_SERVICE))

    def generate(self, call: GenerateCall) -> MuxStream:
        request = _generate_request(call)
        return MuxStream(self._mux_now, request, generate_timeout(request.max_new_tokens))

    def _mux_now(self) -> ModelMux:
        """The GenerateMany stream new generations go on: a new one when the service
        registered again (new address or secret) or the last one broke."""
        channel = self._registry.channel(MODEL_SERVICE)
        metadata = self._registry.metadata(MODEL_SERVICE)
        mux = self._mux
        if mux is None or mux.broken is not None or mux.channel is not channel \
                or mux.metadata != metadata:
            if mux is not None:
                mux.retire()
            mux = self._mux = ModelMux(
                channel, metadata,
                error=lambda exc: _service_error(self._registry, MODEL_SERVICE, exc),
                failure=lambda err: _service_failure(self._registry, MODEL_SERVICE, err))
        return mux

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
        return [ModelInfo(name=m.name, backend=enum_str(model_pb2.Backend, m.backend),
                          context_window=m.context_window,
                          cost_per_1k_tokens=m.cost_per_1k_tokens, loaded=m.loaded,
                          is_default=m.is_default, max_batch=m.max_batch, tenant=m.tenant,
                          base=m.base, status=m.status, quality=m.quality,
                          base_quality=m.base_quality, engine=m.engine)
                for m in reply.models]

    async def start_adapt(self, tenant: str, name: str, base: str, teacher: str,
                          exchanges: list[tuple[str, str]], system_prompt: str,
                          quick: bool) -> AdaptJob:
        reply = await self._unary("StartAdapt", model_pb2.StartAdaptRequest(
            tenant=tenant, name=name, base=base, teacher=teacher, system_prompt=system_prompt,
            quick=quick, exchanges=[model_pb2.AdaptExchange(prompt=p, reply=r)
                                    for p, r in exchanges]), ADAPT_TIMEOUT_S)
        return _adapt_job(reply.job)

    async def adapt_jobs(self, tenant: str) -> list[AdaptJob]:
        reply = await self._unary("ListAdaptJobs", model_pb2.ListAdaptJobsRequest(
            tenant=tenant), ROUTE_TIMEOUT_S)
        return [_adapt_job(j) for j in reply.jobs]


    async def route(self, tenant: str, prompt: str, policy: RoutePolicy, prompt_tokens: int,
                    max_new_tokens: int, ask_id: str) -> RouteDecision:
        request = model_pb2.RouteRequest(
            tenant=tenant, prompt=prompt, prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens, ask_id=ask_id,
            policy=model_pb2.RoutePolicy(quality=policy.quality,
                                         max_cost_per_ask=policy.max_cost_per_ask,
                                         ttft_slo_ms=policy.ttft_slo_ms,
                                         allowed_models=policy.allowed_models))
        reply = await self._unary("Route", request, ROUTE_TIMEOUT_S)
        return RouteDecision(reply.model, reply.reason, tuple(
            RouteCandidate(c.model, c.quality, c.cost, c.ttft_ms, c.eligible, c.note, c.head)
            for c in reply.candidates))

    async def feedback(self, tenant: str, ask_id: str, good: bool, source: str,
                       model: str = "") -> tuple[int, bool]:
        reply = await self._unary("RecordFeedback", model_pb2.RecordFeedbackRequest(
            tenant=tenant, ask_id=ask_id, good=good, source=source, model=model),
            ROUTE_TIMEOUT_S)
        return reply.tenant_feedback, reply.correction_active

    async def _unary(self, method: str, request, timeout: float):
        try:
            return await getattr(self._stub(), method)(
                request, timeout=timeout, metadata=self._registry.metadata(MODEL_SERVICE))
        except grpc.RpcError as exc:
            raise _service_error(self._registry, MODEL_SERVICE, exc) from None


def _adapt_job(j) -> AdaptJob:
    return AdaptJob(j.id, j.tenant, j.name, j.base, j.teacher,
                    enum_str(model_pb2.AdaptJobState, j.state), j.progress, j.message,
                    j.train_exchanges, j.held_back, j.base_quality, j.adapted_quality,
                    j.promoted, j.started_at, j.finished_at, j.error, j.train_seconds,
                    j.adapter_bytes)


def _generate_request(call: GenerateCall) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        model=call.model,
        messages=[model_pb2.ChatMessage(role=enum_value(model_pb2.Role, m.role), content=m.content)
                  for m in call.messages],
        max_new_tokens=call.max_new_tokens, assistant_prefix=call.assistant_prefix,
        assistant_prefix_ids=call.assistant_prefix_ids, temperature=call.temperature,
        top_p=call.top_p, seed=call.seed, stop=list(call.stop), priority=call.priority,
        tenant=call.tenant, tools_json=call.tools_json)


# data service
class GrpcDataClient:
    """`DataClient` (and the syscalls' `DataRelay`) over vfm-datad's gRPC API."""

    def __init__(self, registry: ServiceRegistry):
        self._registry = registry

    def _stub(self) -> data_pb2_grpc.DataServiceStub:
        return data_pb2_grpc.DataServiceStub(self._registry.channel(DATA_SERVICE))

    def _error(self, exc: grpc.RpcError) -> VfmError:
        return _service_error(self._registry, DATA_SERVICE, exc)

    async def _call(self, method: str, request):
        """One unary call to vfm-datad, its errors in our vocabulary."""
        try:
            return await getattr(self._stub(), method)(
                request, timeout=_data_timeout(method, request),
                metadata=self._registry.metadata(DATA_SERVICE))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    async def forward(self, method: str, tenant: str, request):
        """A kernel.v1 syscall as `tenant`: copied into data.v1, its reply copied back."""
        to_data, from_data = _RELAYED[method]
        return from_data(await self._call(method, to_data(tenant, request)))

    async def ingest(self, tenant: str, parts: AsyncIterator):
        """Ingest as one answer: the result of `ingest_progress`."""
        async for message in self.ingest_progress(tenant, parts):
            if message.HasField("result"):
                return message.result
        raise Unavailable(f"service {DATA_SERVICE} ended an ingest without a result")

    async def ingest_progress(self, tenant: str, parts: AsyncIterator):
        """Relay a document's parts as they come, then vfm-datad's progress and result
        (kernel.v1 IngestWithProgressResponse messages) for as long as the document's size
        warrants. The parts are written here rather than handed to gRPC as an iterator:
        gRPC swallows an iterator's error and cancels the call, which left the client without
        an answer; here a bad part fails this call, and whatever ends it early (error,
        deadline, the client going away) cancels vfm-datad's work."""
        call = self._stub().IngestWithProgress(timeout=INGEST_MAX_S,
                                               metadata=self._registry.metadata(DATA_SERVICE))
        size = 0
        try:
            async for part in parts:
                size += len(part.data)
                await asyncio.wait_for(call.write(data_pb2.IngestWithProgressRequest(
                    part=ingest_to_data(tenant, part))), INGEST_PART_TIMEOUT_S)
            await call.done_writing()
            deadline = asyncio.get_running_loop().time() + ingest_timeout(size)
            while True:
                left = deadline - asyncio.get_running_loop().time()
                message = await asyncio.wait_for(call.read(), max(left, 0.0))
                if message is grpc.aio.EOF:
                    return
                yield kpb.IngestWithProgressResponse(
                    embedded=message.embedded, total=message.total,
                    result=ingest_from_data(message.result)
                    if message.HasField("result") else None)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"service {DATA_SERVICE} took too long with a document "
                                   f"of {size} bytes") from None
        finally:
            call.cancel()  # a no-op once the call is over

    async def candidates(self, query: CandidatesQuery) -> CandidatesReply:
        reply = await self._call("Candidates", data_pb2.CandidatesRequest(
            tenant=query.tenant, pid=query.pid, question=query.question, limit=query.limit,
            recent=query.recent, collections=list(query.collections),
            knowledge_k=query.knowledge_k, now=timestamp(query.now)))
        return CandidatesReply(_candidates(reply), reply.pages)

    async def remember(self, tenant: str, pid: int, entries: list[MemoryEntry],
                       exchange_id: str = "") -> None:
        await self._call("Remember", data_pb2.RememberRequest(
            tenant=tenant, pid=pid, exchange_id=exchange_id,
            entries=[data_pb2.MemoryEntry(speaker=e.speaker, text=e.text, time=timestamp(e.time))
                     for e in entries]))

    async def fork_memory(self, tenant: str, parent: int, child: int) -> None:
        await self._call("ForkMemory", data_pb2.ForkMemoryRequest(
            tenant=tenant, parent=parent, child=child))


# trust service
class GrpcTrustClient:
    """`TrustClient` over vfm-trustd's gRPC API; the tenant goes in each call's scope."""

    def __init__(self, registry: ServiceRegistry):
        self._registry = registry

    async def _call(self, method: str, request, timeout: float):
        try:
            stub = trust_pb2_grpc.TrustServiceStub(self._registry.channel(TRUST_SERVICE))
            return await getattr(stub, method)(request, timeout=timeout,
                                               metadata=self._registry.metadata(TRUST_SERVICE))
        except grpc.RpcError as exc:
            raise _service_error(self._registry, TRUST_SERVICE, exc) from None

    async def policy(self, scope: TrustScope) -> TrustPolicy:
        reply = await self._call("GetPolicy", trust_pb2.GetPolicyRequest(scope=_scope(scope)),
                                 TRUST_CALL_TIMEOUT_S)
        return trust_policy(reply.effective_json, reply.version)

    async def screen_input(self, scope: TrustScope, question: str, items: Sequence[ScreenItem],
                           system_prompt: str) -> Screening:
        size = len(question) + sum(len(i.text) for i in items)
        reply = await self._call("ScreenInput", trust_pb2.ScreenInputRequest(
            scope=_scope(scope), question=question, system_prompt=system_prompt,
            items=[trust_pb2.Item(kind=enum_value(trust_pb2.ItemKind, i.kind), id=i.id,
                                  text=i.text) for i in items]), _trust_timeout(size))
        return Screening(verdict_from_trust(reply.verdict), [
            ItemVerdict(index=v.index, id=v.id, dropped=v.dropped, reason=v.reason,
                        checks=tuple(_check(c) for c in v.checks)) for v in reply.items],
            reply.escalate_to_system2)

    async def check_output(self, scope: TrustScope, text: str, final: bool, question: str,
                           protected: Sequence[str], released: int) -> OutputDecision:
        reply = await self._call("CheckOutput", trust_pb2.CheckOutputRequest(
            scope=_scope(scope), text=text, final=final, question=question,
            protected_texts=list(protected), released=released),
            _trust_timeout(len(text) + len(question)))
        return OutputDecision(verdict_from_trust(reply.verdict), reply.text, reply.cut)

    async def verify(self, scope: TrustScope, question: str, answer: str,
                     sources: Sequence[ScreenItem], model: str) -> Verification:
        reply = await self._call("Verify", trust_pb2.VerifyRequest(
            scope=_scope(scope), question=question, answer=answer, model=model,
            sources=[trust_pb2.Source(id=s.id, text=s.text) for s in sources]),
            VERIFY_TIMEOUT_S)
        return Verification(verdict_from_trust(reply.verdict), reply.revise_model)

    async def pseudonymize(self, scope: TrustScope, texts: Sequence[str]) -> Pseudonymized:
        reply = await self._call("Pseudonymize", trust_pb2.PseudonymizeRequest(
            scope=_scope(scope), texts=list(texts)), _trust_timeout(sum(map(len, texts))))
        return Pseudonymized(list(reply.texts), [
            Placeholder(p.placeholder, p.original, p.label) for p in reply.placeholders])


def _trust_timeout(chars: int) -> float:
    return TRUST_CALL_TIMEOUT_S + TRUST_S_PER_KB * chars / 1024


def _scope(scope: TrustScope) -> trust_pb2.Scope:
    return trust_pb2.Scope(tenant=scope.tenant, pid=scope.pid)


def _check(c: trust_pb2.CheckResult) -> CheckResult:
    return CheckResult(
        check=c.check, score=c.score, threshold=c.threshold,
        outcome=enum_str(trust_pb2.Outcome, c.outcome) or "allow", reason=c.reason,
        spans=tuple(TrustSpan(s.start, s.end, s.label, s.replacement) for s in c.spans),
        system=c.system, elapsed_ms=c.elapsed_ms, target=c.target)


def verdict_from_trust(v: trust_pb2.Verdict) -> Verdict:
    return Verdict(outcome=enum_str(trust_pb2.Outcome, v.outcome) or "allow",
                   checks=[_check(c) for c in v.checks], reasons=list(v.reasons),
                   system=v.system, elapsed_ms=v.elapsed_ms, policy_version=v.policy_version,
                   redacted_text=v.redacted_text, holding_reply=v.holding_reply,
                   feedback=v.feedback, level=v.level, escalation_rule=v.escalation_rule)


def trust_policy(effective_json: str, version: int = 0) -> TrustPolicy:
    """The few settings of an effective policy the kernel acts on itself; vfm-trustd has
    validated the document, so a missing or odd value takes its default."""
    try:
        doc = json.loads(effective_json or "{}")
    except ValueError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}

    def section(name: str) -> dict:
        value = doc.get(name)
        return value if isinstance(value, dict) else {}
    level = str(doc.get("level") or "standard")
    on_unavailable = doc.get("on_unavailable") or ("allow" if level == "off" else "refuse")
    revisions = section("revision").get("max_revisions", 1)
    return TrustPolicy(
        level=level, on_unavailable="allow" if on_unavailable == "allow" else "refuse",
        store_text=section("audit").get("store_text") is True,
        max_revisions=revisions if isinstance(revisions, int) and revisions >= 0 else 1,
        holding_reply=str(doc.get("holding_reply") or ""),
        refusal_reply=str(doc.get("refusal_reply") or ""), version=version)


def _entry_item(kind: str, e: data_pb2.MemoryEntry, score: float = 0.0) -> Item:
    return Item(kind=kind, text=e.line or f"{e.speaker}: {e.text}", tokens=e.tokens,
                source_ids=[f"mem:{e.seq}", f"page:{e.page}"], score=score, page=e.page,
                seq=e.seq, speaker=e.speaker, time=seconds(e, "time"), meta=dict(e.meta),
                group=e.group, group_tokens=e.group_tokens)


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


# --- kernel.v1 <-> data.v1: the kernel names the tenant, the client never does ---------
# The two packages share field meanings and enum numbers but not field numbers, so each
# message is copied field by field; Timestamps and maps are copied as they are.

def _time(msg, field: str):
    return getattr(msg, field) if msg.HasField(field) else None


def entry_to_data(e: kpb.MemoryEntry) -> data_pb2.MemoryEntry:
    return data_pb2.MemoryEntry(speaker=e.speaker, text=e.text, time=_time(e, "time"),
                                meta=dict(e.meta), pinned=e.pinned)


def entry_from_data(e: data_pb2.MemoryEntry) -> kpb.MemoryEntry:
    return kpb.MemoryEntry(seq=e.seq, speaker=e.speaker, text=e.text, time=_time(e, "time"),
                           meta=dict(e.meta), pinned=e.pinned, tokens=e.tokens, page=e.page,
                           line=e.line)


def remember_to_data(tenant: str, r: kpb.RememberRequest) -> data_pb2.RememberRequest:
    return data_pb2.RememberRequest(tenant=tenant, pid=r.pid,
                                    entries=[entry_to_data(e) for e in r.entries])


def remember_from_data(r: data_pb2.RememberResponse) -> kpb.RememberResponse:
    return kpb.RememberResponse(first_seq=r.first_seq, count=r.count, pages=r.pages)


def recall_to_data(tenant: str, r: kpb.RecallRequest) -> data_pb2.RecallRequest:
    return data_pb2.RecallRequest(tenant=tenant, pid=r.pid, query=r.query, k=r.k,
                                  now=_time(r, "now"))


def recall_from_data(r: data_pb2.RecallResponse) -> kpb.RecallResponse:
    return kpb.RecallResponse(hits=[kpb.RecallHit(entry=entry_from_data(h.entry), score=h.score)
                                    for h in r.hits])


def collection_from_data(c: data_pb2.Collection) -> kpb.Collection:
    return kpb.Collection(name=c.name, description=c.description, chunks=c.chunks,
                          sources=c.sources, create_time=_time(c, "create_time"))


def create_collection_to_data(tenant: str, r: kpb.CreateCollectionRequest):
    return data_pb2.CreateCollectionRequest(tenant=tenant, name=r.name, description=r.description)


def create_collection_from_data(r: data_pb2.CreateCollectionResponse):
    return kpb.CreateCollectionResponse(collection=collection_from_data(r.collection))


def delete_collection_to_data(tenant: str, r: kpb.DeleteCollectionRequest):
    return data_pb2.DeleteCollectionRequest(tenant=tenant, name=r.name)


def delete_collection_from_data(r: data_pb2.DeleteCollectionResponse):
    return kpb.DeleteCollectionResponse(chunks=r.chunks)


def delete_source_to_data(tenant: str, r: kpb.DeleteSourceRequest):
    return data_pb2.DeleteSourceRequest(tenant=tenant, collection=r.collection, source=r.source)


def delete_source_from_data(r: data_pb2.DeleteSourceResponse):
    return kpb.DeleteSourceResponse(chunks=r.chunks)


def search_to_data(tenant: str, r: kpb.SearchRequest) -> data_pb2.SearchRequest:
    return data_pb2.SearchRequest(tenant=tenant, collection=r.collection, query=r.query, k=r.k,
                                  filters=dict(r.filters), since=_time(r, "since"),
                                  until=_time(r, "until"))


def search_from_data(r: data_pb2.SearchResponse) -> kpb.SearchResponse:
    return kpb.SearchResponse(hits=[kpb.SearchHit(
        chunk_id=h.chunk_id, score=h.score, text=h.text, source=h.source, title=h.title,
        position=h.position, meta=dict(h.meta), tokens=h.tokens, collection=h.collection)
        for h in r.hits])


def embed_to_data(tenant: str, r: kpb.EmbedRequest) -> data_pb2.EmbedRequest:
    return data_pb2.EmbedRequest(tenant=tenant, texts=list(r.texts))


def embed_from_data(r: data_pb2.EmbedResponse) -> kpb.EmbedResponse:
    return kpb.EmbedResponse(embeddings=[kpb.Embedding(values=e.values) for e in r.embeddings],
                             model=r.model, tokens=r.tokens)


def ingest_to_data(tenant: str, part: kpb.IngestRequest) -> data_pb2.IngestRequest:
    return data_pb2.IngestRequest(tenant=tenant, collection=part.collection, source=part.source,
                                  kind=int(part.kind), mtime=_time(part, "mtime"),
                                  meta=dict(part.meta), data=part.data)


def ingest_from_data(r: data_pb2.IngestResponse) -> kpb.IngestResponse:
    return kpb.IngestResponse(source=r.source, chunks=r.chunks, unchanged=r.unchanged,
                              replaced=r.replaced)


def list_collections_to_data(tenant: str, r: kpb.ListCollectionsRequest):
    return data_pb2.ListCollectionsRequest(tenant=tenant)


def list_collections_from_data(r: data_pb2.ListCollectionsResponse):
    """Every collection, by name: the kernel pages them (the data service does not)."""
    return kpb.ListCollectionsResponse(collections=[
        collection_from_data(c) for c in sorted(r.collections, key=lambda c: c.name)])


# The relayed syscalls: kernel.v1 request -> data.v1 request, data.v1 reply -> kernel.v1 reply.
_RELAYED = {
    "Remember": (remember_to_data, remember_from_data),
    "Recall": (recall_to_data, recall_from_data),
    "CreateCollection": (create_collection_to_data, create_collection_from_data),
    "ListCollections": (list_collections_to_data, list_collections_from_data),
    "DeleteCollection": (delete_collection_to_data, delete_collection_from_data),
    "DeleteSource": (delete_source_to_data, delete_source_from_data),
    "Search": (search_to_data, search_from_data),
    "Embed": (embed_to_data, embed_from_data),
}


# trust service: the policy calls (vfmctl policy ...); the Ask path has its own client
TRUST_POLICY_TIMEOUT_S = 30.0       # parse and store a policy; a test runs the fast checks
TRUST_TEST_TIMEOUT_S = 120.0        # ...and a first test may load the checks' models


class TrustPolicyClient:
    """PutPolicy, GetPolicy and TestPolicy of vfm-trustd, as kernel.v1 replies; the tenant
    and pid are always the kernel's, never the client's."""

    def __init__(self, registry: ServiceRegistry):
        self._registry = registry

    async def _call(self, method: str, request, timeout: float):
        stub = trust_pb2_grpc.TrustServiceStub(self._registry.channel(TRUST_SERVICE))
        try:
            return await getattr(stub, method)(request, timeout=timeout,
                                               metadata=self._registry.metadata(TRUST_SERVICE))
        except grpc.RpcError as exc:
            raise _service_error(self._registry, TRUST_SERVICE, exc) from None

    async def put_policy(self, tenant: str, pid: int, document: str, filename: str,
                         author: str) -> kpb.ApplyPolicyResponse:
        reply = await self._call("PutPolicy", trust_pb2.PutPolicyRequest(
            scope=trust_pb2.Scope(tenant=tenant, pid=pid), document=document,
            filename=filename, author=author), TRUST_POLICY_TIMEOUT_S)
        return kpb.ApplyPolicyResponse(version=reply.version, effective_json=reply.effective_json,
                                       document_sha256=reply.document_sha256)

    async def get_policy(self, tenant: str, pid: int) -> kpb.GetPolicyResponse:
        reply = await self._call("GetPolicy", trust_pb2.GetPolicyRequest(
            scope=trust_pb2.Scope(tenant=tenant, pid=pid)), TRUST_POLICY_TIMEOUT_S)
        return kpb.GetPolicyResponse(effective_json=reply.effective_json, version=reply.version,
                                     origin=reply.origin, document=reply.document)

    async def test_policy(self, tenant: str, pid: int, document: str, filename: str,
                          text: str, output_text: str) -> kpb.TestPolicyResponse:
        reply = await self._call("TestPolicy", trust_pb2.TestPolicyRequest(
            scope=trust_pb2.Scope(tenant=tenant, pid=pid), document=document,
            filename=filename, text=text, output_text=output_text), TRUST_TEST_TIMEOUT_S)
        return kpb.TestPolicyResponse(
            input=_test_verdict(reply.input),
            output=_test_verdict(reply.output) if reply.HasField("output") else None)


def _test_verdict(v) -> kpb.Verdict:
    """vfm-trustd's verdict on a policy test as the kernel's wire says it (the two Outcome
    enums share their numbers)."""
    return kpb.Verdict(
        outcome=v.outcome, reasons=list(v.reasons), system=v.system,
        elapsed_ms=v.elapsed_ms, policy_version=v.policy_version, level=v.level,
        escalation_rule=v.escalation_rule, redacted_text=v.redacted_text,
        holding_reply=v.holding_reply,
        checks=[kpb.CheckResult(
            check=c.check, score=c.score, threshold=c.threshold, outcome=c.outcome,
            reason=c.reason, system=c.system, elapsed_ms=c.elapsed_ms, target=c.target,
            spans=[kpb.VerdictSpan(start=p.start, end=p.end, label=p.label,
                                   replacement=p.replacement) for p in c.spans])
            for c in v.checks])
