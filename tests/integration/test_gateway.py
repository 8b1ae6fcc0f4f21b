"""vfm-gatewayd against real daemons (vfmd, vfm-datad, vfm-modeld with the tiny real model),
driven by the official OpenAI Python SDK (sync, async, streaming), curl, plain HTTP and the
OpenAI Node.js SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import httpx
import openai
import pytest

from concurrent.futures import ThreadPoolExecutor

from libvfm import Client, Quota, TokenLimits
from tests.conftest import REPO, Daemon, node_example, serving, start_kernel, wait_for

NODE_EXAMPLE = REPO / "examples" / "openai-node"


@pytest.fixture(scope="module")
def gw():
    state = Path(tempfile.mkdtemp(prefix="vfmg", dir="/tmp"))
    os.chmod(state, 0o755)
    kernel = start_kernel(state)
    sock = str(state / "vfmd.sock")
    daemons = [Daemon(["-m", module, "--state-dir", str(state), "--kernel-socket", sock, *extra],
                      state / "logs" / f"{name}.log").start()
               for name, module, extra in (
                   ("vfm-modeld", "services.model.main", ()),
                   ("vfm-datad", "services.data.main", ("--summary-pages", "0")),
                   ("vfm-gatewayd", "services.gateway.main", ("--listen", "127.0.0.1:0")))]
    admin = Client(state / "vfmd.sock")
    wait_for(lambda: serving(admin, "vfm-modeld") and serving(admin, "vfm-datad"), 600,
             "vfm-modeld and vfm-datad to serve", log=daemons[0].log)
    wait_for(lambda: (state / "gateway.addr").exists(), 60, "the gateway to listen",
             log=daemons[2].log)
    key, _ = admin.token_create("acme")
    other, _ = admin.token_create("globex")
    acme = Client(state / "vfmd.sock", token=key)
    acme.spawn("helper")
    base = (state / "gateway.addr").read_text().strip() + "/v1"
    parts = {"state": state, "base": base, "key": key, "other": other, "acme": acme,
             "admin": admin, "kernel": kernel, "daemons": daemons,
             "sdk": openai.OpenAI(base_url=base, api_key=key, max_retries=0)}
    yield parts
    acme.close()
    admin.close()
    for daemon in reversed(daemons):
        daemon.stop()
    kernel.stop()
    shutil.rmtree(state, ignore_errors=True)


def pid_of(gw, name: str) -> int:
    return next(p.pid for p in gw["acme"].ps() if p.name == name)


def remembered(gw, pid: int, speaker: str, text: str) -> int:
    """How many entries of the process's memory are exactly this turn."""
    hits = gw["acme"].recall(pid, text, k=50)
    return sum(1 for h in hits if h.entry.speaker == speaker and h.entry.text == text)


def test_models_are_the_callers_processes(gw):
    ids = [m.id for m in gw["sdk"].models.list()]
    assert ids == ["helper"]
    one = gw["sdk"].models.retrieve("helper")
    assert one.id == "helper" and one.owned_by == "acme"
    stranger = openai.OpenAI(base_url=gw["base"], api_key=gw["other"], max_retries=0)
    assert [m.id for m in stranger.models.list()] == []  # another tenant sees none of acme's
    with pytest.raises(openai.NotFoundError):
        stranger.chat.completions.create(model="helper",
                                         messages=[{"role": "user", "content": "hi"}])


def test_chat_completion_answers_within_max_tokens(gw):
    reply = gw["sdk"].chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["vfm"]["pid"] == pid_of(gw, "helper")
    # max_completion_tokens is the newer spelling of the same cap
    newer = gw["sdk"].chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "Count to twenty."}],
        max_completion_tokens=3)
    assert newer.usage.completion_tokens <= 3 and newer.choices[0].finish_reason == "length"


def test_streamed_chat_with_usage_matches_its_own_text(gw):
    chunks = list(gw["sdk"].chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason]
    assert text.strip() and finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 8
    assert len({c.id for c in chunks}) == 1
    plain = list(gw["sdk"].chat.completions.create(
        model="helper", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
        stream=True))
    assert all(c.usage is None for c in plain)  # usage only when asked for


def test_async_client_answers_concurrently(gw):
    async def ask_three():
        client = openai.AsyncOpenAI(base_url=gw["base"], api_key=gw["key"], max_retries=0)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model="helper", messages=[{"role": "user", "content": f"Spell {w}."}],
                max_tokens=5) for w in ("cat", "dog", "owl")))
        finally:
            await client.close()
    replies = asyncio.run(ask_three())
    assert len({r.id for r in replies}) == 3
    assert all(r.choices[0].message.content.strip() for r in replies)


def test_resent_conversation_is_remembered_once_and_system_message_never(gw):
    gw["acme"].spawn("chatter")
    pid = pid_of(gw, "chatter")
    system = "You are terse. Reply with one word when you can."
    first_q = "My cat is called Miso. What is a cat?"
    first = gw["sdk"].chat.completions.create(model="chatter", max_tokens=10, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": first_q}])
    answer = first.choices[0].message.content
    app_turn = "Noted: Miso is a cat."  # an assistant turn the app wrote, never generated
    history = [{"role": "system", "content": system}, {"role": "user", "content": first_q},
               {"role": "assistant", "content": answer},
               {"role": "user", "content": "Remember that."},
               {"role": "assistant", "content": app_turn}]
    answers = [answer]
    for question in ("What is my cat called?", "Is Miso a dog?"):
        reply = gw["sdk"].chat.completions.create(model="chatter", max_tokens=8, messages=[
            *history, {"role": "user", "content": question}])
        answers.append(reply.choices[0].message.content)
        history += [{"role": "user", "content": question},
                    {"role": "assistant", "content": answers[-1]}]
    assert remembered(gw, pid, "user", first_q) == 1
    # each answer the model gave is in memory once (the same words twice are two answers)
    assert remembered(gw, pid, "assistant", answer) == answers.count(answer)
    assert remembered(gw, pid, "user", "Remember that.") == 1
    assert remembered(gw, pid, "assistant", app_turn) == 1
    assert remembered(gw, pid, "user", "What is my cat called?") == 1
    assert remembered(gw, pid, "system", system) == 0
    assert all(h.entry.text != system for h in gw["acme"].recall(pid, system, k=50))


def test_system_message_reaches_the_model(gw):
    gw["acme"].spawn("plain")
    gw["acme"].spawn("ruled")
    question = [{"role": "user", "content": "What is two plus two?"}]
    rules = "Answer in French. " * 20
    plain = gw["sdk"].chat.completions.create(model="plain", max_tokens=4, messages=question)
    ruled = gw["sdk"].chat.completions.create(
        model="ruled", max_tokens=4, messages=[{"role": "developer", "content": rules},
                                               *question])
    # the instructions are read by the model: about 80 more prompt tokens
    assert ruled.usage.prompt_tokens - plain.usage.prompt_tokens >= 60


def test_completions_are_stateless(gw):
    gw["acme"].spawn("completer")
    pid = pid_of(gw, "completer")
    prompt = "The capital of France is"
    reply = gw["sdk"].completions.create(model="completer", prompt=prompt, max_tokens=5)
    assert reply.object == "text_completion" and reply.choices[0].text.strip()
    assert 0 < reply.usage.completion_tokens <= 5
    streamed = list(gw["sdk"].completions.create(model="completer", prompt=prompt,
                                                 max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed).strip()
    assert remembered(gw, pid, "user", prompt) == 0


def test_responses_api_plain_and_streamed(gw):
    reply = gw["sdk"].responses.create(model="helper", input="Say yes.",
                                       instructions="Be brief.", max_output_tokens=16)
    assert reply.object == "response" and reply.output_text.strip()
    assert reply.status in ("completed", "incomplete") and reply.usage.output_tokens <= 16
    events = list(gw["sdk"].responses.create(
        model="helper", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Say no."}]}], max_output_tokens=16, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.strip() and deltas == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_embeddings_float_and_base64(gw):
    texts = ["a cat sat on the mat", "a kitten rested on the rug", "quarterly tax filing"]
    plain = gw["sdk"].embeddings.create(model="all-MiniLM-L6-v2", input=texts,
                                        encoding_format="float")
    vectors = [d.embedding for d in plain.data]
    assert [len(v) for v in vectors] == [384] * 3
    assert all(abs(math.fsum(x * x for x in v) - 1) < 1e-3 for v in vectors)
    dot = lambda a, b: math.fsum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]) + 0.2
    assert plain.usage.prompt_tokens > 10
    # the SDK asks for base64 by default and decodes it itself
    packed = gw["sdk"].embeddings.create(model="helper", input="a cat sat on the mat")
    alone = gw["sdk"].embeddings.create(model="helper", input="a cat sat on the mat",
                                        encoding_format="float").data[0].embedding
    assert max(abs(a - b) for a, b in zip(packed.data[0].embedding, alone)) < 1e-6
    # A text embedded alone takes the lean pass (no padding) and matches its row in a batch
    # up to the embedder's rounding (bf16 where the CPU has it); another text is far off.
    assert max(abs(a - b) for a, b in zip(alone, vectors[0])) < 1e-2
    assert max(abs(a - b) for a, b in zip(alone, vectors[1])) > 5e-2
    raw = httpx.post(f"{gw['base']}/embeddings", headers={"authorization": f"Bearer {gw['key']}"},
                     json={"model": "helper", "input": "x", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert len(decoded) == 384
    with pytest.raises(openai.NotFoundError):
        gw["sdk"].embeddings.create(model="no-such-model", input="x")


@pytest.mark.parametrize("call, status, param", [
    ({"model": "helper", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"model": "helper", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ({"model": "helper", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"model": "helper", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens"),
    ({"model": "helper", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     400, "temperature"),
    ({"model": "helper", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}, 404, None),
])
def test_bad_requests_get_openai_errors(gw, call, status, param):
    reply = httpx.post(f"{gw['base']}/chat/completions", json=call,
                       headers={"authorization": f"Bearer {gw['key']}"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"


def test_keys_and_bodies_are_checked(gw):
    url = f"{gw['base']}/chat/completions"
    body = {"model": "helper", "messages": [{"role": "user", "content": "x"}]}
    for headers in ({}, {"authorization": "Bearer vfm_not-a-real-key"},
                    {"authorization": "Basic abc"}):
        reply = httpx.post(url, json=body, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    bad = httpx.post(url, content=b"{not json", headers={"authorization": f"Bearer {gw['key']}"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    assert httpx.get(f"{gw['base']}/nowhere").status_code == 404
    assert httpx.get(url).status_code == 405
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw["base"], api_key="vfm_wrong", max_retries=0).models.list()


def test_a_spent_quota_is_429_with_retry_after(gw):
    gw["acme"].spawn("budgeted", quota=Quota(max_tokens=60))
    gw["acme"].spawn("limited", quota=Quota(tokens_per_minute=30))
    messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
    for name, kind in (("budgeted", "insufficient_quota"), ("limited", "rate_limit_error")):
        codes = []
        for _ in range(4):
            reply = httpx.post(f"{gw['base']}/chat/completions",
                               headers={"authorization": f"Bearer {gw['key']}"},
                               json={"model": name, "messages": messages, "max_tokens": 40})
            codes.append(reply.status_code)
            if reply.status_code == 429:
                break
        assert codes[-1] == 429, (name, codes)
        assert int(reply.headers["retry-after"]) >= 1 and reply.json()["error"]["type"] == kind
    with pytest.raises(openai.RateLimitError):
        gw["sdk"].chat.completions.create(model="budgeted", messages=messages)


def test_a_keys_token_budget_holds_under_concurrent_http_calls(gw):
    budget = 400
    key, key_id = gw["admin"].token_create("acme", limits=TokenLimits(max_tokens=budget))
    body = {"model": "helper", "max_tokens": 48,
            "messages": [{"role": "user", "content": "Describe the sea in detail."}]}

    def call(_):
        reply = httpx.post(f"{gw['base']}/chat/completions", json=body, timeout=300,
                           headers={"authorization": f"Bearer {key}"})
        return reply.status_code, reply.json(), reply.headers
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(call, range(16)))
    answered = [b for code, b, _ in replies if code == 200]
    refused = [(b, h) for code, b, h in replies if code == 429]
    assert answered and refused and len(answered) + len(refused) == 16
    spent = sum(b["usage"]["total_tokens"] for b in answered)
    used = next(t for t in gw["admin"].token_list() if t.token_id == key_id).tokens_used
    assert spent == used <= budget  # never over, and every token accounted
    for b, headers in refused:
        assert b["error"]["type"] == "insufficient_quota" and headers["x-should-retry"] == "false"
        assert int(headers["retry-after"]) >= 1


def test_a_keys_request_rate_is_429_with_the_kernels_retry_after(gw):
    key, _ = gw["admin"].token_create("acme", limits=TokenLimits(requests_per_minute=3))
    codes, last = [], None
    for _ in range(5):
        last = httpx.get(f"{gw['base']}/models", headers={"authorization": f"Bearer {key}"})
        codes.append(last.status_code)
    assert codes[:3] == [200] * 3 and codes[3:] == [429, 429]
    assert last.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(last.headers["retry-after"]) <= 60 and "x-should-retry" not in last.headers


def test_curl_streams_server_sent_events(gw):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "helper", "stream": True, "max_tokens": 6,
                       "messages": [{"role": "user", "content": "Say hi."}]})
    done = subprocess.run([curl, "-sS", "-N", f"{gw['base']}/chat/completions",
                           "-H", f"Authorization: Bearer {gw['key']}",
                           "-H", "Content-Type: application/json", "-d", body],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    events = [line[6:] for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()


@pytest.fixture(scope="module")
def node():
    return node_example(NODE_EXAMPLE, "openai")


def test_openai_node_sdk_chats_plain_and_streamed(gw, node):
    done = subprocess.run([node, "chat.js", gw["base"], gw["key"], "helper", "Say hello."],
                          cwd=NODE_EXAMPLE, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["answer"].strip() and out["streamed"].strip()
    assert out["finish_reason"] in ("stop", "length")
    assert 0 < out["usage"]["completion_tokens"] <= 12
    assert 0 < out["streamed_usage"]["completion_tokens"] <= 12
    wrong = subprocess.run([node, "chat.js", gw["base"], "vfm_wrong", "helper", "hi"],
                           cwd=NODE_EXAMPLE, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_a_service_down_is_503(gw):
    """Last: it stops vfm-datad."""
    datad = gw["daemons"][1]
    datad.stop()
    wait_for(lambda: not serving(gw["admin"], "vfm-datad"), 30, "vfm-datad to be seen down")
    reply = httpx.post(f"{gw['base']}/embeddings", json={"model": "helper", "input": "x"},
                       headers={"authorization": f"Bearer {gw['key']}"})
    assert reply.status_code == 503 and reply.json()["error"]["type"] == "service_unavailable"
    # an Ask still answers without memory, and says so
    chat = gw["sdk"].chat.completions.create(model="helper", max_tokens=4,
                                             messages=[{"role": "user", "content": "Hi."}])
    assert chat.choices[0].message.content.strip()
    assert any(d["kind"] == "memory-unavailable" for d in chat.model_extra["vfm"]["degraded"])
