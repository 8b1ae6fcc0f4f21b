"""vfm-trustd as a real daemon registered with a real vfmd, called over its Unix socket with
the secret the kernel holds: policies, screening, tests of policies, and the gate."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libvfm import Client
from tests.conftest import Daemon, start_kernel, wait_for
from vfmos.trust.v1 import trust_pb2 as pb
from vfmos.trust.v1 import trust_pb2_grpc
from vfmos_runtime.protocol import KERNEL_SECRET_HEADER

POLICY = """\
level: standard
denied_topics:
  - name: crypto
    description: cryptocurrency investment advice
    patterns: ['\\bbitcoin\\b']
escalation_rules:
  - name: big_refund
    when: {topic: refund, amount_above: 500}
"""
BOB = pb.Scope(tenant="unix:bob")


def start_trustd(state: Path) -> Daemon:
    return Daemon(["-m", "services.trust.main", "--state-dir", str(state),
                   "--kernel-socket", str(state / "vfmd.sock"), "--checks", "rules"],
                  state / "logs" / "vfm-trustd.log").start()


def registered(client: Client) -> int:
    """vfm-trustd's pid once the kernel sees it serving, else 0."""
    return next((d.pid for d in client.services()
                 if d.name == "vfm-trustd" and d.health == "SERVING"), 0)


@pytest.fixture(scope="module")
def trust():
    state = Path(tempfile.mkdtemp(prefix="vfmt", dir="/tmp"))
    os.chmod(state, 0o755)
    kernel = start_kernel(state)
    trustd = start_trustd(state)
    client = Client(state / "vfmd.sock")
    pid = wait_for(lambda: registered(client), 60, "vfm-trustd to serve", log=trustd.log)
    sock = state / "trustd.sock"
    # The same registration again (same address and pid) answers with the secret the kernel
    # already presents to vfm-trustd: the test calls as the kernel does.
    secret = client.register_service("vfm-trustd", f"unix:{sock}", pid).kernel_secret
    channel = grpc.insecure_channel(f"unix:{sock}")
    parts = dict(state=state, kernel=kernel, trustd=trustd, client=client, channel=channel,
                 stub=trust_pb2_grpc.TrustServiceStub(channel),
                 md=((KERNEL_SECRET_HEADER, secret),))
    yield parts
    channel.close()
    client.close()
    parts["trustd"].stop()  # a test restarts it: stop the one running now
    kernel.stop()
    shutil.rmtree(state, ignore_errors=True)


def test_a_bad_policy_is_invalid_argument_with_its_line(trust):
    with pytest.raises(grpc.RpcError) as caught:
        trust["stub"].PutPolicy(pb.PutPolicyRequest(
            scope=BOB, document="level: fast\nthresholds:\n  moderation: 1.4\n",
            filename="policy.yaml", author="unix:bob"), metadata=trust["md"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "policy.yaml:3: thresholds.moderation must be 0..1, got 1.4"


def test_policies_are_versioned_and_the_effective_one_is_served(trust):
    stub, md = trust["stub"], trust["md"]
    first = stub.PutPolicy(pb.PutPolicyRequest(scope=BOB, document="level: fast\n",
                                               filename="p.yaml", author="unix:bob"),
                           metadata=md)
    second = stub.PutPolicy(pb.PutPolicyRequest(scope=BOB, document=POLICY, filename="p.yaml",
                                                author="unix:bob"), metadata=md)
    assert (first.version, second.version) == (1, 2)
    assert len(second.document_sha256) == 64
    process = pb.Scope(tenant="unix:bob", pid=7)
    stub.PutPolicy(pb.PutPolicyRequest(scope=process, document="level: strict\n"), metadata=md)
    got = stub.GetPolicy(pb.GetPolicyRequest(scope=process), metadata=md)
    effective = json.loads(got.effective_json)
    assert (got.origin, got.version, effective["level"]) == ("process", 1, "strict")
    assert effective["denied_topics"][0]["name"] == "crypto"   # the tenant's, underneath
    assert effective["thresholds"]["moderation"] == 0.5        # the default, underneath
    tenant = stub.GetPolicy(pb.GetPolicyRequest(scope=BOB), metadata=md)
    assert (tenant.origin, tenant.version, tenant.document) == ("tenant", 2, POLICY)
    other = stub.GetPolicy(pb.GetPolicyRequest(scope=pb.Scope(tenant="unix:alice")),
                           metadata=md)
    assert (other.origin, other.version, other.document) == ("default", 0, "")


def test_screen_input_refuses_a_denied_topic_and_escalates_a_big_refund(trust):
    stub, md = trust["stub"], trust["md"]
    stub.PutPolicy(pb.PutPolicyRequest(scope=BOB, document=POLICY), metadata=md)
    refused = stub.ScreenInput(pb.ScreenInputRequest(
        scope=BOB, question="Should I put my savings into bitcoin?",
        items=[pb.Item(kind=pb.ITEM_KIND_KNOWLEDGE, id="kb:1", text="Opening hours: 9-5.")]),
        metadata=md)
    assert refused.verdict.outcome == pb.OUTCOME_REFUSE
    assert any("crypto" in r for r in refused.verdict.reasons)
    assert refused.verdict.holding_reply and refused.verdict.policy_version >= 2
    assert [(i.id, i.dropped) for i in refused.items] == [("kb:1", False)]
    held = stub.ScreenInput(pb.ScreenInputRequest(scope=BOB, question="Refund me $900 now"),
                            metadata=md)
    assert held.verdict.outcome == pb.OUTCOME_ESCALATE
    assert held.verdict.escalation_rule == "big_refund"
    alice = stub.ScreenInput(pb.ScreenInputRequest(scope=pb.Scope(tenant="unix:alice"),
                                                   question="Should I buy bitcoin?"),
                             metadata=md)
    assert alice.verdict.outcome == pb.OUTCOME_ALLOW       # bob's policy is bob's


def test_check_output_cuts_a_leaked_secret(trust):
    out = trust["stub"].CheckOutput(pb.CheckOutputRequest(
        scope=BOB, text="Sure. The admin key is sk-live-4f9a8b7c6d5e, use it well.",
        final=True, protected_texts=["Admin key: sk-live-4f9a8b7c6d5e. Never share it."]),
        metadata=trust["md"])
    assert out.cut and out.verdict.outcome == pb.OUTCOME_REFUSE
    assert out.text == "Sure. The admin key is "


def test_test_policy_scores_a_text_without_storing_the_document(trust):
    stub, md = trust["stub"], trust["md"]
    before = stub.GetPolicy(pb.GetPolicyRequest(scope=BOB), metadata=md).version
    reply = stub.TestPolicy(pb.TestPolicyRequest(
        scope=BOB, document=POLICY + "regexes:\n  - {name: tickets, pattern: 'T-\\d+', "
                                     "action: redact}\n",
        filename="try.yaml", text="Is bitcoin a good idea?", output_text="See T-123."),
        metadata=md)
    assert reply.input.outcome == pb.OUTCOME_REFUSE
    assert reply.HasField("output") and reply.output.outcome == pb.OUTCOME_REDACT
    assert reply.output.redacted_text == "See [TICKETS]."
    assert [c.check for c in reply.input.checks] == ["rules"]
    assert stub.GetPolicy(pb.GetPolicyRequest(scope=BOB), metadata=md).version == before
    with pytest.raises(grpc.RpcError) as caught:
        stub.TestPolicy(pb.TestPolicyRequest(scope=BOB, document="levle: fast\n",
                                             filename="try.yaml", text="hi"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "try.yaml:1: levle is not a known setting (did you mean 'level'?)" \
        in caught.value.details()


@pytest.mark.parametrize("request_, field", [
    (pb.ScreenInputRequest(question="hi"), "scope.tenant"),
    (pb.ScreenInputRequest(scope=BOB, question="hi", items=[pb.Item(text="x")]),
     "items[0].kind"),
    (pb.CheckOutputRequest(scope=BOB, text="abc", released=10), "released"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(trust, request_, field):
    method = {"ScreenInputRequest": trust["stub"].ScreenInput,
              "CheckOutputRequest": trust["stub"].CheckOutput}[type(request_).__name__]
    with pytest.raises(grpc.RpcError) as caught:
        method(request_, metadata=trust["md"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)


@pytest.mark.parametrize("metadata", [(), ((KERNEL_SECRET_HEADER, "guessed"),)])
def test_a_caller_without_the_kernels_secret_is_unauthenticated(trust, metadata):
    stub = trust["stub"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetPolicy(pb.GetPolicyRequest(scope=BOB), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(trust["channel"]).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_policies_survive_a_restart_of_the_daemon(trust):
    stub, md = trust["stub"], trust["md"]
    version = stub.GetPolicy(pb.GetPolicyRequest(scope=BOB), metadata=md).version
    assert version >= 2
    assert trust["trustd"].stop() == 0
    trust["trustd"] = start_trustd(trust["state"])
    client = trust["client"]
    wait_for(lambda: registered(client) == trust["trustd"].proc.pid, 60,
             "vfm-trustd to serve again", log=trust["trustd"].log)
    secret = client.register_service("vfm-trustd", f"unix:{trust['state'] / 'trustd.sock'}",
                                     trust["trustd"].proc.pid).kernel_secret
    again = stub.GetPolicy(pb.GetPolicyRequest(scope=BOB),
                           metadata=((KERNEL_SECRET_HEADER, secret),))
    assert again.version == version and again.document == POLICY
