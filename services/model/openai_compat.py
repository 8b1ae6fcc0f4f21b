"""OpenAI-compatible HTTP backend (vLLM, llama.cpp server, Ollama, `transformers serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from typing import AsyncIterator

from vfmos_runtime.errors import (InvalidArgument, NotFound, PermissionDenied, QuotaExceeded,
                           Unavailable, VfmError)
from services.model.registry import ModelEntry
from services.model.types import GenParams, Piece

log = logging.getLogger("vfm-modeld.openai")

# Request fields beyond the core OpenAI schema. Servers differ: `transformers serve` refuses
# continue_final_message with 422, some servers refuse stream_options with 400. A refused
# request is sent again without them, and the backend remembers which ones to leave out.
EXTENSIONS = ("stream_options", "continue_final_message", "add_generation_prompt", "logprobs")


class OpenAIBackend:
    """Streams /v1/chat/completions; the blocking HTTP read runs in a thread per request."""

    def __init__(self, entry: ModelEntry, timeout_s: float = 300.0):
        self.entry = entry
        self._timeout = timeout_s
        self._refused: set[str] = set()  # extensions this server does not accept
        self.loaded = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def wait_loaded(self) -> None:
        return None

    def _body(self, messages: list[dict], params: GenParams) -> dict:
        if params.tools_json:  # the app's own turns and tools, after our system message
            app = json.loads(params.tools_json)
            messages = [m for m in messages if m["role"] == "system"] + list(app["messages"])
        body = {"model": self.entry.remote_model or self.entry.name, "messages": list(messages),
                "stream": True, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "stream_options": {"include_usage": True},
                "logprobs": True}  # the answer's confidence, for a cascade
        if params.assistant_prefix:
            # A preempted answer goes on where it stopped (vLLM and SGLang honour these two
            # fields; other servers answer in a new turn that sees the partial answer).
            body["messages"].append({"role": "assistant", "content": params.assistant_prefix})
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if 0 < params.top_p < 1:
            body["top_p"] = params.top_p
        if params.seed:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.tools_json:
            body["tools"] = app["tools"]
            if app.get("tool_choice") is not None:
                body["tool_choice"] = app["tool_choice"]
        for name in self._refused:
            body.pop(name, None)
        return body

    def _request(self, body: dict) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = os.environ.get(self.entry.api_key_env, "") if self.entry.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.entry.base_url.rstrip("/") + "/chat/completions"
        return urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)

    async def generate(self, messages: list[dict], params: GenParams) -> AsyncIterator[Piece]:
        """One piece per streamed event, then a piece that squares the token count with the
        server's usage (a server may put several tokens in one event), then the done piece."""
        counted, prompt_tokens, completion_tokens, finish = 0, 0, 0, "stop"
        calls: dict[int, dict] = {}
        async with contextlib.aclosing(self._events(self._body(messages, params))) as events:
            async for event in events:
                choice = (event.get("choices") or [{}])[0]
                usage = event.get("usage") or {}
                prompt_tokens = usage.get("prompt_tokens") or prompt_tokens
                completion_tokens = usage.get("completion_tokens") or completion_tokens
                if choice.get("finish_reason"):
                    finish = {"length": "length", "tool_calls": "tool-calls"}.get(
                        choice["finish_reason"], "stop")
                if _add_tool_calls(calls, (choice.get("delta") or {}).get("tool_calls")):
                    # a call streams as text does, an event a token: it is charged as it
                    # comes even from a server that reports no usage
                    counted += 1
                    yield Piece(text="", tokens=1, prompt_tokens=prompt_tokens)
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    counted += 1
                    yield Piece(text=text, tokens=1, prompt_tokens=prompt_tokens,
                                logprob=_logprob(choice))
        if completion_tokens > counted:
            yield Piece(text="", tokens=completion_tokens - counted, prompt_tokens=prompt_tokens)
        if calls:
            finish = "tool-calls"
        yield Piece(text="", tokens=0, prompt_tokens=prompt_tokens, done=True,
                    finish_reason=finish, completion_tokens=completion_tokens or counted,
                    tool_calls_json=json.dumps([calls[i] for i in sorted(calls)])
                    if calls else "")

    async def _events(self, body: dict) -> AsyncIterator[dict]:
        """The server's JSON events, read in a thread; closing this generator ends the read."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        thread = threading.Thread(target=self._stream, args=(body, put, cancel), daemon=True,
                                  name=f"openai-{self.entry.name}")
        thread.start()
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()

    def _stream(self, body: dict, put, cancel: threading.Event) -> None:
        try:
            response = self._open(body)
            with response:
                for raw in response:
                    if cancel.is_set():
                        return
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    put(self._event(data))
            put(None)
        except VfmError as err:
            put(err)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            put(Unavailable(f"model {self.entry.name}: cannot reach {self.entry.base_url}: "
                            f"{getattr(exc, 'reason', exc)}"))
        except Exception as exc:  # the reader must always answer, or generate() waits forever
            log.exception("reading %s failed", self.entry.base_url)
            put(Unavailable(f"model {self.entry.name}: reading {self.entry.base_url} failed: "
                            f"{exc!r}"))

    def _open(self, body: dict):
        """POST the request; once more without the extensions if the server refuses it."""
        try:
            return urllib.request.urlopen(self._request(body), timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            detail = _detail(exc)
            sent = [name for name in EXTENSIONS if name in body]
            if exc.code not in (400, 422) or not sent:
                raise self._http_error(exc.code, detail) from None
        try:
            response = urllib.request.urlopen(
                self._request({k: v for k, v in body.items() if k not in sent}),
                timeout=self._timeout)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc.code, _detail(exc)) from None
        refused = {name for name in sent if name in detail} or set(sent)
        log.info("%s refuses %s; leaving them out from now on", self.entry.base_url,
                 ", ".join(sorted(refused)))
        self._refused = self._refused | refused  # a new set: _body() may be reading the old
        return response

    def _event(self, data: str) -> dict:
        try:
            event = json.loads(data)
        except ValueError:
            raise Unavailable(f"model {self.entry.name}: {self.entry.base_url} sent a malformed "
                              f"event: {data[:200]!r}") from None
        if not isinstance(event, dict):
            raise Unavailable(f"model {self.entry.name}: {self.entry.base_url} sent a malformed "
                              f"event: {data[:200]!r}")
        if event.get("error"):  # vLLM and others report a failure inside the stream
            raise Unavailable(f"model {self.entry.name}: {self.entry.base_url} failed while "
                              f"answering: {_message(event)}")
        return event

    def _http_error(self, code: int, detail: str) -> VfmError:
        what = f"model {self.entry.name}: {self.entry.base_url} answered {code}: {detail}"
        if code in (401, 403):
            hint = (f" (the key comes from ${self.entry.api_key_env})" if self.entry.api_key_env
                    else " (set api_key_env in the model's entry)")
            return PermissionDenied(what + hint)
        if code == 404:
            return NotFound(what)
        if code == 429:
            return QuotaExceeded(what, quota="remote_rate_limit", subject=self.entry.name)
        if 400 <= code < 500:
            return InvalidArgument(what)
        return Unavailable(what)


def _detail(exc: urllib.error.HTTPError) -> str:
    """The server's own words for an HTTP error, from the usual JSON shapes."""
    raw = exc.read()[:2000].decode("utf-8", "replace")
    try:
        return _message(json.loads(raw))[:300]
    except ValueError:
        return raw.strip()[:300] or exc.reason


def _message(data) -> str:
    if isinstance(data, dict):
        for key in ("detail", "error", "message"):
            if data.get(key):
                return _message(data[key])
        return json.dumps(data)
    if isinstance(data, list):  # FastAPI validation errors: [{"loc": ..., "msg": ...}]
        return "; ".join(_message(d) if not isinstance(d, dict) or "msg" not in d
                         else f"{'.'.join(map(str, d.get('loc', ())))}: {d['msg']}" for d in data)
    return str(data)


def _add_tool_calls(calls: dict[int, dict], deltas) -> bool:
    """Merge one event's tool-call deltas (OpenAI streams each call in pieces by `index`:
    its id and name once, its arguments a few characters at a time) into `calls`; True
    when there were any."""
    for delta in deltas or ():
        if not isinstance(delta, dict):
            continue
        call = calls.setdefault(int(delta.get("index") or 0), {
            "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] = function.get("name") or call["function"]["name"]
        call["function"]["arguments"] += function.get("arguments") or ""
    return bool(deltas)


def _logprob(choice: dict) -> float | None:
    """The event's token log-probabilities summed (OpenAI's `logprobs.content`), if sent."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    try:
        return float(sum(t["logprob"] for t in content))
    except (KeyError, TypeError, ValueError):
        return None
