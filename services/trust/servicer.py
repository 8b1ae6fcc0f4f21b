"""Thin gRPC servicer for vfmos.trust.v1: translate, run TrustService off the event loop,
map errors (in one place: vfmos_runtime.boundary)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from services.trust.service import (CheckResult, Item, ItemVerdict, Scope, TrustService,
                                    Verdict)
from vfmos_runtime.boundary import rpc as boundary
from vfmos_runtime.errors import InvalidArgument
from vfmos.trust.v1 import trust_pb2 as pb
from vfmos.trust.v1 import trust_pb2_grpc

log = logging.getLogger("vfm-trustd.rpc")
rpc = boundary(log)

ITEM_KINDS = {pb.ITEM_KIND_KNOWLEDGE: "knowledge", pb.ITEM_KIND_MEMORY: "memory",
              pb.ITEM_KIND_OTHER: "other", pb.ITEM_KIND_TURN: "turn"}


def scope_of(msg) -> Scope:
    return Scope(msg.scope.tenant, msg.scope.pid)


def items_of(request: pb.ScreenInputRequest) -> list[Item]:
    items = []
    for i, item in enumerate(request.items):
        kind = ITEM_KINDS.get(item.kind)
        if kind is None:
            raise InvalidArgument(f"items[{i}].kind: must be KNOWLEDGE, MEMORY, OTHER or TURN, "
                                  f"got {item.kind}")
        items.append(Item(kind, item.id, item.text))
    return items


def result_pb(r: CheckResult) -> pb.CheckResult:
    return pb.CheckResult(check=r.check, score=r.score, threshold=r.threshold,
                          outcome=int(r.outcome), reason=r.reason,
                          spans=[pb.Span(start=s.start, end=s.end, label=s.label,
                                         replacement=s.replacement) for s in r.spans],
                          system=r.system, elapsed_ms=r.elapsed_ms, target=r.target)


def verdict_pb(v: Verdict) -> pb.Verdict:
    return pb.Verdict(outcome=int(v.outcome), checks=[result_pb(r) for r in v.checks],
                      reasons=v.reasons, system=v.system, elapsed_ms=v.elapsed_ms,
                      policy_version=v.policy_version, redacted_text=v.redacted_text,
                      holding_reply=v.holding_reply, feedback=v.feedback, level=v.level,
                      escalation_rule=v.escalation_rule)


def item_pb(v: ItemVerdict) -> pb.ItemVerdict:
    return pb.ItemVerdict(index=v.index, id=v.id, dropped=v.dropped,
                          checks=[result_pb(r) for r in v.checks], reason=v.reason)


class TrustServicer(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self, service: TrustService, workers: int = 2):
        self.s = service
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="trust-check")

    async def _run(self, fn, *args, **kwargs):
        """Checks embed and match: CPU work, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(fn, *args, **kwargs))

    @rpc
    async def ScreenInput(self, request: pb.ScreenInputRequest, context):
        screen = await self._run(self.s.screen_input, scope_of(request), request.question,
                                 items_of(request), request.system_prompt)
        return pb.ScreenInputResponse(verdict=verdict_pb(screen.verdict),
                                      items=[item_pb(v) for v in screen.items],
                                      escalate_to_system2=screen.escalate_to_system2)

    @rpc
    async def CheckOutput(self, request: pb.CheckOutputRequest, context):
        out = await self._run(self.s.check_output, scope_of(request), request.text,
                              request.final, request.question, list(request.protected_texts),
                              request.released)
        return pb.CheckOutputResponse(verdict=verdict_pb(out.verdict), text=out.text,
                                      cut=out.cut)

    @rpc
    async def Verify(self, request: pb.VerifyRequest, context):
        checked = await self._run(self.s.verify, scope_of(request), request.question,
                                  request.answer, [s.text for s in request.sources],
                                  request.model)
        return pb.VerifyResponse(verdict=verdict_pb(checked.verdict),
                                 revise_model=checked.revise_model)

    @rpc
    async def Pseudonymize(self, request: pb.PseudonymizeRequest, context):
        texts, placeholders = await self._run(self.s.pseudonymize, scope_of(request),
                                              list(request.texts))
        return pb.PseudonymizeResponse(texts=texts, placeholders=[
            pb.Placeholder(placeholder=p, original=o, label=label)
            for p, o, label in placeholders])

    @rpc
    async def PutPolicy(self, request: pb.PutPolicyRequest, context):
        put = await self._run(self.s.put_policy, scope_of(request), request.document,
                              request.filename, request.author)
        return pb.PutPolicyResponse(version=put.version, effective_json=put.effective_json,
                                    document_sha256=put.sha256)

    @rpc
    async def GetPolicy(self, request: pb.GetPolicyRequest, context):
        view = await self._run(self.s.get_policy, scope_of(request))
        return pb.GetPolicyResponse(effective_json=view.effective_json, version=view.version,
                                    origin=view.origin, document=view.document)

    @rpc
    async def TestPolicy(self, request: pb.TestPolicyRequest, context):
        screened, output = await self._run(self.s.test_policy, scope_of(request),
                                           request.document, request.filename, request.text,
                                           request.output_text)
        reply = pb.TestPolicyResponse(input=verdict_pb(screened))
        if output is not None:
            reply.output.CopyFrom(verdict_pb(output))
        return reply

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
