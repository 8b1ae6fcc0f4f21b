"""gRPC server factory and daemon lifecycle shared by vfmd and the service daemons."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from vfmos_runtime.logs import RateLimitedLog, log_settings, setup_logging
from vfmos_runtime.paths import PRIVATE_UMASK, secure_state
from vfmos_runtime.protocol import MAX_MESSAGE_BYTES

# grpcio-reflection ships only v1alpha; tools such as grpcurl and Postman ask for v1 first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

@dataclass
class ServerConfig:
    unix_socket: Path
    tcp_listen: str = ""              # "HOST:PORT", opt-in
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    socket_mode: int = 0o666          # identity comes from credentials, not file modes
    interceptors: tuple = ()          # e.g. a KernelGate: only the kernel may call a service


def create_server(config: ServerConfig, register: Callable[[grpc.aio.Server], None],
                  service_names: Iterable[str]) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Build a server with health and reflection; returns (server, health servicer, tcp port)."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options, interceptors=list(config.interceptors))
    guarded = DecodeGuard(server, RateLimitedLog(logging.getLogger("vfmos.wire")))
    register(guarded)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    names = list(service_names) + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                   reflection.SERVICE_NAME, REFLECTION_V1]
    enable_reflection(names, guarded)

    path = config.unix_socket
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale socket from a crashed run
    server.add_insecure_port(f"unix:{path}")
    port = 0
    if config.tcp_listen:
        if config.tls_cert and config.tls_key:
            creds = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(config.tcp_listen, creds)
        else:
            port = server.add_insecure_port(config.tcp_listen)
    return server, health_servicer, port


class _Undecodable:
    """What a request that is not its message decodes to, for the guard to refuse."""


UNDECODABLE = _Undecodable()


class DecodeGuard:
    """The server as registration sees it: every handler added through it decodes its
    requests itself, so bytes that are not the method's message get INVALID_ARGUMENT and one
    rate-limited log line. (gRPC decodes before the handler runs and turns a failure into
    UNKNOWN with the exception's class, plus a traceback in the log per request.)"""

    def __init__(self, server: grpc.aio.Server, log: RateLimitedLog):
        self._server, self._log = server, log

    def __getattr__(self, name: str):
        return getattr(self._server, name)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h, self) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service, {m: self.guard(h, f"/{service}/{m}") for m, h in handlers.items()})

    def guard(self, handler: grpc.RpcMethodHandler | None, method: str):
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        message = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
        expected = message.full_name if message is not None else "request"
        refusal = f"request: the bytes sent are not a valid {expected} message"

        def safe_decode(raw: bytes):
            try:
                return decode(raw)
            except Exception:
                return UNDECODABLE

        async def refuse(context) -> None:
            self._log.warning("refused an undecodable request to %s", method)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)

        codec = dict(request_deserializer=safe_decode,
                     response_serializer=handler.response_serializer)
        if handler.unary_unary or handler.unary_stream:
            return _unary_request(handler, refuse, codec)
        return _streamed_requests(handler, refuse, codec)


def _unary_request(handler: grpc.RpcMethodHandler, refuse, codec) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        behaviour = handler.unary_unary

        async def unary(request, context):
            if request is UNDECODABLE:
                await refuse(context)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result
        return grpc.unary_unary_rpc_method_handler(unary, **codec)
    behaviour = handler.unary_stream

    async def stream(request, context):
        if request is UNDECODABLE:
            await refuse(context)
        async for item in behaviour(request, context):
            yield item
    return grpc.unary_stream_rpc_method_handler(stream, **codec)


def _streamed_requests(handler: grpc.RpcMethodHandler, refuse, codec) -> grpc.RpcMethodHandler:
    async def checked(requests, context):
        async for request in requests:
            if request is UNDECODABLE:
                await refuse(context)
            yield request

    if handler.stream_unary:
        behaviour = handler.stream_unary

        async def unary(requests, context):
            result = behaviour(checked(requests, context), context)
            return await result if inspect.isawaitable(result) else result
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    behaviour = handler.stream_stream

    async def stream(requests, context):
        async for item in behaviour(checked(requests, context), context):
            yield item
    return grpc.stream_stream_rpc_method_handler(stream, **codec)


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose answers go through the guard, each method wrapped once."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: DecodeGuard):
        self._inner, self._guard, self._wrapped = inner, guard, {}

    def service(self, details: grpc.HandlerCallDetails):
        handler = self._inner.service(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._guard.guard(handler, details.method)
        if cached is None:  # one entry per method that has a handler: bounded
            self._wrapped[details.method] = (handler, wrapped)
        return wrapped


def enable_reflection(names: list[str], server: grpc.aio.Server) -> None:
    """Serve reflection as v1alpha and v1: one handler under both service names, since the
    two protos differ only in their package name and so are identical on the wire."""
    servicer = reflection.aio.ReflectionServicer(names)
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


async def serve_until_signal(server: grpc.aio.Server, on_stop: Callable[[], Awaitable[None]] | None = None,
                             grace_s: float = 3.0) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("vfmos").info("stopping")
    if on_stop is not None:
        await on_stop()
    await server.stop(grace_s)


def run_daemon(main: Callable[[], Awaitable[None]]) -> int:
    """Run an async daemon main under uvloop; exit codes: 0 clean, 1 startup failure."""
    import uvloop

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
    except DaemonStartError as exc:
        print(f"{os.path.basename(sys.argv[0])}: {exc}", file=sys.stderr)
        return 1
    return 0


def run_configured(name: str, load: Callable[[list[str] | None], Any],
                   serve: Callable[[Any], Awaitable[None]], argv: list[str] | None = None,
                   prepare: Callable[[Any], None] | None = None) -> int:
    """A daemon's main: load its typed config (a bad value is one line and exit 2), make
    its state private, set up logging, `prepare(cfg)` if given, then serve until told to
    stop."""
    from vfmos_runtime.config import ConfigError

    os.umask(PRIVATE_UMASK)  # every file and dir a daemon makes is its user's alone
    try:
        cfg = load(argv)
        logs = log_settings()
        tightened = secure_state(cfg.state_dir, [getattr(cfg, "data_dir", None)])
    except ConfigError as exc:
        print(f"{name}: bad configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{name}: cannot keep its state private: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, logs)
    for change in tightened:
        logging.getLogger(name).warning("%s", change)
    if prepare is not None:
        prepare(cfg)
    return run_daemon(lambda: serve(cfg))


def models_offline(_cfg=None) -> None:
    """Model libraries never reach for a hub at run time, and tokenizers stay single-threaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class DaemonStartError(Exception):
    """A daemon cannot start (bad config, socket in use); printed as one line."""
