"""The one gRPC boundary of every daemon: VfmError to its status, any other failure to INTERNAL
with an id that is logged, never a traceback to the client."""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from typing import Callable

import grpc

from vfmos_runtime.errors import VfmError, to_status


async def _fail(context, exc: BaseException, name: str, log: logging.Logger) -> None:
    if isinstance(exc, VfmError):
        await context.abort_with_status(to_status(exc))
    incident = secrets.token_hex(4)
    log.error("%s failed (error id %s)", name, incident, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in {name} (error id {incident}; see the daemon's log)")


def rpc(log: logging.Logger) -> Callable:
    """Decorate a servicer method `fn(self, request, context)`: unary (plain or async) or
    streaming (async generator). Errors are mapped here and only here."""

    def wrap(fn):
        name = fn.__name__
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(self, request, context):
                try:
                    async for item in fn(self, request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _fail(context, exc, name, log)
            return stream

        is_async = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def unary(self, request, context):
            try:
                result = fn(self, request, context)
                return await result if is_async else result
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc, name, log)
        return unary
    return wrap
