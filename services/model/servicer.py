"""Thin gRPC servicer for vfmos.model.v1: translate, delegate to ModelService, map errors."""

from __future__ import annotations

import asyncio
import logging
import time

from vfmos_runtime.boundary import rpc as boundary
from vfmos_runtime.convert import enum_str, enum_value
from vfmos_runtime.errors import Unavailable
from services.model.router import RoutePolicy
from services.model.adapters import AdapterJobs, AdaptJob
from services.model.mux import ManyStreams
from services.model.routing import RoutingService
from services.model.service import ModelService
from services.model.types import GenParams
from vfmos.model.v1 import model_pb2 as pb
from vfmos.model.v1 import model_pb2_grpc

log = logging.getLogger("vfm-modeld.rpc")
rpc = boundary(log)


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: ModelService, routing: RoutingService,
                 adapters: AdapterJobs | None = None):
        self.service = service
        self.routing = routing
        self.adapters = adapters
        self.many = ManyStreams()

    @rpc
    async def Generate(self, request: pb.GenerateRequest, context):
        async for response in self._responses(request):
            yield response

    @rpc
    async def GenerateMany(self, requests, context):
        async for response in self.many.serve(requests, self._responses, log):
            yield response

    async def _responses(self, request: pb.GenerateRequest):
        """One generation's chunks (Generate's stream; one generation of GenerateMany)."""
        # an unspecified role reads "" and is refused by the domain's role check
        messages = [{"role": enum_str(pb.Role, m.role), "content": m.content}
                    for m in request.messages]
        params = GenParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                           top_p=request.top_p, seed=request.seed, stop=tuple(request.stop),
                           assistant_prefix=request.assistant_prefix,
                           assistant_prefix_ids=tuple(request.assistant_prefix_ids),
                           priority=request.priority, merge_queued=True,
                           tools_json=request.tools_json)
        model = self.service.check_tenant(request.model, request.tenant).name
        started, first = time.perf_counter(), True
        async for piece in self.service.generate(request.model, messages, params,
                                                 request.tenant):
            if first and piece.tokens and not request.assistant_prefix:
                first = False
                self.routing.observe_first_token(model, piece.prompt_tokens,
                                                 time.perf_counter() - started)
            reason = enum_value(pb.FinishReason, piece.finish_reason)
            yield pb.GenerateResponse(
                text=piece.text, tokens=piece.tokens, prompt_tokens=piece.prompt_tokens,
                done=piece.done, finish_reason=reason,
                completion_tokens=piece.completion_tokens, model=model if piece.done else "",
                token_ids=piece.token_ids, logprob=piece.logprob,
                tool_calls_json=piece.tool_calls_json)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        registry = self.service.registry
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=e.name, backend=enum_value(pb.Backend, e.backend),
                         context_window=self.service.window(e.name),
                         cost_per_1k_tokens=e.cost_per_1k_tokens,
                         loaded=self.service.is_loaded(e.name), is_default=e.name == registry.default,
                         max_batch=self.service.max_batch(e.name),
                         tenant=e.options.get("tenant", ""), base=e.options.get("base", ""),
                         status=e.options.get("status", ""),
                         quality=e.options.get("quality", 0.0),
                         base_quality=e.options.get("base_quality", 0.0),
                         engine=self.service.engine(e.name))
            for e in registry.entries()])

    @rpc
    async def StartAdapt(self, request: pb.StartAdaptRequest, context) -> pb.StartAdaptResponse:
        if self.adapters is None:
            raise Unavailable("this vfm-modeld trains no adapters")
        job = self.adapters.start(
            request.tenant, request.name, request.base, request.teacher,
            [{"prompt": e.prompt, "reply": e.reply} for e in request.exchanges],
            request.system_prompt, request.quick)
        return pb.StartAdaptResponse(job=_job_pb(job))

    @rpc
    async def ListAdaptJobs(self, request: pb.ListAdaptJobsRequest,
                            context) -> pb.ListAdaptJobsResponse:
        jobs = self.adapters.jobs(request.tenant) if self.adapters is not None else []
        return pb.ListAdaptJobsResponse(jobs=[_job_pb(j) for j in jobs])

    @rpc
    async def Route(self, request: pb.RouteRequest, context) -> pb.RouteResponse:
        p = request.policy
        policy = RoutePolicy(quality=p.quality, cost_budget=p.max_cost_per_ask,
                             ttft_slo_ms=p.ttft_slo_ms, allowed=tuple(p.allowed_models))
        # Embedding the prompt takes a few milliseconds of CPU: off the event loop.
        result = await asyncio.to_thread(
            self.routing.route, request.tenant, request.prompt, policy, request.prompt_tokens,
            request.max_new_tokens, request.ask_id)
        return pb.RouteResponse(model=result.choice.model, reason=result.choice.reason, candidates=[
            pb.RouteCandidate(model=c.model, quality=c.quality, cost=c.cost, ttft_ms=c.ttft_ms,
                              eligible=c.eligible, note=c.note, head=result.heads[c.model])
            for c in result.choice.candidates])

    @rpc
    async def RecordFeedback(self, request: pb.RecordFeedbackRequest,
                             context) -> pb.RecordFeedbackResponse:
        count, active = await asyncio.to_thread(self.routing.feedback, request.tenant,
                                                request.ask_id, request.good, request.source,
                                                request.model)
        return pb.RecordFeedbackResponse(tenant_feedback=count, correction_active=active)


def _job_pb(job: AdaptJob) -> pb.AdaptJob:
    return pb.AdaptJob(
        id=job.id, tenant=job.tenant, name=job.name, base=job.base, teacher=job.teacher,
        state=enum_value(pb.AdaptJobState, job.state.value), progress=job.progress,
        message=job.message, train_exchanges=job.train_exchanges, held_back=job.held_back,
        base_quality=job.base_quality, adapted_quality=job.adapted_quality,
        promoted=job.promoted, started_at=job.started_at, finished_at=job.finished_at,
        error=job.error, train_seconds=job.train_seconds, adapter_bytes=job.adapter_bytes)
