"""A stand-in vfm-trustd for the kernel's policy syscalls while the real one is built in parallel:
it keeps policies per scope and echoes what the kernel sent (scope, author), so a test sees
whose policy the kernel asked for. It judges nothing; tests of the checks use the real one."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import grpc

from services.registration import serve_registered
from vfmos_runtime.gate import KernelGate
from vfmos_runtime.server import ServerConfig, create_server, run_daemon
from vfmos.trust.v1 import trust_pb2 as pb
from vfmos.trust.v1 import trust_pb2_grpc


class StandIn(trust_pb2_grpc.TrustServiceServicer):
    def __init__(self):
        self.policies: dict[tuple[str, int], list[tuple[str, str]]] = {}

    async def PutPolicy(self, request: pb.PutPolicyRequest, context):
        if "moderation: 1.4" in request.document:  # the one bad policy the tests send
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{request.filename}:3: thresholds.moderation must be 0..1, "
                                "got 1.4")
        scope = (request.scope.tenant, request.scope.pid)
        versions = self.policies.setdefault(scope, [])
        versions.append((request.document, request.author))
        return pb.PutPolicyResponse(
            version=len(versions), effective_json=self._effective(*scope),
            document_sha256=hashlib.sha256(request.document.encode()).hexdigest())

    async def GetPolicy(self, request: pb.GetPolicyRequest, context):
        tenant, pid = request.scope.tenant, request.scope.pid
        for scope, origin in (((tenant, pid), "process" if pid else "tenant"),
                              ((tenant, 0), "tenant")):
            if self.policies.get(scope):
                return pb.GetPolicyResponse(effective_json=self._effective(*scope),
                                            version=len(self.policies[scope]), origin=origin,
                                            document=self.policies[scope][-1][0])
        return pb.GetPolicyResponse(effective_json=json.dumps({"tenant": tenant}),
                                    origin="default")

    async def TestPolicy(self, request: pb.TestPolicyRequest, context):
        def verdict(target: str) -> pb.Verdict:
            return pb.Verdict(outcome=pb.OUTCOME_ALLOW, system=1, level="standard", checks=[
                pb.CheckResult(check="moderation", score=0.01, threshold=0.5,
                               outcome=pb.OUTCOME_ALLOW, system=1, target=target,
                               reason=f"scope {request.scope.tenant}/{request.scope.pid}")])
        return pb.TestPolicyResponse(input=verdict("question"),
                                     output=verdict("output") if request.output_text else None)

    def _effective(self, tenant: str, pid: int) -> str:
        document, author = self.policies[(tenant, pid)][-1]
        return json.dumps({"tenant": tenant, "pid": pid, "author": author})


async def serve(socket: Path, kernel_socket: Path) -> None:
    name = pb.DESCRIPTOR.services_by_name["TrustService"].full_name
    servicer = StandIn()
    gate = KernelGate("vfm-trustd")  # refuses calls without the kernel's secret
    server, health, _ = create_server(
        ServerConfig(unix_socket=socket, interceptors=(gate,)),
        lambda s: trust_pb2_grpc.add_TrustServiceServicer_to_server(servicer, s), [name])
    await server.start()
    await serve_registered(server, health, "vfm-trustd", name, socket, kernel_socket,
                           close=lambda: None, gate=gate)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.standin_trustd")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--kernel-socket", type=Path, required=True)
    args = parser.parse_args()
    return run_daemon(lambda: serve(args.socket, args.kernel_socket))


if __name__ == "__main__":
    raise SystemExit(main())
