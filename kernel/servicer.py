"""Thin gRPC servicer for the kernel syscalls: identify the caller, delegate, convert errors."""

from __future__ import annotations

import logging
import os
import time

from kernel.ask import AskDone, AskQuery, AskRunner
from kernel.context import ContextManager
from kernel.memory_syscalls import MemorySyscalls
from kernel.trust_syscalls import TrustParts, TrustSyscalls
from kernel.syscall import syscall
from kernel.convert import ProcessViews, quota_from_pb, spec_from_pb, verdict_to_pb
from kernel.dispatch import Dispatcher
from kernel.pagination import page
from vfmos_runtime import validate
from vfmos_runtime.convert import (counters_to_pb, duration, enum_value, timestamp,
                                   token_limits_from_pb, token_limits_to_pb, usage_to_pb)
from kernel.figures import DaemonFigures
from kernel.identity import Authenticator, Caller, check_tenant, require_admin
from kernel.keys import NANO, limits_of
from kernel.registry import ServiceRegistry
from kernel.model_desk import ModelDesk
from kernel.ports import AdaptJob
from kernel.routing import RouteDesk
from kernel.table import ProcessTable
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc

log = logging.getLogger("vfmd.syscall")


class KernelServicer(MemorySyscalls, TrustSyscalls, kernel_pb2_grpc.KernelServiceServicer):
    def __init__(self, table: ProcessTable, registry: ServiceRegistry, auth: Authenticator,
                 asks: AskRunner, dispatcher: Dispatcher, started_at: float,
                 context: ContextManager, trust: TrustParts, routes: RouteDesk,
                 models: ModelDesk):
        self.routes = routes
        self.models = models
        self.context = context
        self.trust_policy, self.audit, self.escalations = trust
        self.dispatcher = dispatcher
        self.table = table
        self.registry = registry
        self.auth = auth
        self.asks = asks
        self.started_at = started_at
        self.figures = DaemonFigures()  # CPU percent is measured between two calls
        self._views = ProcessViews()

    def _proc(self, record) -> pb.Process:
        return self._views.get(record, self.table.running(record.pid))

    @syscall
    async def SpawnProcess(self, caller: Caller, request: pb.SpawnProcessRequest):
        return pb.SpawnProcessResponse(
            process=self._proc(await self.table.spawn(caller, spec_from_pb(request.spec))))

    @syscall
    def ListProcesses(self, caller: Caller, request: pb.ListProcessesRequest):
        records = sorted(self.table.list(caller, include_ended=request.all), key=lambda r: r.pid)
        found, token = page(records, lambda r: r.pid, "ListProcesses", request.page_size,
                            request.page_token)
        return pb.ListProcessesResponse(processes=[self._proc(r) for r in found],
                                        next_page_token=token)

    @syscall
    def GetProcess(self, caller: Caller, request: pb.GetProcessRequest):
        return pb.GetProcessResponse(process=self._proc(self.table.get(caller, request.pid)))

    @syscall
    async def KillProcess(self, caller: Caller, request: pb.KillProcessRequest):
        return pb.KillProcessResponse(
            process=self._proc(await self.table.kill(caller, request.pid)))

    @syscall
    async def SuspendProcess(self, caller: Caller, request: pb.SuspendProcessRequest):
        return pb.SuspendProcessResponse(
            process=self._proc(await self.table.suspend(caller, request.pid)))

    @syscall
    async def ResumeProcess(self, caller: Caller, request: pb.ResumeProcessRequest):
        return pb.ResumeProcessResponse(
            process=self._proc(await self.table.resume(caller, request.pid)))

    @syscall
    async def SetProcessQuota(self, caller: Caller, request: pb.SetProcessQuotaRequest):
        record = await self.table.set_quota(caller, request.pid, quota_from_pb(request.quota))
        return pb.SetProcessQuotaResponse(process=self._proc(record))

    @syscall
    async def SetProcessPriority(self, caller: Caller, request: pb.SetProcessPriorityRequest):
        record = await self.table.set_priority(caller, request.pid, request.priority)
        return pb.SetProcessPriorityResponse(process=self._proc(record))

    @syscall
    def GetUsage(self, caller: Caller, request: pb.GetUsageRequest) -> pb.GetUsageResponse:
        snap = self.dispatcher.snapshot()
        weights = self.table.weights()
        tenants = []
        for tenant, (live, sums) in sorted(self.table.tenant_totals(caller).items()):
            running, queued = snap["tenants"].get(tenant, (0, 0))
            tenants.append(pb.TenantUsage(
                tenant=tenant, weight=weights.get(tenant, 1.0), processes=live, running=running,
                queued=queued, counters=counters_to_pb(sums)))
        return pb.GetUsageResponse(
            tenants=tenants, policy=enum_value(pb.SchedulingPolicy, self.dispatcher.policy.value),
            capacity=snap["capacity"], running=snap["running"], queued=snap["queued"])

    @syscall
    async def SetTenantWeight(self, caller: Caller, request: pb.SetTenantWeightRequest):
        require_admin(caller, "set tenant weights")
        await self.table.set_weight(check_tenant(request.tenant), request.weight)
        self.dispatcher.set_weight(request.tenant, request.weight)
        return pb.SetTenantWeightResponse()

    @syscall
    def Ping(self, caller: Caller, request: pb.PingRequest) -> pb.PingResponse:
        return pb.PingResponse(payload=request.payload)

    @syscall
    def WhoAmI(self, caller: Caller, request: pb.WhoAmIRequest) -> pb.WhoAmIResponse:
        return pb.WhoAmIResponse(identity=pb.Identity(
            tenant=caller.tenant, uid=caller.uid, admin=caller.admin,
            transport=enum_value(pb.Transport, caller.transport)))

    @syscall
    def ListServices(self, caller: Caller, request: pb.ListServicesRequest):
        daemons = [_daemon(self.figures, "vfmd", "", os.getpid(), "SERVING", time.time())]
        for entry in self.registry.entries():
            daemons.append(_daemon(self.figures, entry.name, entry.address, entry.pid,
                                   entry.health, entry.last_seen))
        return pb.ListServicesResponse(daemons=daemons)

    @syscall
    async def RegisterService(self, caller: Caller, request: pb.RegisterServiceRequest):
        require_admin(caller, "register a service")
        entry = await self.registry.register(request.name, request.address,
                                             validate.pid(request.pid))
        return pb.RegisterServiceResponse(heartbeat_interval=duration(self.registry.interval_s),
                                          kernel_secret=entry.secret)

    @syscall
    async def CreateToken(self, caller: Caller, request: pb.CreateTokenRequest):
        require_admin(caller, "create tokens")
        secret, token_id = await self.auth.tokens.create(
            request.tenant, request.admin, request.label, token_limits_from_pb(request.limits))
        return pb.CreateTokenResponse(token=secret, token_id=token_id)

    @syscall
    async def RevokeToken(self, caller: Caller, request: pb.RevokeTokenRequest):
        require_admin(caller, "revoke tokens")
        await self.auth.tokens.revoke(request.token_id)
        return pb.RevokeTokenResponse()

    @syscall
    def ListTokens(self, caller: Caller, request: pb.ListTokensRequest):
        require_admin(caller, "list tokens")
        infos = sorted(self.auth.tokens.list(), key=lambda info: info["token_id"])
        found, token = page(infos, lambda info: info["token_id"], "ListTokens",
                            request.page_size, request.page_token)
        return pb.ListTokensResponse(next_page_token=token, tokens=[pb.TokenInfo(
            token_id=i["token_id"], tenant=i["tenant"], admin=i["admin"], label=i["label"],
            create_time=timestamp(i["created_at"]),
            limits=token_limits_to_pb(limits_of(i)), tokens_used=i.get("tokens_used", 0),
            cost_spent=i.get("cost_nano", 0) / NANO) for i in found])

    @syscall
    async def Ask(self, caller: Caller, request: pb.AskRequest):
        query = AskQuery(pid=request.pid, prompt=request.prompt,
                         max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                         top_p=request.top_p, seed=request.seed, stop=tuple(request.stop),
                         ttft_slo_ms=validate.duration_field(request, "ttft_slo", 3600) * 1000,
                         stateless=request.stateless, instructions=request.instructions,
                         tools_json=request.tools_json)
        async for item in self.asks.ask(caller, query):
            if isinstance(item, AskDone):
                yield pb.AskResponse(done=pb.AskDone(
                    finish_reason=enum_value(pb.FinishReason, item.finish_reason),
                    usage=usage_to_pb(item.usage), degraded=[
                        pb.Degradation(kind=enum_value(pb.DegradationKind, d.kind),
                                       reason=d.reason) for d in item.degraded],
                    verdict=verdict_to_pb(item.verdict) if item.verdict else None,
                    escalation_id=item.escalation_id, tool_calls_json=item.tool_calls_json))
            else:
                yield pb.AskResponse(text=item)

    # routing
    @syscall
    async def ExplainRoute(self, caller: Caller, request: pb.ExplainRouteRequest):
        d = await self.routes.explain(caller, request.pid, request.question)
        return pb.ExplainRouteResponse(model=d.model, reason=d.reason, candidates=[
            pb.RouteCandidate(model=c.model, quality=c.quality, cost=c.cost, ttft_ms=c.ttft_ms,
                              eligible=c.eligible, note=c.note, head=c.head)
            for c in d.candidates])

    @syscall
    async def SendFeedback(self, caller: Caller, request: pb.SendFeedbackRequest):
        rating = {pb.RATING_UP: "up", pb.RATING_DOWN: "down"}.get(request.rating, "")
        r = await self.routes.feedback(caller, request.ask_id, rating, request.note)
        return pb.SendFeedbackResponse(routed=r.routed, tenant_feedback=r.tenant_feedback,
                                       correction_active=r.correction_active,
                                       audit_seq=r.audit_seq)

    # models and adapters
    @syscall
    async def ListModels(self, caller: Caller, request: pb.ListModelsRequest):
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=m.name, backend=m.backend, context_window=m.context_window,
                         cost_per_1k_tokens=m.cost_per_1k_tokens, loaded=m.loaded,
                         is_default=m.is_default, tenant=m.tenant, base=m.base,
                         status=m.status, quality=m.quality, base_quality=m.base_quality,
                         engine=m.engine)
            for m in await self.models.list_models(caller)])

    @syscall
    async def AdaptModel(self, caller: Caller, request: pb.AdaptModelRequest):
        job = await self.models.adapt(caller, request.name, request.base, request.teacher,
                                      request.system_prompt, request.quick)
        return pb.AdaptModelResponse(job=_model_job(job))

    @syscall
    async def ListModelJobs(self, caller: Caller, request: pb.ListModelJobsRequest):
        return pb.ListModelJobsResponse(jobs=[_model_job(j)
                                              for j in await self.models.jobs(caller)])


def _model_job(j: AdaptJob) -> pb.ModelJob:
    return pb.ModelJob(
        id=j.id, tenant=j.tenant, name=j.name, base=j.base, teacher=j.teacher,
        state=enum_value(pb.ModelJobState, j.state), progress=j.progress, message=j.message,
        train_exchanges=j.train_exchanges, held_back=j.held_back,
        base_quality=j.base_quality, adapted_quality=j.adapted_quality, promoted=j.promoted,
        started_time=timestamp(j.started_at),
        finished_time=timestamp(j.finished_at),  # unset while it runs (0)
        error=j.error, train_seconds=j.train_seconds, adapter_bytes=j.adapter_bytes)


# Health strings the registry keeps, as the wire's enum; anything else reads NOT_SERVING.
_HEALTH = {"SERVING": pb.SERVICE_HEALTH_SERVING, "NOT_SERVING": pb.SERVICE_HEALTH_NOT_SERVING,
           "UNREACHABLE": pb.SERVICE_HEALTH_UNREACHABLE, "UNKNOWN": pb.SERVICE_HEALTH_UNKNOWN}


def _daemon(reader: DaemonFigures, name: str, address: str, pid: int, health: str,
            last_seen: float) -> pb.DaemonStatus:
    figures = reader.read(pid)
    return pb.DaemonStatus(name=name, address=address, pid=pid,
                           health=_HEALTH.get(health, pb.SERVICE_HEALTH_NOT_SERVING),
                           rss_mb=figures["rss_mb"], cpu_percent=figures["cpu_percent"],
                           uptime=duration(figures["uptime_s"]),
                           last_seen_time=timestamp(last_seen))
