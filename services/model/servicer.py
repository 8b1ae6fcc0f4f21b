"""Thin gRPC servicer for vfmos.model.v1: translate, delegate to ModelService, map errors."""

from __future__ import annotations

import logging

from vfmos_runtime.boundary import rpc as boundary
from vfmos_runtime.convert import enum_str, enum_value
from services.model.service import ModelService
from services.model.types import GenParams
from vfmos.model.v1 import model_pb2 as pb
from vfmos.model.v1 import model_pb2_grpc

log = logging.getLogger("vfm-modeld.rpc")
rpc = boundary(log)


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, service: ModelService):
        self.service = service

    @rpc
    async def Generate(self, request: pb.GenerateRequest, context):
        # an unspecified role reads "" and is refused by the domain's role check
        messages = [{"role": enum_str(pb.Role, m.role), "content": m.content}
                    for m in request.messages]
        params = GenParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                           top_p=request.top_p, seed=request.seed, stop=tuple(request.stop),
                           assistant_prefix=request.assistant_prefix,
                           assistant_prefix_ids=tuple(request.assistant_prefix_ids),
                           priority=request.priority, merge_queued=True)
        model = self.service.registry.get(request.model).name
        async for piece in self.service.generate(request.model, messages, params):
            reason = enum_value(pb.FinishReason, piece.finish_reason)
            yield pb.GenerateResponse(
                text=piece.text, tokens=piece.tokens, prompt_tokens=piece.prompt_tokens,
                done=piece.done, finish_reason=reason,
                completion_tokens=piece.completion_tokens, model=model if piece.done else "",
                token_ids=piece.token_ids)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        registry = self.service.registry
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=e.name, backend=enum_value(pb.Backend, e.backend),
                         context_window=e.context_window,
                         cost_per_1k_tokens=e.cost_per_1k_tokens,
                         loaded=self.service.is_loaded(e.name), is_default=e.name == registry.default,
                         max_batch=self.service.max_batch(e.name))
            for e in registry.entries()])
