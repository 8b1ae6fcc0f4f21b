"""libvfm's errors: the one VFMOS vocabulary (defined in vfmos_runtime.errors), for callers."""

from vfmos_runtime.errors import (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition,
                                  Internal, InvalidArgument, NotFound, PermissionDenied,
                                  QuotaExceeded, Unauthenticated, Unavailable, VfmError,
                                  from_rpc_error)

__all__ = ["AlreadyExists", "Cancelled", "DeadlineExceeded", "FailedPrecondition", "Internal",
           "InvalidArgument", "NotFound", "PermissionDenied", "QuotaExceeded", "Unauthenticated",
           "Unavailable", "VfmError", "from_rpc_error"]
