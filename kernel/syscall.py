"""The syscall decorator: identify the caller, run the handler, map errors to statuses once."""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from libvfm.errors import VfmError, to_status

log = logging.getLogger("vfmd.syscall")


async def abort(context, err: VfmError):
    await context.abort_with_status(to_status(err))


def syscall(fn):
    """Wrap a unary handler `fn(self, caller, request)` (plain or async): identity first,
    errors mapped once."""
    is_async = inspect.iscoroutinefunction(fn)

    @functools.wraps(fn)
    async def handler(self, request, context):
        try:
            caller = self.auth.identify(context.invocation_metadata(), context.peer())
            if is_async:
                return await fn(self, caller, request)
            return fn(self, caller, request)
        except VfmError as err:
            await abort(context, err)
        except Exception:
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__} "
                                "(see the vfmd log)")
    return handler
