"""Thin gRPC servicer for the kernel syscalls: identify the caller, delegate, convert errors."""

from __future__ import annotations

import logging
import os
import time

from kernel.ask import AskDone, AskQuery, AskRunner
from kernel.context import ContextManager
from kernel.memory_syscalls import MemorySyscalls
from kernel.syscall import syscall
from kernel.convert import process_to_pb, quota_from_pb, spec_from_pb
from kernel.dispatch import Dispatcher
from vfmos_runtime.convert import counters_to_pb, usage_to_pb
from kernel.figures import daemon_figures
from kernel.identity import Authenticator, Caller, require_admin
from kernel.registry import ServiceRegistry
from kernel.table import ProcessTable
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos.kernel.v1 import kernel_pb2_grpc

log = logging.getLogger("vfmd.syscall")


class KernelServicer(MemorySyscalls, kernel_pb2_grpc.KernelServicer):
    def __init__(self, table: ProcessTable, registry: ServiceRegistry, auth: Authenticator,
                 asks: AskRunner, dispatcher: Dispatcher, started_at: float,
                 context: ContextManager):
        self.context = context
        self.dispatcher = dispatcher
        self.table = table
        self.registry = registry
        self.auth = auth
        self.asks = asks
        self.started_at = started_at

    def _proc(self, record) -> pb.Process:
        return process_to_pb(record, self.table.running(record.pid))

    @syscall
    async def Spawn(self, caller: Caller, request: pb.SpawnRequest) -> pb.Process:
        return self._proc(await self.table.spawn(caller, spec_from_pb(request.spec)))

    @syscall
    def List(self, caller: Caller, request: pb.ListRequest) -> pb.ListResponse:
        records = self.table.list(caller, include_ended=request.all)
        return pb.ListResponse(processes=[self._proc(r) for r in records])

    @syscall
    def Get(self, caller: Caller, request: pb.PidRequest) -> pb.Process:
        return self._proc(self.table.get(caller, request.pid))

    @syscall
    async def Kill(self, caller: Caller, request: pb.PidRequest) -> pb.Process:
        return self._proc(await self.table.kill(caller, request.pid))

    @syscall
    async def Suspend(self, caller: Caller, request: pb.PidRequest) -> pb.Process:
        return self._proc(await self.table.suspend(caller, request.pid))

    @syscall
    async def Resume(self, caller: Caller, request: pb.PidRequest) -> pb.Process:
        return self._proc(await self.table.resume(caller, request.pid))

    @syscall
    async def SetQuota(self, caller: Caller, request: pb.SetQuotaRequest) -> pb.Process:
        return self._proc(await self.table.set_quota(caller, request.pid, quota_from_pb(request.quota)))

    @syscall
    async def SetPriority(self, caller: Caller, request: pb.SetPriorityRequest) -> pb.Process:
        return self._proc(await self.table.set_priority(caller, request.pid, request.priority))

    @syscall
    def Usage(self, caller: Caller, request: pb.UsageRequest) -> pb.UsageResponse:
        snap = self.dispatcher.snapshot()
        weights = self.table.weights()
        tenants = []
        for tenant, (live, sums) in sorted(self.table.tenant_totals(caller).items()):
            running, queued = snap["tenants"].get(tenant, (0, 0))
            tenants.append(pb.TenantUsage(
                tenant=tenant, weight=weights.get(tenant, 1.0), processes=live, running=running,
                queued=queued, counters=counters_to_pb(sums)))
        return pb.UsageResponse(tenants=tenants, policy=self.dispatcher.policy.value,
                                capacity=snap["capacity"], running=snap["running"],
                                queued=snap["queued"])

    @syscall
    async def SetTenantWeight(self, caller: Caller, request: pb.SetTenantWeightRequest) -> pb.Empty:
        require_admin(caller, "set tenant weights")
        await self.table.set_weight(request.tenant, request.weight)
        self.dispatcher.set_weight(request.tenant, request.weight)
        return pb.Empty()

    @syscall
    def Ping(self, caller: Caller, request: pb.PingRequest) -> pb.PingResponse:
        return pb.PingResponse(payload=request.payload)

    @syscall
    def WhoAmI(self, caller: Caller, request: pb.WhoAmIRequest) -> pb.Identity:
        return pb.Identity(tenant=caller.tenant, uid=caller.uid, admin=caller.admin,
                           transport=caller.transport)

    @syscall
    def Services(self, caller: Caller, request: pb.ServicesRequest) -> pb.ServicesResponse:
        daemons = [pb.DaemonStatus(name="vfmd", address="", pid=os.getpid(), health="SERVING",
                                   last_seen=time.time(), **daemon_figures(os.getpid()))]
        for entry in self.registry.entries():
            daemons.append(pb.DaemonStatus(
                name=entry.name, address=entry.address, pid=entry.pid, health=entry.health,
                last_seen=entry.last_seen, **daemon_figures(entry.pid)))
        return pb.ServicesResponse(daemons=daemons)

    @syscall
    async def RegisterService(self, caller: Caller, request: pb.RegisterServiceRequest):
        require_admin(caller, "register a service")
        entry = await self.registry.register(request.name, request.address, request.pid)
        return pb.RegisterServiceResponse(heartbeat_s=self.registry.interval_s,
                                          kernel_secret=entry.secret)

    @syscall
    async def CreateToken(self, caller: Caller, request: pb.TokenCreateRequest):
        require_admin(caller, "create tokens")
        secret, token_id = await self.auth.tokens.create(request.tenant, request.admin, request.label)
        return pb.TokenCreateResponse(token=secret, token_id=token_id)

    @syscall
    async def RevokeToken(self, caller: Caller, request: pb.TokenRevokeRequest) -> pb.Empty:
        require_admin(caller, "revoke tokens")
        await self.auth.tokens.revoke(request.token_id)
        return pb.Empty()

    @syscall
    def ListTokens(self, caller: Caller, request: pb.TokenListRequest):
        require_admin(caller, "list tokens")
        return pb.TokenListResponse(tokens=[pb.TokenInfo(**info) for info in self.auth.tokens.list()])

    @syscall
    async def Ask(self, caller: Caller, request: pb.AskRequest):
        query = AskQuery(pid=request.pid, prompt=request.prompt,
                         max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                         top_p=request.top_p, seed=request.seed, stop=tuple(request.stop),
                         ttft_slo_ms=request.ttft_slo_ms, stateless=request.stateless)
        async for item in self.asks.ask(caller, query):
            if isinstance(item, AskDone):
                yield pb.AskChunk(done=pb.AskDone(finish_reason=item.finish_reason,
                                                  usage=usage_to_pb(item.usage)))
            else:
                yield pb.AskChunk(text=item)
