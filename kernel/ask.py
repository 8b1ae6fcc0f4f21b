"""The Ask path: admit a question, queue it for a model slot, stream it, survive preemption, account."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc

from kernel.context import ContextManager
from kernel.dispatch import Dispatcher, Lease
from kernel.memory import render
from kernel.identity import Caller
from kernel.process import ProcRecord, ProcState
from kernel.quota import new_token_cap, remaining_tokens
from kernel.registry import ServiceRegistry
from kernel.table import ProcessTable
from vfmos_runtime.errors import InvalidArgument, QuotaExceeded, Unavailable, from_rpc_error
from vfmos_runtime.protocol import MAX_NEW_TOKENS, MODEL_SERVICE
from vfmos_runtime.types import Usage
from vfmos.model.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("vfmd.ask")

MAX_PROMPT_CHARS = 256 * 1024
DEFAULT_NEW_TOKENS = 256


@dataclass
class AskQuery:
    pid: int
    prompt: str
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ttft_slo_ms: float = 0.0
    stateless: bool = False  # no working set, and the exchange is not remembered
    context: str = ""  # the working set, rendered (set by the kernel, not the caller)

    def validate(self) -> None:
        if not self.prompt.strip():
            raise InvalidArgument("the question is empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"the question is longer than {MAX_PROMPT_CHARS} characters")
        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument(f"max_new_tokens must be 0..{MAX_NEW_TOKENS}, "
                                  f"got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise InvalidArgument(f"temperature must be 0..5, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be 0..1, got {self.top_p}")
        if not 0.0 <= self.ttft_slo_ms <= 3_600_000:
            raise InvalidArgument(f"ttft_slo_ms must be 0..3600000, got {self.ttft_slo_ms}")


@dataclass
class AskDone:
    finish_reason: str
    usage: Usage


class Interrupt:
    """What stops an ask's current segment: a kill, a suspend, the planner's preemption."""

    def __init__(self):
        self.reason = ""
        self.changed = asyncio.Event()
        self.call: grpc.aio.UnaryStreamCall | None = None

    def fire(self, reason: str) -> None:
        if self.reason == "killed":
            return  # final
        self.reason = reason
        self.changed.set()
        if reason != "resumed" and self.call is not None:
            self.call.cancel()  # the model service frees the slot within one decode step


@dataclass
class _Answer:
    """The answer so far: its text, and its token ids when the model service reports them
    (they let a continuation resume exactly where the model stopped)."""

    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


@dataclass
class _Segment:
    """Outcome of one stretch of generation between two interruptions."""

    finish: str = ""        # set when the answer is over ("stop", "length", "quota")
    interrupted: str = ""   # set when it must continue later ("preempted", "suspended")


class AskRunner:
    def __init__(self, table: ProcessTable, registry: ServiceRegistry, dispatcher: Dispatcher,
                 context: ContextManager):
        self._context = context
        self._table = table
        self._registry = registry
        self._dispatcher = dispatcher
        self._models: dict[str, model_pb2.ModelInfo] = {}
        self._default_model = ""
        self._models_at = -1e9

    async def ask(self, caller: Caller, query: AskQuery) -> AsyncIterator[str | AskDone]:
        """Yield the answer's text pieces, then one AskDone."""
        query.validate()
        started = time.perf_counter()
        interrupt = Interrupt()
        record = self._table.begin_ask(caller, query.pid, interrupt.fire)
        usage, answer, finish = Usage(), _Answer(), ""
        try:
            await self._refresh_models()
            if not query.stateless:
                query.context = render(await self._context.for_ask(record, query.prompt))
            model = record.spec.model or self._default_model
            usage.model = model
            deadline = time.monotonic() + query.ttft_slo_ms / 1000 if query.ttft_slo_ms else None
            request = self._dispatcher.request(query.pid, record.tenant, record.spec.priority,
                                               deadline)
            while not finish:
                if interrupt.reason == "killed":
                    finish = "killed"
                    break
                if self._table.state(query.pid) == ProcState.SUSPENDED:
                    await self._wait_resumed(interrupt)
                    continue
                lease = Lease(request, lambda: interrupt.fire("preempted"))
                if not await self._acquire(model, lease, interrupt):
                    continue  # killed or suspended while queued
                usage.queue_ms += lease.waited_ms
                segment = _Segment()
                self._table.segment_started(query.pid)
                try:
                    async for piece in self._generate(record, query, model, answer, usage,
                                                      interrupt, segment, started):
                        yield piece
                finally:
                    self._dispatcher.release(model, lease)
                    self._table.segment_ended(query.pid)
                if segment.interrupted == "preempted":
                    usage.preemptions += 1
                finish = segment.finish
        finally:
            usage.total_ms = (time.perf_counter() - started) * 1000
            usage.cost = (usage.tokens_in + usage.tokens_out) / 1000 * self._price(usage.model)
            self._table.end_ask(query.pid, interrupt.fire, usage)
            if finish and finish != "killed" and not query.stateless:
                self._context.remember_exchange(record, query.prompt, "".join(answer.text))
        yield AskDone(finish, usage)

    async def _acquire(self, model: str, lease: Lease, interrupt: Interrupt) -> bool:
        """Wait for a slot; give up (and leave the queue) on kill or suspend."""
        acquire = asyncio.ensure_future(self._dispatcher.acquire(model, lease))
        while not acquire.done():
            interrupt.changed.clear()
            if interrupt.reason in ("killed", "suspended"):
                break
            changed = asyncio.ensure_future(interrupt.changed.wait())
            await asyncio.wait({acquire, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        if acquire.done() and interrupt.reason not in ("killed", "suspended"):
            return True
        acquire.cancel()
        await asyncio.gather(acquire, return_exceptions=True)
        self._dispatcher.release(model, lease)
        return False

    async def _wait_resumed(self, interrupt: Interrupt) -> None:
        """A suspended process keeps its asks open; they go on after resume (or end on kill)."""
        while interrupt.reason not in ("resumed", "killed"):
            interrupt.changed.clear()
            await interrupt.changed.wait()
        if interrupt.reason == "resumed":
            interrupt.reason = ""

    async def _generate(self, record: ProcRecord, query: AskQuery, model: str, answer: "_Answer",
                        usage: Usage, interrupt: Interrupt, segment: _Segment, started: float):
        """Stream one segment; the answer so far goes back in as the assistant's prefix."""
        quota, counters = record.spec.quota, record.counters
        asked = query.max_new_tokens or DEFAULT_NEW_TOKENS
        left = remaining_tokens(quota, counters)
        room = asked - usage.tokens_out
        request = self._request(record.spec, query, model, answer,
                                room if left is None else max(1, min(room, left)))
        segment_start = time.perf_counter()
        prompt_seen = False
        try:
            call = model_pb2_grpc.ModelStub(self._registry.channel(MODEL_SERVICE)).Generate(request)
            interrupt.call = call
            async for chunk in call:
                if not prompt_seen and chunk.prompt_tokens:
                    prompt_seen = True
                    if not usage.tokens_in:  # the first segment's prompt is the question's size
                        self._check_prompt_fits(record, chunk.prompt_tokens, call)
                        usage.tokens_in = chunk.prompt_tokens
                if chunk.done:
                    segment.finish = chunk.finish_reason or "stop"
                    break
                cap = new_token_cap(quota, counters, usage.tokens_in, asked)
                if usage.tokens_out + chunk.tokens > cap:
                    segment.finish = "quota" if cap < asked else "length"
                    call.cancel()
                    break
                usage.tokens_out += chunk.tokens
                self._dispatcher.charge(record.tenant, chunk.tokens)
                if not usage.ttft_ms and chunk.tokens:
                    usage.ttft_ms = (time.perf_counter() - started) * 1000
                answer.ids.extend(chunk.token_ids)
                if chunk.text:
                    answer.text.append(chunk.text)
                    yield chunk.text
        except asyncio.CancelledError:
            if not interrupt.reason or interrupt.reason == "resumed":
                raise  # the caller went away
            if interrupt.reason == "killed":
                segment.finish = "killed"
            else:
                segment.interrupted = interrupt.reason
                interrupt.reason = "" if interrupt.reason == "preempted" else interrupt.reason
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if err.code == grpc.StatusCode.UNAVAILABLE:
                self._registry.suspect(MODEL_SERVICE)
                raise Unavailable(f"service {MODEL_SERVICE} is unavailable: {err.message}") from None
            raise err from None
        finally:
            interrupt.call = None
            usage.decode_ms += (time.perf_counter() - segment_start) * 1000

    async def _refresh_models(self) -> None:
        """Model prices and batch sizes from the model service (refreshed each minute)."""
        if time.monotonic() - self._models_at < 60.0:
            return
        stub = model_pb2_grpc.ModelStub(self._registry.channel(MODEL_SERVICE))
        try:
            reply = await stub.ListModels(model_pb2.ListModelsRequest(), timeout=5.0)
        except grpc.RpcError as exc:
            self._registry.suspect(MODEL_SERVICE)
            raise Unavailable(f"service {MODEL_SERVICE} is unavailable: "
                              f"{from_rpc_error(exc).message}") from None
        self._models = {m.name: m for m in reply.models}
        self._default_model = next((m.name for m in reply.models if m.is_default), "")
        self._dispatcher.set_default_model(self._default_model)
        for m in reply.models:
            self._dispatcher.set_capacity(m.name, m.max_batch)
        self._models_at = time.monotonic()

    def _price(self, model: str) -> float:
        info = self._models.get(model)
        return info.cost_per_1k_tokens if info else 0.0

    @staticmethod
    def _check_prompt_fits(record: ProcRecord, prompt_tokens: int, call) -> None:
        left = remaining_tokens(record.spec.quota, record.counters)
        if left is not None and prompt_tokens >= left:
            call.cancel()
            raise QuotaExceeded(
                f"the question is {prompt_tokens} tokens but process {record.pid} has only "
                f"{left} left of its {record.spec.quota.max_tokens}-token budget",
                "max_tokens", f"pid {record.pid}")

    @staticmethod
    def _request(spec, query: AskQuery, model: str, answer: "_Answer",
                 max_new: int) -> model_pb2.GenerateRequest:
        messages = []
        system = "\n\n".join(part for part in (spec.system_prompt, query.context) if part)
        if system:
            messages.append(model_pb2.ChatMessage(role="system", content=system))
        messages.append(model_pb2.ChatMessage(role="user", content=query.prompt))
        return model_pb2.GenerateRequest(
            model=model, messages=messages, max_new_tokens=max_new,
            assistant_prefix="".join(answer.text), assistant_prefix_ids=answer.ids,
            temperature=query.temperature, top_p=query.top_p, seed=query.seed,
            stop=list(query.stop), priority=spec.priority)
