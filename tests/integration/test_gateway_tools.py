"""Tool calls through vfm-gatewayd to a model behind a real OpenAI-compatible server: the
llama.cpp server (`llama_cpp.server`, chatml-function-calling) on the packaged SmolLM2 GGUF,
registered with vfm-modeld as an "openai" backend. A local model refuses tools with a 400."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import openai
import pytest

from libvfm import Client
from tests.conftest import REPO, Daemon, free_port, serving, start_kernel, wait_for

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server.app", reason="the llama.cpp server needs the test "
                                                       "extra: pip install -e '.[test]'")
    from services.model.local import gguf_file
    from services.model.registry import ModelRegistry
    from vfmos_runtime.paths import cache_root
    gguf = gguf_file(ModelRegistry.load().get(""), cache_root())
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.llama_kernels", "--model", str(gguf),
                                 "--chat_format", "chatml-function-calling", "--n_ctx", "2048",
                                 "--n_threads", "1", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{port}/v1/models") or proc.poll() is not None,
                 120, "the llama.cpp server", log=log.read_text)
        assert proc.poll() is None, log.read_text()[-2000:]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def tools_gw(llama_server):
    state = Path(tempfile.mkdtemp(prefix="vfmx", dir="/tmp"))
    os.chmod(state, 0o755)
    models = state / "models.json"
    models.write_text(json.dumps({"models": [{"name": "remote-smol", "backend": "openai",
                                              "base_url": llama_server,
                                              "remote_model": "smollm2"}]}))
    kernel = start_kernel(state)
    sock = str(state / "vfmd.sock")
    modeld = Daemon(["-m", "services.model.main", "--state-dir", str(state), "--kernel-socket",
                     sock, "--models", str(models)], state / "logs" / "vfm-modeld.log").start()
    gateway = Daemon(["-m", "services.gateway.main", "--state-dir", str(state),
                      "--kernel-socket", sock, "--listen", "127.0.0.1:0"],
                     state / "logs" / "vfm-gatewayd.log").start()
    admin = Client(state / "vfmd.sock")
    try:
        wait_for(lambda: serving(admin, "vfm-modeld"), 600, "vfm-modeld", log=modeld.log)
        wait_for(lambda: (state / "gateway.addr").exists(), 60, "the gateway", log=gateway.log)
        key, _ = admin.token_create("toolsmith")
        with Client(state / "vfmd.sock", token=key) as tenant:
            tenant.spawn("agent", model="remote-smol")
            tenant.spawn("local-agent")
        base = (state / "gateway.addr").read_text().strip() + "/v1"
        yield openai.OpenAI(base_url=base, api_key=key, max_retries=0)
    finally:
        admin.close()
        for daemon in (gateway, modeld, kernel):
            daemon.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_a_forced_tool_call_comes_back_as_openai_tool_calls(tools_gw):
    reply = tools_gw.chat.completions.create(model="agent", messages=QUESTION, tools=WEATHER,
                                             tool_choice=FORCED, max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"].strip()
    assert reply.usage.completion_tokens > 0
    assert reply.model_extra["vfm"]["finish_reason"] == "tool-calls"


def test_a_streamed_tool_call_arrives_whole_before_the_finish(tools_gw):
    chunks = list(tools_gw.chat.completions.create(
        model="agent", messages=QUESTION, tools=WEATHER, tool_choice=FORCED, max_tokens=40,
        stream=True))
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or ())]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"].strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices
            and c.choices[0].finish_reason] == ["tool_calls"]


def test_the_tool_result_goes_back_to_the_model(tools_gw):
    first = tools_gw.chat.completions.create(model="agent", messages=QUESTION, tools=WEATHER,
                                             tool_choice=FORCED, max_tokens=40)
    call = first.choices[0].message.tool_calls[0]
    follow = tools_gw.chat.completions.create(model="agent", tools=WEATHER, max_tokens=24,
                                              tool_choice="none", messages=[
        *QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}])
    choice = follow.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content.strip()


def test_a_local_model_refuses_tools_with_a_clear_400(tools_gw):
    with pytest.raises(openai.BadRequestError) as err:
        tools_gw.chat.completions.create(model="local-agent", messages=QUESTION, tools=WEATHER,
                                         max_tokens=8)
    body = err.value.body
    assert body["param"] == "tools" and "takes no tools" in body["message"]
