"""One error vocabulary: every VfmError maps to its gRPC code and back, quota details survive."""

import grpc
import pytest

from vfmos_runtime import errors


class FakeRpcError(grpc.RpcError):
    """Carries a status the way grpc's own errors do (code, details, trailing metadata)."""

    def __init__(self, status: grpc.Status):
        self._status = status

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


@pytest.mark.parametrize("cls", [
    errors.InvalidArgument, errors.NotFound, errors.PermissionDenied, errors.Unauthenticated,
    errors.FailedPrecondition, errors.Unavailable, errors.Internal, errors.AlreadyExists,
])
def test_round_trip(cls):
    back = errors.from_rpc_error(FakeRpcError(errors.to_status(cls("it broke"))))
    assert type(back) is cls and back.message == "it broke"


def test_quota_failure_detail_round_trips():
    status = errors.to_status(errors.QuotaExceeded("spent", "tokens_per_minute", "pid 4"))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    back = errors.from_rpc_error(FakeRpcError(status))
    assert isinstance(back, errors.QuotaExceeded)
    assert (back.quota, back.subject) == ("tokens_per_minute", "pid 4")


def test_expected_codes():
    assert errors.FailedPrecondition.code == grpc.StatusCode.FAILED_PRECONDITION
    assert errors.QuotaExceeded.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.Unavailable.code == grpc.StatusCode.UNAVAILABLE


def test_quota_refusal_also_carries_a_machine_readable_error_info():
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = errors.to_status(errors.QuotaExceeded("spent", "max_tokens", "pid 4"))
    rich = rpc_status.from_call(FakeRpcError(status))
    infos = [d for d in rich.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert (info.reason, info.domain) == ("QUOTA_MAX_TOKENS", "vfmos.dev")
    assert dict(info.metadata) == {"quota": "max_tokens", "subject": "pid 4"}


def test_a_rate_refusal_says_when_to_retry_in_a_retry_info():
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = errors.to_status(errors.QuotaExceeded("slow down", "key_requests_per_minute",
                                                   "token abc", retry_after_s=12.25))
    rich = rpc_status.from_call(FakeRpcError(status))
    found = [d for d in rich.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(found) == 1
    info = error_details_pb2.RetryInfo()
    found[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() == 12_250_000_000
    back = errors.from_rpc_error(FakeRpcError(status))
    assert back.retry_after_s == 12.25 and back.quota == "key_requests_per_minute"


def test_a_budget_refusal_has_no_retry_info():
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = errors.to_status(errors.QuotaExceeded("spent", "key_max_tokens", "token abc"))
    rich = rpc_status.from_call(FakeRpcError(status))
    assert not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in rich.details)
    assert errors.from_rpc_error(FakeRpcError(status)).retry_after_s == 0.0
