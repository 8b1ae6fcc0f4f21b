"""vfmd entry point: wire the kernel's parts together and serve until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import lmdb
from grpc_health.v1 import health_pb2

from kernel import config as kconfig
from kernel.adapters import GrpcDataClient, GrpcModelClient, GrpcTrustClient, TrustPolicyClient
from kernel.asklog import AskLog
from kernel.model_desk import ModelDesk
from kernel.routing import RouteDesk
from kernel.audit import HEAD_FILE, AuditLog, AuditStore
from kernel.escalations import EscalationBook
from kernel.ask import AskRunner
from kernel.context import ContextManager
from kernel.dispatch import Dispatcher
from kernel.memory import PageTable
from kernel.outbox import ExchangeOutbox, OutboxStore
from kernel.scheduler import Policy
from kernel.identity import Authenticator, CredentialsServer, TicketBook, TokenBook
from kernel.keys import KeyLedger
from kernel.registry import ServiceRegistry
from vfmos_runtime.notify import notify_ready, notify_stopping
from vfmos_runtime.server import (DaemonStartError, ServerConfig, create_server,
                                   run_configured, serve_until_signal)
from kernel.servicer import KernelServicer
from kernel.store import KernelStore
from kernel.table import ProcessTable
from kernel.trust_path import TrustGate
from kernel.trust_syscalls import TrustParts
from vfmos_runtime.paths import credentials_socket
from vfmos.kernel.v1 import kernel_pb2, kernel_pb2_grpc

log = logging.getLogger("vfmd")
SERVICE_NAME = kernel_pb2.DESCRIPTOR.services_by_name["KernelService"].full_name


async def serve(cfg: kconfig.KernelConfig) -> None:
    started = time.time()
    delay_s = cfg.slow_commit_ms / 1000
    try:
        store = KernelStore(cfg.data_dir,
                            before_commit=(lambda: time.sleep(delay_s)) if delay_s else None)
        outbox_store = OutboxStore(store)  # its table is opened before any write is queued
        ask_log = AskLog(store)  # so is this one
        audit = AuditLog(AuditStore(store, cfg.data_dir / HEAD_FILE))
        audit.catch_up_head_file()  # the file behind the chain after an unclean stop
        escalations = EscalationBook(store, audit)
    except (lmdb.Error, OSError) as exc:
        raise DaemonStartError(f"cannot open the kernel store in {cfg.data_dir}: {exc}") from exc
    table = ProcessTable(store, reap_after_s=cfg.reap_after_s)
    registry = ServiceRegistry(store, interval_s=cfg.health_interval_s)
    tickets = TicketBook(admin_uids=frozenset({0, os.geteuid()}))
    keys = KeyLedger(store)  # every bearer token's limits and usage
    auth = Authenticator(tickets, TokenBook(store, keys))
    dispatcher = Dispatcher(Policy(cfg.policy), {**cfg.tenant_weights, **table.weights()},
                            max_slots=cfg.max_slots)
    data = GrpcDataClient(registry)
    outbox = ExchangeOutbox(outbox_store, data)
    context = ContextManager(table, data, PageTable(store), outbox)
    trust = TrustGate(GrpcTrustClient(registry) if cfg.trust == "on" else None,
                      escalations, audit)
    models = GrpcModelClient(registry)
    asks = AskRunner(table, models, dispatcher, context, trust, ask_log, keys,
                     stream_interval_s=cfg.stream_interval_ms / 1000)
    servicer = KernelServicer(table, registry, auth, asks, dispatcher, started, context,
                              TrustParts(TrustPolicyClient(registry), audit, escalations),
                              RouteDesk(table, models, ask_log, audit), ModelDesk(models, audit))
    server_cfg = ServerConfig(unix_socket=cfg.socket, tcp_listen=cfg.listen,
                              tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
    try:
        server, health, port = create_server(
            server_cfg, lambda s: kernel_pb2_grpc.add_KernelServiceServicer_to_server(servicer, s),
            [SERVICE_NAME])
    except (RuntimeError, OSError) as exc:
        raise DaemonStartError(f"cannot listen: {exc}") from exc
    creds = CredentialsServer(credentials_socket(cfg.socket), tickets)
    await server.start()
    os.chmod(cfg.socket, 0o666)
    await creds.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_task = asyncio.create_task(registry.run())
    reaper_task = asyncio.create_task(table.reap_forever(context.pages.forget))
    outbox.kick()  # exchanges that waited for vfm-datad when the kernel last stopped
    log.info("vfmd serving on %s%s (data in %s)", cfg.socket,
             f" and TCP port {port}" if port else "", cfg.data_dir)
    if cfg.clear_text_tcp:
        log.warning("TCP on %s is without TLS: bearer tokens and answers travel in clear "
                    "text%s", cfg.listen, "" if cfg.insecure else " (loopback only)")
    notify_ready(f"serving on {cfg.socket}")

    async def on_stop() -> None:
        notify_stopping()
        health_task.cancel()
        reaper_task.cancel()
        await creds.stop()
        await registry.close()

    try:
        await serve_until_signal(server, on_stop)
    finally:
        store.close()  # commits what is still queued (the accounting of the last asks)
        cfg.socket.unlink(missing_ok=True)


def prioritize(cfg: kconfig.KernelConfig) -> None:
    """Take the configured CPU priority before any thread starts (Linux keeps a nice value
    per thread and a new thread inherits its creator's), or say why not."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current != cfg.nice:
            os.setpriority(os.PRIO_PROCESS, 0, cfg.nice)
    except PermissionError:
        log.info("vfmd keeps CPU priority %d: nice %d needs root or CAP_SYS_NICE",
                 current, cfg.nice)
    except OSError as exc:
        log.warning("vfmd keeps its CPU priority: %s", exc)


def main(argv: list[str] | None = None) -> int:
    return run_configured("vfmd", kconfig.load, serve, argv, prepare=prioritize)


if __name__ == "__main__":
    raise SystemExit(main())
