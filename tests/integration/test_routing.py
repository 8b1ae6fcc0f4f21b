"""Routing through the real stack: a process with model "auto" gets a model per Ask from
vfm-modeld's learned router, its usage and audit name the model, the reason and the ask id, it
is charged the answering model's price, `route explain` shows every allowed model, feedback is
taken once per answer and refused for an unknown id or another tenant's Ask, and a tenant's
feedback survives a vfm-modeld restart."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.common import free_port
from libvfm import Client, RoutePolicy
from services.model.registry import DEFAULT_MODELS
from libvfm.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.conftest import serving, start_kernel, wait_for
from tests.integration.test_stack_ask import start_modeld

SMALL, LARGE = "smollm2-135m", "gemma3-270m"
CHEAP = RoutePolicy(quality=0.1, allowed_models=[SMALL, LARGE])  # the small model reaches 10%


@pytest.fixture(scope="module")
def stack():
    state = Path(tempfile.mkdtemp(prefix="vfmr", dir="/tmp"))
    os.chmod(state, 0o755)
    target = f"127.0.0.1:{free_port()}"
    kernel = start_kernel(state, "--listen", target)
    modeld = start_modeld(state)
    admin = Client(state / "vfmd.sock")
    wait_for(lambda: serving(admin, "vfm-modeld"), 600, "vfm-modeld to serve", log=modeld.log)
    alice_token, _ = admin.token_create("alice")
    bob_token, _ = admin.token_create("bob")
    parts = {"state": state, "kernel": kernel, "modeld": modeld, "admin": admin,
             "alice": Client(target=target, token=alice_token),
             "bob": Client(target=target, token=bob_token)}
    yield parts
    for name in ("alice", "bob", "admin"):
        parts[name].close()
    parts["modeld"].stop()
    kernel.stop()
    shutil.rmtree(state, ignore_errors=True)


def test_a_routed_ask_names_its_model_and_is_charged_its_price(stack):
    alice = stack["alice"]
    proc = alice.spawn("router-bot", model="auto", route=CHEAP)
    assert proc.spec.model == "auto" and proc.spec.route.quality == pytest.approx(0.1)
    result = alice.ask(proc.pid, "What is the capital of France?", max_new_tokens=8)
    u = result.usage
    assert u.model == SMALL and "cheapest" in u.route_reason
    assert len(u.ask_id) == 24 and int(u.ask_id, 16)
    price = {m.name: m.cost_per_1k_tokens for m in DEFAULT_MODELS}[SMALL]
    assert u.cost == pytest.approx((u.tokens_in + u.tokens_out) / 1000 * price)
    record = [r for r in alice.audit(pid=proc.pid) if r.kind == "ask"][-1]
    assert record.attributes["ask_id"] == u.ask_id and record.model == SMALL
    assert record.attributes["route_reason"] == u.route_reason


def test_explain_shows_every_allowed_model_and_the_choice(stack):
    alice = stack["alice"]
    pid = alice.spawn("explained", model="auto", route=RoutePolicy(
        quality=0.9, allowed_models=[SMALL, LARGE], max_cost_per_ask=1e-9)).pid
    e = alice.explain_route(pid, "Prove that the square root of 2 is irrational.")
    assert {c.model for c in e.candidates} == {SMALL, LARGE}
    assert all(0 <= c.quality <= 1 and c.cost > 0 for c in e.candidates)
    # Both are over a budget of 1e-9: the cheapest answers, and the notes say why.
    assert e.model == SMALL and all("over budget" in c.note for c in e.candidates)
    fixed = alice.spawn("fixed").pid
    with pytest.raises(FailedPrecondition):
        alice.explain_route(fixed, "Hello?")


def test_routing_options_without_auto_and_unknown_models_are_refused(stack):
    alice = stack["alice"]
    with pytest.raises(InvalidArgument):
        alice.spawn("bad", model=SMALL, route=RoutePolicy(quality=0.5))
    with pytest.raises(InvalidArgument):
        alice.spawn("bad", model="auto", route=RoutePolicy(quality=1.5))
    pid = alice.spawn("nowhere", model="auto", route=RoutePolicy(allowed_models=["no-such"])).pid
    with pytest.raises(NotFound):
        alice.explain_route(pid, "Anything?")


def test_feedback_is_taken_once_and_only_from_the_askers_tenant(stack):
    alice, bob = stack["alice"], stack["bob"]
    pid = alice.spawn("judged", model="auto", route=CHEAP).pid
    ask_id = alice.ask(pid, "Name a colour.", max_new_tokens=4).usage.ask_id
    with pytest.raises(NotFound):
        bob.feedback(ask_id, good=False)          # another tenant's Ask reads as unknown
    with pytest.raises(NotFound):
        alice.feedback("0" * 24, good=True)
    first = alice.feedback(ask_id, good=True, note="short and right")
    assert first.routed and first.tenant_feedback >= 1 and first.audit_seq > 0
    with pytest.raises(AlreadyExists):
        alice.feedback(ask_id, good=False)
    records = [r for r in alice.audit() if r.kind == "feedback"]
    assert records[-1].attributes["ask_id"] == ask_id and records[-1].verdict == "up"
    assert records[-1].reasons == ["short and right"]
    # A fixed-model Ask takes feedback too (audited), without a router to teach.
    plain = alice.spawn("plain").pid
    other = alice.ask(plain, "Name a fruit.", max_new_tokens=4).usage.ask_id
    assert not alice.feedback(other, good=False).routed


def test_a_tenants_feedback_survives_a_modeld_restart(stack):
    alice = stack["alice"]
    pid = alice.spawn("durable", model="auto", route=CHEAP).pid
    before = alice.feedback(alice.ask(pid, "Say hi.", max_new_tokens=4).usage.ask_id, True)
    stack["modeld"].stop()
    stack["modeld"] = start_modeld(stack["state"])
    # The kernel may still list the stopped one as serving (and the new one's socket exists
    # before it registers): wait for the new process's own registration.
    new_pid = stack["modeld"].proc.pid
    wait_for(lambda: serving(stack["admin"], "vfm-modeld", new_pid), 600,
             "vfm-modeld to serve again", log=stack["modeld"].log)
    after = alice.feedback(alice.ask(pid, "Say bye.", max_new_tokens=4).usage.ask_id, True)
    assert after.tenant_feedback == before.tenant_feedback + 1


def test_a_cascade_escalates_an_unsure_answer_and_keeps_a_sure_one(stack):
    alice = stack["alice"]
    prices = {m.name: m.cost_per_1k_tokens for m in DEFAULT_MODELS}
    both = [SMALL, LARGE]
    # No real answer is 99.9% sure of every token: the small model's draft is escalated.
    unsure = alice.spawn("cascade-hi", model="auto", route=RoutePolicy(
        quality=0.0, allowed_models=both, cascade_confidence=0.999)).pid
    u = alice.ask(unsure, "What is the capital of France?", max_new_tokens=8).usage
    assert (u.model, u.escalated_from) == (LARGE, SMALL)
    assert 0 < u.confidence < 1 and "escalated to " + LARGE in u.route_reason
    total = (u.tokens_in + u.tokens_out) / 1000  # both charged, each at its own price
    assert total * prices[SMALL] < u.cost < total * prices[LARGE]
    # Every answer is more than 0.1% sure: the small model's answer is kept and shown.
    sure = alice.spawn("cascade-lo", model="auto", route=RoutePolicy(
        quality=0.0, allowed_models=both, cascade_confidence=0.001)).pid
    kept = alice.ask(sure, "What is the capital of France?", max_new_tokens=8)
    assert kept.usage.model == SMALL and kept.usage.escalated_from == "" and kept.text.strip()
    assert kept.usage.cost == pytest.approx(
        (kept.usage.tokens_in + kept.usage.tokens_out) / 1000 * prices[SMALL])
    # The user's judgement teaches the head of the model that answered.
    assert alice.feedback(kept.usage.ask_id, good=True).routed
    e = alice.explain_route(sure, "What is the capital of France?")
    assert e.model == SMALL and "cascade" in e.reason
