"""The syscall decorator: identify the caller, hold it to its token's limits, run the handler."""

from __future__ import annotations

import functools
import inspect
import logging

from vfmos_runtime.boundary import rpc

log = logging.getLogger("vfmd.syscall")


def syscall(fn):
    """Wrap a handler `fn(self, caller, request)` (plain, async, or an async generator for a
    server stream): identity first, then the caller's bearer token's request rate and calls
    in flight (a stream is in flight until it ends), errors mapped once by
    `vfmos_runtime.boundary`."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            caller = self.auth.identify(context.invocation_metadata(), context.peer())
            with self.auth.keys.call(caller.key):
                async for item in fn(self, caller, request):
                    yield item
        return rpc(log)(stream)

    is_async = inspect.iscoroutinefunction(fn)

    @functools.wraps(fn)
    async def unary(self, request, context):
        caller = self.auth.identify(context.invocation_metadata(), context.peer())
        with self.auth.keys.call(caller.key):
            result = fn(self, caller, request)
            return await result if is_async else result
    return rpc(log)(unary)
