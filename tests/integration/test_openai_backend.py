"""The OpenAI-compatible backend against a real local server (`transformers serve`, same model)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from libvfm.errors import Unavailable, VfmError
from services.model.local import cache_root, converted_dir
from services.model.openai_compat import OpenAIBackend
from services.model.registry import ModelEntry, ModelRegistry
from services.model.service import ModelService
from services.model.types import GenParams

ASK = [{"role": "user", "content": "Name three colours."}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        pytest.skip("the transformers CLI is not installed")
    model_dir = converted_dir(ModelRegistry.load().get(""), cache_root())
    port = _port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 str(model_dir)], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not _healthy(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"transformers serve did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"base_url": base + "/v1", "model": str(model_dir)}
    proc.terminate()
    proc.wait(20)


def _backend(server, **kw) -> OpenAIBackend:
    return OpenAIBackend(ModelEntry("remote", backend="openai", base_url=server["base_url"],
                                    remote_model=server["model"], **kw))


def _run(backend, max_new_tokens=8):
    async def collect():
        return [p async for p in backend.generate(ASK, GenParams(max_new_tokens=max_new_tokens))]
    return asyncio.run(collect())


def test_streams_pieces_then_a_final_one(server):
    pieces = _run(_backend(server), max_new_tokens=12)
    text = "".join(p.text for p in pieces)
    done = pieces[-1]
    assert len(pieces) >= 4 and text.strip()
    assert done.done and done.finish_reason in ("stop", "length")
    assert 0 < done.completion_tokens <= 12


def test_max_new_tokens_is_respected(server):
    done = _run(_backend(server), max_new_tokens=3)[-1]
    assert done.completion_tokens <= 3 and done.finish_reason == "length"


def test_model_service_routes_a_registered_remote_model(server, tmp_path):
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [{
        "name": "remote-smol", "backend": "openai", "base_url": server["base_url"],
        "remote_model": server["model"], "cost_per_1k_tokens": 0.5}]}))
    service = ModelService(ModelRegistry.load(config), cache_root())

    async def collect():
        return [p async for p in service.generate("remote-smol", ASK, GenParams(max_new_tokens=5))]
    pieces = asyncio.run(collect())
    assert pieces[-1].done and "".join(p.text for p in pieces).strip()
    assert service.max_batch("remote-smol") >= 1


def test_a_server_that_is_down_is_unavailable():
    backend = OpenAIBackend(ModelEntry("gone", backend="openai",
                                       base_url=f"http://127.0.0.1:{_port()}/v1"))
    with pytest.raises(Unavailable, match="cannot reach"):
        _run(backend)


def test_a_bad_request_is_a_clear_error(server):
    backend = _backend(server)
    backend.entry.remote_model = "/no/such/model/dir"
    with pytest.raises(VfmError) as info:
        _run(backend)
    assert "answered" in info.value.message or "cannot reach" in info.value.message
