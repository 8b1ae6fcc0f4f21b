"""vfm-trustd entry point: load the embedder and the checks, open the policy store, serve,
register with the kernel."""

from __future__ import annotations

import inspect
import logging
import os
import sys

import lmdb

from services.registration import serve_registered
from services.trust.config import NAME, TrustConfig, load
from services.trust.policy_store import PolicyStore
from services.trust.rules import OverlapLeakCheck
from services.trust.service import CheckSet, TrustService
from services.trust.servicer import TrustServicer
from vfmos_runtime.embed import load_daemon_embedder
from vfmos_runtime.gate import KernelGate
from vfmos_runtime.notify import notify_status
from vfmos_runtime.server import (DaemonStartError, ServerConfig, create_server,
                                   models_offline, run_configured)
from vfmos.trust.v1 import trust_pb2, trust_pb2_grpc

log = logging.getLogger(NAME)
SERVICE_NAME = trust_pb2.DESCRIPTOR.services_by_name["TrustService"].full_name
TEXT_CHECKS = ("moderation", "harmful_request", "injection", "indirect_injection")


def _module(name: str):
    """A check module of this package; a missing one stops the daemon with one line."""
    import importlib

    try:
        return importlib.import_module(f"services.trust.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"services.trust.{name}":
            raise
        raise DaemonStartError(f"the check module services/trust/{name}.py is missing; "
                               f"start with --checks that leave out '{name}'") from None


def _with_embedder(cls, embedder):
    """An instance of a check class, given the shared embedder if it takes one."""
    params = inspect.signature(cls).parameters
    for name in ("embedder", "embed"):
        if name in params:
            return cls(**{name: embedder if name == "embedder" else embedder.embed})
    return cls()


def build_checks(cfg: TrustConfig) -> CheckSet:
    """The checks `cfg.checks` names; tenant rules and the overlap leak check always run."""
    families = cfg.families()
    checks = CheckSet(leaks={"leak_overlap": OverlapLeakCheck()})
    embedder = None
    if families & {"learned", "grounding", "embeddings"}:
        embedder = load_daemon_embedder(cfg.embedder, cfg.threads)
        checks.embed = embedder.embed
    if "learned" in families:
        notify_status("loading the learned checks")
        learned = _module("learned").load_checks(embedder)
        checks.text = {name: learned[name] for name in TEXT_CHECKS if name in learned}
        if "leak" in learned:
            checks.leaks = {"leak": learned["leak"], **checks.leaks}
    if "pii" in families:
        notify_status("loading the PII recognizers")
        pii = _module("pii")
        detector = pii.PiiDetector()  # spaCy and presidio load once, for every policy
        checks.pii = lambda entities, threshold: pii.PiiCheck(
            entities=list(entities), threshold=threshold, detector=detector)
        checks.pseudonymize = lambda texts, entities: pii.pseudonymize(
            texts, entities, detector=detector)
    if "grounding" in families:
        checks.grounding = _with_embedder(_module("grounding").GroundingCheck, embedder)
    if "constraints" in families:
        constraints = _module("constraints")
        checks.domain_rules = constraints.parse_rules
        checks.constraints = lambda rules: constraints.ConstraintChecker(
            constraints.parse_rules(rules, "domain_rules"))
    return checks


async def serve(cfg: TrustConfig) -> None:
    checks = build_checks(cfg)
    try:
        store = PolicyStore(cfg.data_dir)
    except (lmdb.Error, OSError) as exc:
        raise DaemonStartError(f"cannot open the policy store in {cfg.data_dir}: {exc}") \
            from exc
    service = TrustService(store, checks)
    servicer = TrustServicer(service, cfg.workers)
    gate = KernelGate(NAME)
    server, health, _ = create_server(
        ServerConfig(unix_socket=cfg.socket, interceptors=(gate,)),
        lambda s: trust_pb2_grpc.add_TrustServiceServicer_to_server(servicer, s),
        [SERVICE_NAME])
    await server.start()
    os.chmod(cfg.socket, 0o660)  # only the kernel (same user or group) talks to us
    log.info("%s serving on %s (policies in %s, checks: %s)", NAME, cfg.socket, cfg.data_dir,
             ", ".join(sorted(cfg.families())) or "rules only")

    def close() -> None:
        servicer.close()
        service.close()

    await serve_registered(server, health, NAME, SERVICE_NAME, cfg.socket,
                           cfg.kernel_socket, close, gate)


def main(argv: list[str] | None = None) -> int:
    return run_configured(NAME, load, serve, argv, prepare=models_offline)


if __name__ == "__main__":
    sys.exit(main())
