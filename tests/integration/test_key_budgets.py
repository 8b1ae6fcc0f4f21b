"""Key budgets on a real stack: a real vfmd serving its Unix socket and TCP, real LMDB, the
fake-fast model service (bench/fake_modeld.py, a real gRPC server, a few ms a token). A bearer
token's request rate, calls in flight, token budget and usage hold over both transports, under
concurrency and across a kernel restart."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from libvfm import AsyncClient, Client, TokenLimits
from libvfm.errors import QuotaExceeded
from tests.conftest import Daemon, free_port, serving, start_kernel, wait_for
from vfmos.kernel.v1 import kernel_pb2 as pb
from vfmos_runtime.credentials import fetch_ticket
from vfmos.kernel.v1 import kernel_pb2_grpc

PROMPT = "Tell me a story."
PROMPT_TOKENS = 9  # what the fake model counts for it: 4 words, 4 for the message, 1


class Stack:
    def __init__(self, state: Path):
        self.state, self.port = state, free_port()
        self.modeld: Daemon | None = None
        self.start_kernel()
        self.modeld = Daemon(["-m", "bench.fake_modeld", "--socket", str(state / "fake.sock"),
                              "--kernel-socket", str(state / "vfmd.sock"),
                              "--token-delay-ms", "2"], state / "logs" / "fake.log").start()
        wait_for(lambda: serving(self.admin, "vfm-modeld"), 60, "the fake vfm-modeld to serve",
                 log=self.modeld.log)

    def start_kernel(self) -> None:
        self.kernel = start_kernel(self.state, "--listen", f"127.0.0.1:{self.port}")
        self.admin = Client(self.state / "vfmd.sock", timeout=30)

    def restart_kernel(self) -> None:
        self.admin.close()
        assert self.kernel.stop() == 0
        self.start_kernel()
        wait_for(lambda: serving(self.admin, "vfm-modeld"), 60, "vfm-modeld to register again",
                 log=self.modeld.log)

    def token(self, **limits) -> tuple[str, str]:
        return self.admin.token_create("alice", limits=TokenLimits(**limits))

    def tcp(self, secret: str, cls=Client):
        return cls(target=f"127.0.0.1:{self.port}", token=secret, timeout=30)

    def unix(self, secret: str, cls=Client):
        return cls(target=f"unix:{self.state / 'vfmd.sock'}", token=secret, timeout=30)

    def listed(self, token_id: str):
        return next(t for t in self.admin.token_list() if t.token_id == token_id)

    def close(self) -> None:
        self.admin.close()
        for daemon in (self.modeld, self.kernel):
            if daemon is not None:
                daemon.stop()


@pytest.fixture
def stack():
    state = Path(tempfile.mkdtemp(prefix="vfmk", dir="/tmp"))
    os.chmod(state, 0o755)
    parts = Stack(state)
    yield parts
    parts.close()
    shutil.rmtree(state, ignore_errors=True)


def test_the_request_past_the_rate_is_refused_on_either_transport_with_a_retry_delay(stack):
    secret, token_id = stack.token(requests_per_minute=5)
    with stack.tcp(secret) as tcp, stack.unix(secret) as local:
        for client in (tcp, tcp, local, tcp, local):  # one window, whatever the transport
            client.ping()
        with pytest.raises(QuotaExceeded) as info:
            local.whoami()
        assert info.value.quota == "key_requests_per_minute"
        assert 0 < info.value.retry_after_s <= 60 and "retry in" in info.value.message
        with pytest.raises(QuotaExceeded):
            tcp.ping()
    stack.admin.ping()  # a caller without the token is not held to its rate


def test_a_refusal_carries_quota_failure_and_retry_info_to_a_raw_grpc_client(stack):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    secret, _ = stack.token(requests_per_minute=1)
    meta = (("authorization", f"Bearer {secret}"),)
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        stub.Ping(pb.PingRequest(), metadata=meta)
        with pytest.raises(grpc.RpcError) as info:
            stub.Ping(pb.PingRequest(), metadata=meta)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    kinds = {d.type_url.rsplit(".", 1)[-1]: d for d in rpc_status.from_call(info.value).details}
    assert {"QuotaFailure", "ErrorInfo", "RetryInfo"} <= set(kinds)
    retry = error_details_pb2.RetryInfo()
    kinds["RetryInfo"].Unpack(retry)
    assert 0 < retry.retry_delay.seconds <= 60


def test_calls_past_max_concurrent_are_refused_while_an_ask_stream_is_open(stack):
    secret, _ = stack.token(max_concurrent=1)
    with stack.tcp(secret) as asker, stack.unix(secret) as other:
        pid = asker.spawn("p").pid
        stream = asker.ask_stream(pid, PROMPT, max_new_tokens=4096, stateless=True)
        assert isinstance(next(stream), str)  # the answer has begun: the stream is open
        with pytest.raises(QuotaExceeded) as info:
            other.ping()
        assert info.value.quota == "key_max_concurrent"
        stack.admin.ping()  # other callers are not affected
        stream.close()  # the caller goes away: the Ask ends and its call with it
        wait_for(lambda: _pings(other), 10, "the token's call slot to be free")


def _pings(client) -> bool:
    try:
        client.ping()
        return True
    except QuotaExceeded:
        return False


def test_concurrent_asks_on_one_key_never_pass_its_token_budget(stack):
    budget = 8 * PROMPT_TOKENS + 100  # every prompt fits; 8 answers of 64 share 100 tokens
    secret, token_id = stack.token(max_tokens=budget)

    async def scenario():
        async with stack.tcp(secret, AsyncClient) as client:
            pid = (await client.spawn("p")).pid
            results = await asyncio.gather(
                *(client.ask(pid, PROMPT, max_new_tokens=64, stateless=True) for _ in range(8)),
                return_exceptions=True)
            with pytest.raises(QuotaExceeded) as refused:
                await client.ask(pid, PROMPT, max_new_tokens=8, stateless=True)
            return results, refused.value
    results, refused = asyncio.run(scenario())
    answered = [r for r in results if not isinstance(r, BaseException)]
    for r in results:
        assert not isinstance(r, BaseException) or isinstance(r, QuotaExceeded), r
    used = sum(r.usage.tokens_in + r.usage.tokens_out for r in answered)
    assert used <= budget
    assert any(r.finish_reason == "quota" for r in answered)
    assert stack.listed(token_id).tokens_used == used
    assert refused.quota == "key_max_tokens"


def test_key_usage_survives_a_kernel_restart(stack):
    secret, token_id = stack.token(max_tokens=PROMPT_TOKENS + 20)
    with stack.unix(secret) as client:
        pid = client.spawn("p").pid
        result = client.ask(pid, PROMPT, max_new_tokens=100, stateless=True)
    assert result.finish_reason == "quota" and result.usage.tokens_out == 20
    assert stack.listed(token_id).tokens_used == PROMPT_TOKENS + 20
    stack.restart_kernel()
    listed = stack.listed(token_id)
    assert listed.tokens_used == PROMPT_TOKENS + 20 and listed.limits.max_tokens == 29
    with stack.tcp(secret) as client:
        with pytest.raises(QuotaExceeded) as info:
            client.ask(pid, PROMPT, max_new_tokens=5, stateless=True)
    assert info.value.quota == "key_max_tokens"


def test_the_kernel_refuses_bad_limits_that_a_client_did_not_check(stack):
    channel = grpc.insecure_channel(f"unix:{stack.state / 'vfmd.sock'}")
    meta = (("x-vfm-ticket", fetch_ticket(stack.state / "vfmd.sock")),)
    with channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        for limits in (pb.TokenLimits(max_tokens=-1), pb.TokenLimits(cost_budget=float("nan")),
                       pb.TokenLimits(max_concurrent=-2)):
            with pytest.raises(grpc.RpcError) as info:
                stub.CreateToken(pb.CreateTokenRequest(tenant="alice", limits=limits),
                                 metadata=meta)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stack.admin.token_list() == []
