"""One error vocabulary for VFMOS, shared by the daemons and the client, with its gRPC mapping."""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class VfmError(Exception):
    """Base of every error VFMOS reports; `code` is the gRPC status it travels as."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(VfmError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VfmError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VfmError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(VfmError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(VfmError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(VfmError):
    """An illegal state transition, or an operation the current state forbids."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(VfmError):
    """A daemon or service is down; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(VfmError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(VfmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(VfmError):
    code = grpc.StatusCode.INTERNAL


class QuotaExceeded(VfmError):
    """A quota is spent; `quota` names it (max_tokens, tokens_per_minute, ...).
    `retry_after_s` > 0: the quota is a rate and one more call fits after that many seconds
    (it travels as a google.rpc.RetryInfo, which an HTTP gateway turns into Retry-After)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, quota: str = "", subject: str = "",
                 retry_after_s: float = 0.0):
        super().__init__(message)
        self.quota = quota
        self.subject = subject
        self.retry_after_s = retry_after_s


_BY_CODE: dict[grpc.StatusCode, type[VfmError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
        FailedPrecondition, Unavailable, Cancelled, DeadlineExceeded, Internal, QuotaExceeded,
    )
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_for_code(number: int, message: str) -> VfmError:
    """The typed VfmError for a gRPC status code sent as a number (an error reported inside
    a message, as GenerateMany reports one generation's)."""
    code = _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, Internal)(message or str(code))


ERROR_DOMAIN = "vfmos.dev"


def _packed(detail) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


# An error's message travels in a trailer, percent-encoded (a non-ASCII byte takes three), and
# again inside grpc-status-details-bin; gRPC drops a call whose trailers pass 8 KiB (the client
# then reads RESOURCE_EXHAUSTED, not the error). Messages that echo a caller's huge input are cut
# to this many UTF-8 bytes.
MAX_ERROR_MESSAGE_BYTES = 1024


def short_message(message: str) -> str:
    """`message`, cut to MAX_ERROR_MESSAGE_BYTES of UTF-8 with a note of how much was left out."""
    raw = message.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_ERROR_MESSAGE_BYTES:
        return message
    kept = raw[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", "ignore")
    return f"{kept}... ({len(message) - len(kept)} more characters)"


def to_status(err: VfmError) -> grpc.Status:
    """The rich gRPC status for `err`: a quota refusal carries a QuotaFailure naming the quota
    and an ErrorInfo whose reason (QUOTA_MAX_TOKENS, ...) programs can switch on, and a
    RetryInfo when it says when to try again."""
    details = []
    if isinstance(err, QuotaExceeded):
        details.append(_packed(error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(
                subject=short_message(err.subject), description=err.quota)])))
        reason = f"QUOTA_{err.quota.upper()}" if err.quota else "QUOTA_EXCEEDED"
        details.append(_packed(error_details_pb2.ErrorInfo(
            reason=reason, domain=ERROR_DOMAIN,
            metadata={"quota": err.quota, "subject": short_message(err.subject)})))
        if err.retry_after_s > 0:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(math.ceil(err.retry_after_s * 1e9))
            details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=err.code.value[0], message=short_message(err.message),
                               details=details)
    return rpc_status.to_status(status)


def from_rpc_error(exc: grpc.RpcError) -> VfmError:
    """The typed VfmError for an RpcError raised by a gRPC call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else "") or str(code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        quota, subject, retry_after_s = _quota_violation(exc)
        return QuotaExceeded(message, quota=quota, subject=subject, retry_after_s=retry_after_s)
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in message.lower():
        message = f"cannot reach the daemon ({message})"
    return _BY_CODE.get(code, Internal)(message)


def _quota_violation(exc: grpc.RpcError) -> tuple[str, str, float]:
    """The quota's name, its subject and the seconds to wait (0: not said) of a refusal."""
    try:
        status = rpc_status.from_call(exc)
    except (AttributeError, ValueError):
        return "", "", 0.0
    quota = subject = ""
    retry_after_s = 0.0
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            if failure.violations and not quota:
                quota, subject = failure.violations[0].description, failure.violations[0].subject
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after_s = max(0.0, info.retry_delay.ToNanoseconds() / 1e9)
    return quota, subject, retry_after_s
