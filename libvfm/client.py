"""libvfm clients: AsyncClient for asyncio code and Client, its blocking twin, for scripts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import grpc

from libvfm import convert, convert_trust
from vfmos_runtime.errors import (InvalidArgument, Unauthenticated, Unavailable, VfmError,
                                  from_rpc_error)
from vfmos_runtime import validate
from vfmos_runtime.credentials import fetch_ticket
from vfmos_runtime.paths import kernel_socket
from vfmos_runtime.protocol import INGEST_PART_BYTES, MAX_MESSAGE_BYTES, TICKET_HEADER
from libvfm.types import (AskResult, Collection, DaemonStatus, Identity, IngestResult,
                          MemoryEntry, Process, ProcessSpec, Quota, RecallHit, SearchHit,
                          ServiceRegistration, SystemUsage, TokenInfo, TokenLimits, Usage,
                          WorkingSet)
from libvfm.types import (AuditRecord, AuditVerification, Escalation, Policy, PolicyApplied,
                          PolicyTest)
from libvfm.types import FeedbackResult, RouteCandidate, RouteExplanation, RoutePolicy
from libvfm.types import ModelInfo, ModelJob
from vfmos_runtime import validate
from vfmos_runtime.convert import enum_value
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc

class AsyncClient:
    """Typed asyncio client for the kernel; every method raises libvfm.errors on failure.

    Local callers are identified by their uid over the Unix socket (the default); remote
    callers pass `target="host:port"` and a bearer `token` (with `tls_ca` for TLS).
    """

    def __init__(self, socket: str | Path | None = None, *, target: str | None = None,
                 token: str | None = None, tls_ca: bytes | None = None, timeout: float = 30.0):
        self._timeout = timeout
        self._token = token
        self._ticket: str | None = None
        # Short reconnect backoff: after a daemon restart the next call should find it.
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        if target:
            self._sock_path = None
            if tls_ca is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=tls_ca)
                self._channel = grpc.aio.secure_channel(target, creds, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._sock_path = kernel_socket(str(socket) if socket else None)
            self._channel = grpc.aio.insecure_channel(f"unix:{self._sock_path}", options=options)
        self._stub = kernel_pb2_grpc.KernelServiceStub(self._channel)

    @property
    def socket_path(self) -> Path | None:
        return self._sock_path

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # identity
    def _metadata(self, renew: bool = False) -> tuple[tuple[str, str], ...]:
        if self._token:
            return (("authorization", f"Bearer {self._token}"),)
        if self._ticket is None or renew:
            self._ticket = fetch_ticket(self._sock_path)
        return ((TICKET_HEADER, self._ticket),)

    async def _call(self, method: str, request, timeout: float | None = None):
        """One unary syscall; a stale ticket (kernel restarted) is renewed once."""
        rpc = getattr(self._stub, method)
        for attempt in (0, 1):
            try:
                return await rpc(request, metadata=self._metadata(renew=attempt == 1),
                                 timeout=timeout or self._timeout)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                if isinstance(err, Unauthenticated) and attempt == 0 and not self._token:
                    continue
                raise err from None

    async def _pages(self, method: str, request, field: str) -> list:
        """Every item of a paginated list call, following next_page_token to the end."""
        items: list = []
        while True:
            reply = await self._call(method, request)
            items.extend(getattr(reply, field))
            if not reply.next_page_token:
                return items
            request.page_token = reply.next_page_token

    # process syscalls
    async def spawn(self, name: str, *, priority: int = 20, model: str = "",
                    context_budget: int = 0, quota: Quota | None = None,
                    system_prompt: str = "", collections: list[str] | None = None,
                    route: RoutePolicy | None = None) -> Process:
        """`model="auto"` lets the router pick a model per Ask, within `route`'s targets."""
        spec = ProcessSpec(name=name, priority=priority, model=model,
                           context_budget=context_budget, quota=quota or Quota(),
                           system_prompt=system_prompt, collections=list(collections or ()),
                           route=route or RoutePolicy())
        reply = await self._call("SpawnProcess",
                                 pb.SpawnProcessRequest(spec=convert.spec_to_pb(spec)))
        return convert.process_from_pb(reply.process)

    async def ps(self, all: bool = False) -> list[Process]:
        found = await self._pages("ListProcesses", pb.ListProcessesRequest(all=all), "processes")
        return [convert.process_from_pb(p) for p in found]

    async def get(self, pid: int) -> Process:
        reply = await self._call("GetProcess", pb.GetProcessRequest(pid=pid))
        return convert.process_from_pb(reply.process)

    async def kill(self, pid: int) -> Process:
        reply = await self._call("KillProcess", pb.KillProcessRequest(pid=pid))
        return convert.process_from_pb(reply.process)

    async def suspend(self, pid: int) -> Process:
        reply = await self._call("SuspendProcess", pb.SuspendProcessRequest(pid=pid))
        return convert.process_from_pb(reply.process)

    async def resume(self, pid: int) -> Process:
        reply = await self._call("ResumeProcess", pb.ResumeProcessRequest(pid=pid))
        return convert.process_from_pb(reply.process)

    async def set_quota(self, pid: int, quota: Quota) -> Process:
        request = pb.SetProcessQuotaRequest(pid=pid, quota=convert.quota_to_pb(quota))
        return convert.process_from_pb((await self._call("SetProcessQuota", request)).process)

    async def set_priority(self, pid: int, priority: int) -> Process:
        request = pb.SetProcessPriorityRequest(pid=pid, priority=priority)
        return convert.process_from_pb((await self._call("SetProcessPriority", request)).process)

    # work
    async def ask_stream(self, pid: int, prompt: str, *, max_new_tokens: int = 0,
                         temperature: float = 0.0, top_p: float = 0.0, seed: int = 0,
                         stop: list[str] | None = None, ttft_slo_ms: float = 0.0,
                         stateless: bool = False, instructions: str = "",
                         tools_json: str = "") -> AsyncIterator[str | AskResult]:
        """Yield text pieces as they are generated, then one AskResult.

        `ttft_slo_ms` asks for the first token within that time: the scheduler serves such
        requests earliest-deadline-first within their tenant. `stateless` leaves the
        process's memory out: no working set is assembled and the exchange is not remembered.
        `instructions` are a system message for this Ask alone, read after the process's
        own system prompt. `tools_json` (a model behind an OpenAI-compatible server only)
        hands the model an app's OpenAI messages, tools and tool_choice as one JSON object;
        a tool call ends the answer with finish reason "tool-calls" and `AskResult.tool_calls`.
        """
        request = pb.AskRequest(pid=pid, prompt=prompt, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed, stop=stop or [],
                                ttft_slo=convert.duration(ttft_slo_ms / 1000, "ttft_slo_ms"),
                                stateless=stateless, instructions=instructions,
                                tools_json=tools_json)
        pieces: list[str] = []
        for attempt in (0, 1):
            call = self._stub.Ask(request, metadata=self._metadata(renew=attempt == 1))
            try:
                async for chunk in call:
                    if chunk.HasField("done"):
                        yield convert.ask_result_from_pb("".join(pieces), chunk.done)
                        return
                    pieces.append(chunk.text)
                    yield chunk.text
                raise Unavailable("the answer stream ended without its final message")
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                if isinstance(err, Unauthenticated) and attempt == 0 and not self._token:
                    continue
                raise err from None
            finally:
                call.cancel()

    async def ask(self, pid: int, prompt: str, **options) -> AskResult:
        result = None
        async for item in self.ask_stream(pid, prompt, **options):
            if isinstance(item, AskResult):
                result = item
        return result

    # virtual context memory
    async def remember(self, pid: int, entries: list[MemoryEntry]) -> tuple[int, int]:
        """Append entries to a process's memory in one call; returns (first seq, count)."""
        reply = await self._call("Remember", pb.RememberRequest(
            pid=pid, entries=[convert.entry_to_pb(e) for e in entries]))
        return reply.first_seq, reply.count

    async def recall(self, pid: int, query: str, k: int = 10,
                     now: float = 0.0) -> list[RecallHit]:
        reply = await self._call("Recall", pb.RecallRequest(pid=pid, query=query, k=k,
                                                             now=convert.timestamp(now, "now")))
        return [RecallHit(convert.entry_from_pb(h.entry), h.score) for h in reply.hits]

    async def context(self, pid: int, question: str = "", *, budget: int = 0, now: float = 0.0,
                      touch: bool = False) -> WorkingSet:
        """The working set an Ask of `question` would use; `touch` counts it as paged in."""
        reply = await self._call("GetWorkingSet", pb.GetWorkingSetRequest(
            pid=pid, question=question, budget=budget, now=convert.timestamp(now, "now"),
            touch=touch))
        return convert.working_set_from_pb(reply.working_set)

    async def fork(self, pid: int, name: str = "") -> Process:
        """A child process sharing the parent's memory copy-on-write."""
        reply = await self._call("ForkProcess", pb.ForkProcessRequest(pid=pid, name=name))
        return convert.process_from_pb(reply.process)

    # knowledge collections of the caller's tenant
    async def collection_create(self, name: str, description: str = "") -> Collection:
        reply = await self._call("CreateCollection", pb.CreateCollectionRequest(
            name=name, description=description))
        return convert.collection_from_pb(reply.collection)

    async def collections(self) -> list[Collection]:
        found = await self._pages("ListCollections", pb.ListCollectionsRequest(), "collections")
        return [convert.collection_from_pb(c) for c in found]

    async def collection_delete(self, name: str) -> int:
        return (await self._call("DeleteCollection", pb.DeleteCollectionRequest(name=name))).chunks

    async def ingest(self, collection: str, source: str, data: bytes, *, kind: str = "",
                     mtime: float = 0.0, meta: dict[str, str] | None = None,
                     progress: Callable[[int], None] | None = None,
                     embedded: Callable[[int, int], None] | None = None) -> IngestResult:
        """Stream one document; `progress(n)` hears each part's size as it is sent, and
        `embedded(done, total)` how many of the document's chunks the service has embedded
        (total is 0 while it parses): the work after the upload, which is most of it."""
        head = pb.IngestRequest(collection=collection, source=source,
                                kind=convert.document_kind_to_pb(kind),
                                mtime=convert.timestamp(mtime, "mtime"), meta=meta or {})

        def parts():
            for start in range(0, max(len(data), 1), INGEST_PART_BYTES):
                part = head if start == 0 else pb.IngestRequest()
                part.data = data[start:start + INGEST_PART_BYTES]
                yield part if embedded is None else pb.IngestWithProgressRequest(part=part)
                if progress is not None:
                    progress(len(part.data))

        async def with_progress(metadata) -> pb.IngestResponse:
            async for message in self._stub.IngestWithProgress(
                    parts(), metadata=metadata, timeout=max(self._timeout, 3600)):
                if message.HasField("result"):
                    return message.result
                embedded(message.embedded, message.total)
            raise Unavailable("the kernel ended an ingest without a result")

        for attempt in (0, 1):
            try:
                metadata = self._metadata(attempt == 1)
                reply = await (with_progress(metadata) if embedded is not None else
                               self._stub.Ingest(parts(), metadata=metadata,
                                                 timeout=max(self._timeout, 3600)))
                return IngestResult(reply.source, reply.chunks, reply.unchanged, reply.replaced)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                if isinstance(err, Unauthenticated) and attempt == 0 and not self._token:
                    continue
                raise err from None

    async def delete_source(self, collection: str, source: str) -> int:
        return (await self._call("DeleteSource", pb.DeleteSourceRequest(
            collection=collection, source=source))).chunks

    async def search(self, collection: str, query: str, k: int = 10, *,
                     filters: dict[str, str] | None = None, since: float = 0.0,
                     until: float = 0.0) -> list[SearchHit]:
        reply = await self._call("Search", pb.SearchRequest(
            collection=collection, query=query, k=k, filters=filters or {},
            since=convert.timestamp(since, "since"), until=convert.timestamp(until, "until")))
        return [convert.hit_from_pb(h) for h in reply.hits]

    # routing
    async def embed(self, texts: list[str]) -> tuple[list[list[float]], str, int]:
        """Unit vectors of `texts` from the data service's embedder: (vectors, model, tokens)."""
        reply = await self._call("Embed", pb.EmbedRequest(texts=validate.embed_texts(texts)))
        return [list(e.values) for e in reply.embeddings], reply.model, reply.tokens

    async def explain_route(self, pid: int, question: str) -> RouteExplanation:
        """What the router predicts for each allowed model, and its choice (process with
        model "auto"); nothing is asked."""
        reply = await self._call("ExplainRoute", pb.ExplainRouteRequest(pid=pid, question=question))
        return RouteExplanation(reply.model, reply.reason, [
            RouteCandidate(c.model, c.quality, c.cost, c.ttft_ms, c.eligible, c.note, c.head)
            for c in reply.candidates])

    async def feedback(self, ask_id: str, good: bool, note: str = "") -> FeedbackResult:
        """Judge one answer by its `usage.ask_id` (audited; a routed Ask teaches the router)."""
        reply = await self._call("SendFeedback", pb.SendFeedbackRequest(
            ask_id=ask_id, rating=pb.RATING_UP if good else pb.RATING_DOWN, note=note))
        return FeedbackResult(reply.routed, reply.tenant_feedback, reply.correction_active,
                              reply.audit_seq)

    # models and adapters
    async def models(self) -> list[ModelInfo]:
        """The models a process may name: shared ones and the tenant's adapters."""
        reply = await self._call("ListModels", pb.ListModelsRequest())
        return [ModelInfo(m.name, m.backend, m.context_window, m.cost_per_1k_tokens, m.loaded,
                          m.is_default, m.tenant, m.base, m.status, m.quality, m.base_quality,
                          m.engine)
                for m in reply.models]

    async def adapt(self, name: str, *, base: str = "", teacher: str = "",
                    system_prompt: str = "", quick: bool = False) -> ModelJob:
        """Start training adapter `name` from the tenant's logged exchanges that `teacher`
        answered and the trust agent allowed; follow it with `model_jobs()`."""
        reply = await self._call("AdaptModel", pb.AdaptModelRequest(
            name=name, base=base, teacher=teacher, system_prompt=system_prompt, quick=quick))
        return convert.model_job_from_pb(reply.job)

    async def model_jobs(self) -> list[ModelJob]:
        reply = await self._call("ListModelJobs", pb.ListModelJobsRequest())
        return [convert.model_job_from_pb(j) for j in reply.jobs]

    # introspection and administration
    async def ping(self, payload: bytes = b"") -> bytes:
        return (await self._call("Ping", pb.PingRequest(payload=payload))).payload

    async def whoami(self) -> Identity:
        return convert.identity_from_pb((await self._call("WhoAmI", pb.WhoAmIRequest())).identity)

    async def services(self) -> list[DaemonStatus]:
        reply = await self._call("ListServices", pb.ListServicesRequest())
        return [convert.daemon_from_pb(d) for d in reply.daemons]

    async def usage(self) -> SystemUsage:
        """Scheduler figures and per-tenant totals (an admin sees every tenant)."""
        return convert.system_usage_from_pb(await self._call("GetUsage", pb.GetUsageRequest()))

    async def set_tenant_weight(self, tenant: str, weight: float) -> None:
        await self._call("SetTenantWeight", pb.SetTenantWeightRequest(tenant=tenant, weight=weight))

    async def register_service(self, name: str, address: str, pid: int) -> ServiceRegistration:
        """Register a service daemon (admin): when to register again, and the secret the
        kernel will present on its calls to the service."""
        request = pb.RegisterServiceRequest(name=name, address=address, pid=pid)
        reply = await self._call("RegisterService", request)
        return ServiceRegistration(convert.seconds(reply, "heartbeat_interval"),
                                   reply.kernel_secret)

    async def token_create(self, tenant: str, admin: bool = False, label: str = "", *,
                           limits: TokenLimits | None = None) -> tuple[str, str]:
        """A new bearer token (admin): (secret, token id). Every syscall made with it is held
        to `limits` (None: no limits); a bad limit raises InvalidArgument before sending."""
        request = pb.CreateTokenRequest(tenant=tenant, admin=admin, label=label)
        if limits is not None:
            request.limits.CopyFrom(convert.token_limits_to_pb(validate.token_limits(limits)))
        reply = await self._call("CreateToken", request)
        return reply.token, reply.token_id

    async def token_revoke(self, token_id: str) -> None:
        await self._call("RevokeToken", pb.RevokeTokenRequest(token_id=token_id))

    async def token_list(self) -> list[TokenInfo]:
        found = await self._pages("ListTokens", pb.ListTokensRequest(), "tokens")
        return [convert.token_from_pb(t) for t in found]

    # trust policies (of the caller's tenant, or of one of its processes: pid)
    async def apply_policy(self, document: str, *, pid: int = 0,
                           filename: str = "") -> PolicyApplied:
        """Set the policy; a bad one raises InvalidArgument naming the line and field."""
        reply = await self._call("ApplyPolicy", pb.ApplyPolicyRequest(
            pid=pid, document=document, filename=filename), timeout=max(self._timeout, 60))
        return convert_trust.applied_from_pb(reply)

    async def get_policy(self, pid: int = 0) -> Policy:
        return convert_trust.policy_from_pb(
            await self._call("GetPolicy", pb.GetPolicyRequest(pid=pid)))

    async def test_policy(self, text: str, *, document: str = "", filename: str = "",
                          output_text: str = "", pid: int = 0) -> PolicyTest:
        """Run a policy's checks on `text` (and `output_text`) without asking a model;
        an empty `document` tests the effective policy."""
        reply = await self._call("TestPolicy", pb.TestPolicyRequest(
            pid=pid, document=document, filename=filename, text=text,
            output_text=output_text), timeout=max(self._timeout, 180))
        return convert_trust.policy_test_from_pb(reply)

    # the audit trail
    async def audit(self, pid: int = 0, *, since: float = 0.0, verdict: str = "",
                    kind: str = "") -> list[AuditRecord]:
        """Audit records, oldest first: the caller's tenant's (an admin's: every tenant's)."""
        found = await self._pages("ListAudit", pb.ListAuditRequest(
            pid=pid, since=convert.timestamp(since, "since"), verdict=verdict, kind=kind),
            "records")
        return [convert_trust.record_from_pb(r) for r in found]

    async def verify_audit(self) -> AuditVerification:
        return convert_trust.verification_from_pb(
            await self._call("VerifyAudit", pb.VerifyAuditRequest(), timeout=max(self._timeout,
                                                                                  300)))

    # human escalations
    async def escalations(self, state: str = "") -> list[Escalation]:
        """Escalations, oldest first; `state`: open, approved, rejected, replied ("" = all)."""
        request = pb.ListEscalationsRequest(
            state=enum_value(pb.EscalationState, state, "state"))
        found = await self._pages("ListEscalations", request, "escalations")
        return [convert_trust.escalation_from_pb(e) for e in found]

    async def escalation(self, escalation_id: str) -> Escalation:
        reply = await self._call("GetEscalation", pb.GetEscalationRequest(id=escalation_id))
        return convert_trust.escalation_from_pb(reply.escalation)

    async def resolve_escalation(self, escalation_id: str, decision: str,
                                 text: str = "") -> Escalation:
        """`decision`: approve, reject or reply (with `text`, what the client gets)."""
        if decision not in convert_trust.DECISIONS:
            raise InvalidArgument(f"decision must be one of "
                                  f"{', '.join(convert_trust.DECISIONS)}, got {decision!r}")
        reply = await self._call("ResolveEscalation", pb.ResolveEscalationRequest(
            id=escalation_id, decision=enum_value(pb.EscalationDecision, decision, "decision"),
            text=text))
        return convert_trust.escalation_from_pb(reply.escalation)

    async def wait_escalation(self, escalation_id: str, timeout: float = 600.0) -> Escalation:
        """The escalation once a human resolved it, or as it is after `timeout` seconds
        (`.resolved` tells which)."""
        reply = await self._call("WaitEscalation", pb.WaitEscalationRequest(
            id=escalation_id, timeout=convert.duration(timeout, "timeout")),
            timeout=timeout + self._timeout)
        return convert_trust.escalation_from_pb(reply.escalation)



class Client:
    """Blocking client: the AsyncClient driven by a private event loop.

    One implementation serves both styles; do not use it from inside a running loop
    (use AsyncClient there).
    """

    def __init__(self, socket: str | Path | None = None, **options):
        self._loop = asyncio.new_event_loop()
        self._async = self._loop.run_until_complete(self._make(socket, options))

    @staticmethod
    async def _make(socket, options) -> AsyncClient:
        return AsyncClient(socket, **options)

    def __getattr__(self, name: str):
        method = getattr(self._async, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def blocking(*args, **kwargs):
            return self._loop.run_until_complete(method(*args, **kwargs))
        return blocking

    def ask_stream(self, pid: int, prompt: str, **options) -> Iterator[str | AskResult]:
        stream = self._async.ask_stream(pid, prompt, **options)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(stream.aclose())

    def ask(self, pid: int, prompt: str, **options) -> AskResult:
        return self._loop.run_until_complete(self._async.ask(pid, prompt, **options))

    def close(self) -> None:
        self._loop.run_until_complete(self._async.close())
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AsyncClient", "Client", "VfmError", "Usage"]
