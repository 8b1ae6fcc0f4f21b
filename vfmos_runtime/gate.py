"""Only the kernel may call a service: a server interceptor that admits a call only when it
carries the secret the kernel handed this service at registration (metadata x-vfm-kernel).

Health and reflection stay open: they say whether a service serves, not what it holds."""

from __future__ import annotations

import hmac

import grpc

from vfmos_runtime.protocol import KERNEL_SECRET_HEADER

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class KernelGate(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, secret: str = ""):
        self.service = service
        self._secret = secret

    def admit(self, secret: str) -> None:
        """The secret the kernel presents from now on (set at each registration)."""
        self._secret = secret

    def allows(self, metadata) -> bool:
        presented = next((v for k, v in metadata or () if k == KERNEL_SECRET_HEADER), "")
        if not self._secret or not isinstance(presented, str) or not presented:
            return False
        return hmac.compare_digest(presented.encode(), self._secret.encode())

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        if self.allows(details.invocation_metadata):
            return handler
        return _refusal(handler, f"only the kernel may call {self.service}; "
                                 "go through vfmd (libvfm or vfmctl)")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as a streaming handler must be

    codec = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)
