"""The OpenAI-compatible backend against a real local server (`transformers serve`, same model)."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from libvfm.errors import InvalidArgument, PermissionDenied, Unavailable
from services.model.local import converted_dir
from vfmos_runtime.paths import cache_root
from services.model.openai_compat import OpenAIBackend
from services.model.registry import ModelEntry, ModelRegistry
from services.model.service import ModelService
from services.model.types import GenParams
from tests.conftest import free_port

ASK = [{"role": "user", "content": "Write a long, detailed story about a lighthouse."}]
KEY_ENV = "VFMOS_TEST_REMOTE_KEY"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for package in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(package, reason="transformers serve needs the test extra: "
                                            "pip install -e '.[test]'")
    cli = Path(sys.executable).with_name("transformers")
    model_dir = converted_dir(ModelRegistry.load().get(""), cache_root())
    if not (model_dir / "config.json").exists():
        pytest.skip(f"the converted model is not in {model_dir}; start vfm-modeld once")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning", str(model_dir)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not _healthy(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"transformers serve did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.25)
    yield {"base": base, "base_url": base + "/v1", "model": str(model_dir)}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def forward(handler: http.server.BaseHTTPRequestHandler, upstream: str, body: bytes,
            on_line=None) -> None:
    """POST `body` to `upstream` + the handler's path and stream the reply back line by line
    (an SSE stream goes through as it comes); `on_line(line)` sees each line."""
    request = urllib.request.Request(upstream + handler.path, data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as reply:
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.headers["Content-Type"])
        handler.end_headers()
        for line in reply:
            if on_line is not None:
                on_line(line)
            handler.wfile.write(line)
            handler.wfile.flush()


class _Gateway(http.server.BaseHTTPRequestHandler):
    """What stands in front of a hosted server: checks the bearer key and, like some
    servers, refuses fields it does not know; passes the stream through unchanged."""

    upstream = ""
    key = ""
    refuse: tuple[str, ...] = ()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._reply(401, {"error": {"message": "Incorrect API key provided"}})
        unknown = [name for name in self.refuse if name in json.loads(body)]
        if unknown:
            return self._reply(400, {"error": {"message": f"Unrecognized field: {unknown[0]}"}})
        forward(self, self.upstream, body)

    def _reply(self, code: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def gateway(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-right")
    handler = type("Gateway", (_Gateway,), {"upstream": server["base"], "key": "sk-right",
                                            "refuse": ("stream_options",)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _backend(server, base_url: str = "", **kw) -> OpenAIBackend:
    return OpenAIBackend(ModelEntry("remote", backend="openai",
                                    base_url=base_url or server["base_url"],
                                    remote_model=server["model"], **kw))


def _run(backend, max_new_tokens=8, **params):
    async def collect():
        return [p async for p in backend.generate(
            ASK, GenParams(max_new_tokens=max_new_tokens, **params))]
    return asyncio.run(collect())


def test_streams_pieces_then_a_final_one(server):
    pieces = _run(_backend(server), max_new_tokens=12)
    done = pieces[-1]
    assert len(pieces) >= 4 and "".join(p.text for p in pieces).strip()
    assert all(not p.done for p in pieces[:-1])
    assert done.done and done.finish_reason in ("stop", "length")
    assert 0 < done.completion_tokens <= 12 and done.prompt_tokens > 0
    # what the kernel charges (the sum over pieces) is what the server counted
    assert sum(p.tokens for p in pieces) == done.completion_tokens


def test_max_new_tokens_is_respected(server):
    pieces = _run(_backend(server), max_new_tokens=3)
    assert pieces[-1].completion_tokens == 3 and pieces[-1].finish_reason == "length"
    assert sum(p.tokens for p in pieces) == 3


def test_model_service_routes_a_registered_remote_model(server, tmp_path):
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [{
        "name": "remote-smol", "backend": "openai", "base_url": server["base_url"],
        "remote_model": server["model"], "cost_per_1k_tokens": 0.5}]}))
    service = ModelService(ModelRegistry.load(config), cache_root())

    async def collect():
        return [p async for p in service.generate("remote-smol", ASK, GenParams(max_new_tokens=5))]
    pieces = asyncio.run(collect())
    assert pieces[-1].done and pieces[-1].completion_tokens == 5
    assert "".join(p.text for p in pieces).strip()
    assert service.max_batch("remote-smol") >= 1
    assert not service.is_loaded("smollm2-135m")  # the local model was never touched


def test_a_server_that_is_down_is_unavailable():
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(ModelEntry("gone", backend="openai", base_url=base_url))
    with pytest.raises(Unavailable, match=f"model gone: cannot reach {base_url}: .*refused"):
        _run(backend)


def test_a_model_the_server_does_not_serve_is_a_clear_error(server):
    backend = _backend(server)
    backend.entry.remote_model = "no-such-model"
    with pytest.raises(InvalidArgument, match="answered 400: Server is pinned to .*no-such-model"):
        _run(backend)


def test_the_api_key_is_sent_and_a_wrong_one_is_refused_clearly(server, gateway, monkeypatch):
    backend = _backend(server, gateway, api_key_env=KEY_ENV)
    pieces = _run(backend, max_new_tokens=4)  # the gateway also refuses stream_options
    assert pieces[-1].completion_tokens == 4 and backend._refused == {"stream_options"}
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(PermissionDenied, match=f"answered 401: Incorrect API key.*\\${KEY_ENV}"):
        _run(backend)


def test_an_interrupted_answer_goes_on_and_refused_fields_are_left_out(server, caplog):
    caplog.set_level(logging.INFO, logger="vfm-modeld.openai")
    backend = _backend(server)
    first = _run(backend, max_new_tokens=6)
    prefix = "".join(p.text for p in first)
    rest = _run(backend, max_new_tokens=6, assistant_prefix=prefix)
    assert rest[-1].completion_tokens == 6 and "".join(p.text for p in rest).strip()
    # transformers serve refuses continue_final_message (422); it is sent only once
    assert "continue_final_message" in backend._refused
    assert "stream_options" not in backend._refused
    _run(backend, max_new_tokens=2, assistant_prefix=prefix)
    assert sum("refuses" in r.getMessage() for r in caplog.records) == 1


def test_closing_the_stream_early_ends_the_request(server):
    backend = _backend(server)

    async def first_two():
        stream = backend.generate(ASK, GenParams(max_new_tokens=200))
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return got
    assert len(asyncio.run(first_two())) == 2
    deadline = time.monotonic() + 5  # the reader hangs up instead of reading 200 tokens
    while any(t.name == "openai-remote" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reader thread still runs"
        time.sleep(0.05)
    assert _run(backend, max_new_tokens=3)[-1].completion_tokens == 3
