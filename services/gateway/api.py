"""The OpenAI wire shapes: requests parsed into plain structs, answers built as JSON objects.

Pure functions and dataclasses; no HTTP, no kernel calls. A bad field raises `BadRequest`
naming it, which the wire layer turns into OpenAI's 400 error object."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from vfmos_runtime.errors import InvalidArgument
from vfmos_runtime.protocol import MAX_EMBED_TEXTS, MAX_NEW_TOKENS

MAX_STOP = 4            # OpenAI's own limit on stop sequences
MAX_USER_CHARS = 256
# Finish reasons of an Ask, as OpenAI names them; the Ask's own name stays in `vfm`.
FINISH = {"stop": "stop", "length": "length", "quota": "length", "killed": "stop",
          "refused": "content_filter", "escalated": "content_filter",
          "tool-calls": "tool_calls"}
INSTRUCTION_ROLES = ("system", "developer")
TURN_ROLES = ("user", "assistant")


class BadRequest(InvalidArgument):
    """A request the gateway refuses with 400; `param` names the field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Sampling:
    """What every generating endpoint passes to the Ask."""

    max_new_tokens: int = 0     # 0 = the kernel's default (256)
    temperature: float = 0.0    # OpenAI's default is 1; a missing one means greedy here
    top_p: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class Turn:
    speaker: str   # "user" or "assistant"
    text: str


@dataclass
class Conversation:
    """Messages mapped onto a process: instructions for this call, the turns before the
    question (to be in memory), and the question."""

    instructions: str
    history: list[Turn]
    question: str


@dataclass
class ChatRequest:
    model: str
    conversation: Conversation
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    user: str = ""
    # With tools: the app's messages, tools and tool_choice for the model's server (JSON);
    # the call is then stateless (the app holds the transcript).
    tools_json: str = ""


@dataclass
class CompletionRequest:
    model: str
    prompt: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


@dataclass
class ResponsesRequest:
    model: str
    conversation: Conversation
    sampling: Sampling
    stream: bool = False


@dataclass
class EmbeddingRequest:
    model: str
    texts: list[str]
    base64: bool = False


# parsing
def _is(value: Any, kind: type | tuple) -> bool:
    """isinstance, except that true/false is not a number (JSON keeps them apart)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _require(body: dict, name: str, kind: type | tuple, what: str) -> Any:
    if body.get(name) is None:
        raise BadRequest(f"'{name}' is required", name)
    if not _is(body[name], kind):
        raise BadRequest(f"'{name}' must be {what}", name)
    return body[name]


def _optional(body: dict, name: str, kind: type | tuple, what: str, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not _is(value, kind):
        raise BadRequest(f"'{name}' must be {what}", name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float:
    value = _optional(body, name, (int, float), f"a number in {low:g}..{high:g}", 0.0)
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"'{name}' must be a number in {low:g}..{high:g}, got {value}", name)
    return float(value)


def _model(body: dict) -> str:
    model = _require(body, "model", str, "a string: the name of one of your FM processes")
    if not model.strip():
        raise BadRequest("'model' is empty: name one of your FM processes (GET /v1/models)",
                         "model")
    return model


def _refuse_unsupported(body: dict, names: tuple[str, ...], why: str) -> None:
    for name in names:
        value = body.get(name)
        if value not in (None, False, 0, 0.0, [], {}):
            raise BadRequest(f"'{name}' is not supported: {why}", name)


def _sampling(body: dict, length_names: tuple[str, ...]) -> Sampling:
    max_new = 0
    for name in length_names:
        value = _optional(body, name, int, f"an integer in 1..{MAX_NEW_TOKENS}", None)
        if value is not None:
            if not 1 <= value <= MAX_NEW_TOKENS:
                raise BadRequest(f"'{name}' must be 1..{MAX_NEW_TOKENS}, got {value}", name)
            max_new = value
    seed = _optional(body, "seed", int, "an integer", 0)
    if not -(1 << 63) <= seed < 1 << 63:
        raise BadRequest("'seed' must fit in 64 bits", "seed")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise BadRequest(f"'stop' takes 1..{MAX_STOP} non-empty strings", "stop")
    return Sampling(max_new_tokens=max_new, temperature=_number(body, "temperature", 0, 2),
                    top_p=_number(body, "top_p", 0, 1), seed=seed, stop=stops)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _optional(body, "stream", bool, "true or false", False)
    options = _optional(body, "stream_options", dict, "an object", {})
    if options and not stream:
        raise BadRequest("'stream_options' is only allowed with 'stream': true",
                         "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise BadRequest("'stream_options.include_usage' must be true or false",
                         "stream_options")
    return stream, usage


def text_of(content: Any, where: str, part_types: tuple[str, ...] = ("text",)) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in part_types \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"{where}.content[{i}] is a {kind!r} part; only text parts "
                                 f"({', '.join(part_types)}) are supported", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise BadRequest(f"{where}.content must be a string or a list of text parts", "messages")


def conversation(messages: Any, param: str = "messages",
                 part_types: tuple[str, ...] = ("text",), instructions: str = "") -> Conversation:
    """Map OpenAI messages onto a process: system and developer messages become this call's
    instructions, the last message (a user's) is the question, the user and assistant
    messages before it are the history the process's memory should hold."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"'{param}' must be a non-empty list of messages", param)
    rules, turns = [instructions] if instructions else [], []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with 'role' and 'content'", param)
        if message.get("type", "message") != "message":
            raise BadRequest(f"{where} is a {message.get('type')!r} item; only messages are "
                             "supported", param)
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") \
                or message.get("function_call"):
            raise BadRequest(f"{where}: tool calls and tool results are not supported by "
                             "this gateway's models", param)
        if role in INSTRUCTION_ROLES:
            rules.append(text_of(message.get("content"), where, part_types))
        elif role in TURN_ROLES:
            turns.append(Turn(role, text_of(message.get("content"), where, part_types)))
        else:
            raise BadRequest(f"{where}.role must be system, developer, user or assistant, "
                             f"got {role!r}", param)
    if not turns or turns[-1].speaker != "user":
        raise BadRequest(f"the last of '{param}' must be a user message: it is the question",
                         param)
    if not turns[-1].text.strip():
        raise BadRequest("the last user message is empty", param)
    history = [t for t in turns[:-1] if t.text.strip()]
    return Conversation("\n\n".join(r for r in rules if r.strip()), history, turns[-1].text)


_NO_TOOLS = "tools need a model behind an OpenAI-compatible backend that supports them"


def tool_call(body: dict, messages: Any) -> tuple[Conversation, str] | None:
    """A chat request with tools: (its conversation, the JSON the model's server gets), or
    None without. System and developer messages are the Ask's instructions; every other
    message goes to the server as the app wrote it (tool calls and results included); the
    last user message is the question the trust agent screens."""
    tools = body.get("tools")
    used = isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
        for m in messages)
    if tools in (None, []) and not used:
        return None
    if not isinstance(tools, list) or not tools or not all(
            isinstance(t, dict) and t.get("type") == "function"
            and isinstance(t.get("function"), dict) and t["function"].get("name")
            for t in tools):
        raise BadRequest("'tools' must be a non-empty list of {'type': 'function', "
                         "'function': {'name': ...}}", "tools")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") \
            and not (isinstance(choice, dict) and choice.get("type") == "function"):
        raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or a function",
                         "tool_choice")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages")
    rules, turns, question = [], [], ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
                *INSTRUCTION_ROLES, *TURN_ROLES, "tool"):
            raise BadRequest(f"messages[{i}] needs a role: system, developer, user, "
                             "assistant or tool", "messages")
        if message["role"] in INSTRUCTION_ROLES:
            rules.append(text_of(message.get("content"), f"messages[{i}]"))
            continue
        if message["role"] == "user":
            question = text_of(message.get("content"), f"messages[{i}]")
        if message["role"] == "assistant" and message.get("content") is None:
            # OpenAI allows a tool call's content to be null; some servers (llama.cpp's)
            # refuse null, and none refuses ""
            message = {**message, "content": ""}
        turns.append(message)
    if not question.strip():
        raise BadRequest("a tool call needs a user message with text", "messages")
    wire = {"messages": turns, "tools": tools}
    if choice is not None:
        wire["tool_choice"] = choice
    return (Conversation("\n\n".join(r for r in rules if r.strip()), [], question),
            json.dumps(wire))


def parse_chat(body: Any) -> ChatRequest:
    body = _object(body)
    model = _model(body)
    n = _optional(body, "n", int, "an integer", 1)
    if n != 1:
        raise BadRequest("'n' must be 1: one FM process answers once per call", "n")
    _refuse_unsupported(body, ("functions", "function_call"),
                        "the legacy function calling is gone; use 'tools'")
    _refuse_unsupported(body, ("logprobs", "top_logprobs", "frequency_penalty",
                               "presence_penalty", "logit_bias", "audio", "prediction"),
                        "this gateway does not offer it")
    _response_format(body)
    stream, usage = _stream(body)
    user = _optional(body, "user", str, "a string", "")
    if len(user) > MAX_USER_CHARS:
        raise BadRequest(f"'user' is longer than {MAX_USER_CHARS} characters", "user")
    sampling = _sampling(body, ("max_tokens", "max_completion_tokens"))
    tools = tool_call(body, body.get("messages"))
    if tools is not None:
        return ChatRequest(model, tools[0], sampling, stream, usage, user, tools[1])
    return ChatRequest(model, conversation(body.get("messages")), sampling, stream, usage,
                       user)


def parse_completion(body: Any) -> CompletionRequest:
    body = _object(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (or a list of one string)", "prompt")
    if not prompt.strip():
        raise BadRequest("'prompt' is empty", "prompt")
    n = _optional(body, "n", int, "an integer", 1)
    if n != 1 or _optional(body, "best_of", int, "an integer", 1) != 1:
        raise BadRequest("'n' and 'best_of' must be 1", "n")
    _refuse_unsupported(body, ("suffix", "echo", "logprobs", "frequency_penalty",
                               "presence_penalty", "logit_bias"),
                        "this gateway does not offer it")
    stream, usage = _stream(body)
    return CompletionRequest(model, prompt, _sampling(body, ("max_tokens",)), stream, usage)


def parse_responses(body: Any) -> ResponsesRequest:
    body = _object(body)
    model = _model(body)
    instructions = _optional(body, "instructions", str, "a string", "")
    given = body.get("input")
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    _refuse_unsupported(body, ("tools", "tool_choice"), _NO_TOOLS)
    _refuse_unsupported(body, ("previous_response_id", "conversation", "reasoning",
                               "background", "prompt"),
                        "this gateway keeps a conversation in the FM process's memory; "
                        "send the turns in 'input'")
    text = _optional(body, "text", dict, "an object", {})
    fmt = text.get("format") or {}
    if fmt and fmt.get("type") != "text":
        raise BadRequest("only text output is supported ('text.format.type': 'text')", "text")
    stream = _optional(body, "stream", bool, "true or false", False)
    return ResponsesRequest(model, conversation(given, "input", ("input_text", "output_text",
                                                                 "text"), instructions),
                            _sampling(body, ("max_output_tokens",)), stream)


def parse_embeddings(body: Any, dimensions: int) -> EmbeddingRequest:
    body = _object(body)
    model = _model(body)
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("'input' must be a string or a non-empty list of strings (token "
                         "arrays are not supported)", "input")
    if len(texts) > MAX_EMBED_TEXTS:
        raise BadRequest(f"'input' holds {len(texts)} texts; at most {MAX_EMBED_TEXTS}", "input")
    fmt = _optional(body, "encoding_format", str, "'float' or 'base64'", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    wanted = _optional(body, "dimensions", int, "an integer", dimensions)
    if wanted != dimensions:
        raise BadRequest(f"'dimensions' must be {dimensions}: the embedder's size", "dimensions")
    return EmbeddingRequest(model, texts, fmt == "base64")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _response_format(body: dict) -> None:
    fmt = _optional(body, "response_format", dict, "an object", {})
    if fmt and fmt.get("type") != "text":
        raise BadRequest("only 'response_format': {'type': 'text'} is supported",
                         "response_format")


# answers
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_of(result) -> dict:
    u = result.usage
    return {"prompt_tokens": u.tokens_in, "completion_tokens": u.tokens_out,
            "total_tokens": u.tokens_in + u.tokens_out}


def extras(result, pid: int) -> dict:
    """What VFMOS adds to an answer (OpenAI clients ignore it): the Ask's own finish reason,
    its cost and model, and the trust agent's verdict."""
    u = result.usage
    out = {"pid": pid, "ask_id": u.ask_id, "finish_reason": result.finish_reason,
           "model": u.model, "cost": u.cost, "ttft_ms": round(u.ttft_ms, 2)}
    if result.verdict is not None:
        out["verdict"] = dataclasses.asdict(result.verdict)
    if result.degraded:
        out["degraded"] = [dataclasses.asdict(d) for d in result.degraded]
    return out


def chat_completion(cid: str, model: str, result, pid: int) -> dict:
    message = {"role": "assistant", "content": result.text, "refusal": None}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
        message["content"] = result.text or None
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None, "finish_reason": FINISH[result.finish_reason]}],
            "usage": usage_of(result), "vfm": extras(result, pid)}


def chat_chunk(cid: str, model: str, created: int, delta: dict,
               finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}


def completion(cid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def response_object(rid: str, model: str, created: int, status: str, text: str | None,
                    result=None, pid: int = 0, message_id: str = "") -> dict:
    """A Responses API `response`; `text` None: no output yet (the `created` event)."""
    output = [] if text is None else [{
        "type": "message", "id": message_id, "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    out = {"id": rid, "object": "response", "created_at": created, "status": status,
           "model": model, "output": output, "error": None, "incomplete_details": None,
           "instructions": None, "metadata": {}, "parallel_tool_calls": False,
           "temperature": None, "top_p": None, "tool_choice": "none", "tools": [],
           "usage": None}
    if result is not None:
        u = result.usage
        out["usage"] = {"input_tokens": u.tokens_in, "output_tokens": u.tokens_out,
                        "total_tokens": u.tokens_in + u.tokens_out,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0}}
        out["vfm"] = extras(result, pid)
        if result.finish_reason in ("length", "quota"):
            out["status"] = "incomplete"
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        elif FINISH[result.finish_reason] == "content_filter":
            out["status"] = "incomplete"
            out["incomplete_details"] = {"reason": "content_filter"}
    return out


def embeddings(vectors: list[list[float]], model: str, tokens: int, as_base64: bool) -> dict:
    def encoded(vector: list[float]):
        if not as_base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_object(process) -> dict:
    """One FM process as an OpenAI model; `vfm` says what it is."""
    return {"id": process.name, "object": "model", "created": int(process.created_at),
            "owned_by": process.tenant,
            "vfm": {"pid": process.pid, "state": process.state,
                    "model": process.spec.model or "default"}}
