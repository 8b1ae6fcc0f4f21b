"""OpenAI-compatible HTTP backend (vLLM, llama.cpp server, Ollama, `transformers serve`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from typing import AsyncIterator

from libvfm.errors import InvalidArgument, Unavailable
from services.model.registry import ModelEntry
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld.openai")


class OpenAIBackend:
    """Streams /v1/chat/completions; the blocking HTTP read runs in a thread per request."""

    def __init__(self, entry: ModelEntry, timeout_s: float = 300.0):
        self.entry = entry
        self._timeout = timeout_s
        self.loaded = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def wait_loaded(self) -> None:
        return None

    def _request(self, messages: list[dict], params: GenParams) -> urllib.request.Request:
        body = {"model": self.entry.remote_model or self.entry.name, "messages": messages,
                "stream": True, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "stream_options": {"include_usage": True}}
        if 0 < params.top_p < 1:
            body["top_p"] = params.top_p
        if params.seed:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = os.environ.get(self.entry.api_key_env, "") if self.entry.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.entry.base_url.rstrip("/") + "/chat/completions"
        return urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)

    async def generate(self, messages: list[dict], params: GenParams) -> AsyncIterator[Piece]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        request = self._request(messages, params)
        thread = threading.Thread(target=self._stream, args=(request, loop, out, cancel),
                                  daemon=True)
        thread.start()
        produced, prompt_tokens, finish = 0, 0, "stop"
        try:
            while True:
                item = await out.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    break
                choice = (item.get("choices") or [{}])[0]
                usage = item.get("usage") or {}
                prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                text = (choice.get("delta") or {}).get("content") or ""
                if choice.get("finish_reason"):
                    finish = "length" if choice["finish_reason"] == "length" else "stop"
                if text:
                    produced += 1  # servers stream about one token per event
                    yield Piece(text=text, tokens=1, prompt_tokens=prompt_tokens)
                if usage.get("completion_tokens"):
                    produced = usage["completion_tokens"]
        finally:
            cancel.set()
        yield Piece(text="", tokens=0, prompt_tokens=prompt_tokens, done=True,
                    finish_reason=finish, completion_tokens=produced)

    def _stream(self, request, loop, out: asyncio.Queue, cancel: threading.Event) -> None:
        def put(item) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                for raw in response:
                    if cancel.is_set():
                        return
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    put(json.loads(data))
            put(None)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            error = InvalidArgument if 400 <= exc.code < 500 else Unavailable
            put(error(f"{self.entry.base_url} answered {exc.code}: {detail}"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            put(Unavailable(f"cannot reach {self.entry.base_url}: {exc}"))
