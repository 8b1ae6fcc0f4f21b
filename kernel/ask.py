"""The Ask path: admit a question, queue it for a model slot, stream it, survive preemption, account."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from kernel.context import ContextManager
from kernel.dispatch import Dispatcher, Lease
from kernel.identity import Caller
from kernel.interrupt import Interrupt, Interruption
from kernel.memory import render
from kernel.ports import ChatMessage, GenerateCall, ModelClient, ModelInfo
from kernel.process import ProcRecord
from kernel.quota import new_token_cap, remaining_tokens
from kernel.table import ProcessTable
from vfmos_runtime.errors import InvalidArgument, QuotaExceeded
from vfmos_runtime.protocol import MAX_NEW_TOKENS
from vfmos_runtime.types import Usage

log = logging.getLogger("vfmd.ask")

MAX_PROMPT_CHARS = 256 * 1024
DEFAULT_NEW_TOKENS = 256
MODELS_TTL_S = 60.0


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


@dataclass(frozen=True)
class Degradation:
    """Something an Ask went without; it still answered. `kind` is the wire enum's name:
    "memory-unavailable" (no working set) or "not-remembered" (the exchange is lost)."""

    kind: str
    reason: str


@dataclass
class AskDone:
    finish_reason: str
    usage: Usage
    degraded: list[Degradation] = field(default_factory=list)


@dataclass
class _Answer:
    """The answer so far: its text, and its token ids when the model service reports them
    (they let a continuation resume exactly where the model stopped). `grown` is set each
    time text is added, for the reader that relays it."""

    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    grown: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Segment:
    """Outcome of one stretch of generation between two interruptions."""

    finish: str = ""  # set when the answer is over ("stop", "length", "quota", "killed")
    interrupted: Interruption = Interruption.NONE  # set when it must continue later


class AskRunner:
    def __init__(self, table: ProcessTable, models: ModelClient, dispatcher: Dispatcher,
                 context: ContextManager):
        self._context = context
        self._table = table
        self._model = models
        self._dispatcher = dispatcher
        self._models: dict[str, ModelInfo] = {}
        self._models_at = -1e9

    async def ask(self, caller: Caller, query: AskQuery) -> AsyncIterator[str | AskDone]:
        """Yield the answer's text pieces, then one AskDone.

        The answer is produced by its own task and relayed from `_Answer.text` as it grows:
        the first piece goes out at once, and when the reader is slower than the model the
        pieces that accumulated meanwhile go out joined, in one message (far fewer writes
        for the same text). The AskDone stays last."""
        query.validate()
        answer = _Answer()
        texts, grown = answer.text, answer.grown
        run = asyncio.ensure_future(self._run(caller, query, answer))
        run.add_done_callback(lambda _: grown.set())  # the answer is over: wake the relay
        sent = 0
        try:
            while True:
                n = len(texts)
                if n > sent:
                    piece = texts[sent] if n == sent + 1 else "".join(texts[sent:n])
                    sent = n
                    yield piece
                elif run.done():
                    break
                else:
                    grown.clear()
                    await grown.wait()
            done = run.result()  # the answer's error, if it failed
        finally:
            if not run.done():  # the caller went away: stop the answer and account for it
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        yield done

    async def _run(self, caller: Caller, query: AskQuery, answer: _Answer) -> AskDone:
        started = time.perf_counter()
        interrupt = Interrupt()
        record = self._table.begin_ask(caller, query.pid, interrupt.fire)
        usage, finish, degraded = Usage(), "", []
        try:
            await self._refresh_models()
            if not query.stateless:
                items, missing = await self._context.for_ask(record, query.prompt)
                query.context = render(items)
                if missing:
                    degraded.append(Degradation("memory-unavailable", missing))
            model = record.spec.model or self._dispatcher.default_model
            usage.model = model
            deadline = time.monotonic() + query.ttft_slo_ms / 1000 if query.ttft_slo_ms else None
            request = self._dispatcher.request(query.pid, record.tenant, record.spec.priority,
                                               deadline)
            while not finish:
                if interrupt.state is Interruption.KILLED:
                    finish = "killed"
                    break
                if interrupt.state is Interruption.SUSPENDED:
                    await self._wait_resumed(interrupt)
                    continue
                interrupt.settle()
                lease = Lease(request, lambda: interrupt.fire(Interruption.PREEMPTED))
                if not await self._acquire(model, lease, interrupt):
                    continue  # killed or suspended while queued
                usage.queue_ms += lease.waited_ms
                self._table.segment_started(query.pid)
                try:
                    segment = await self._segment(record, query, model, answer, usage,
                                                  interrupt, started)
                finally:
                    self._dispatcher.release(model, lease)
                    self._table.segment_ended(query.pid)
                if segment.interrupted is Interruption.PREEMPTED:
                    usage.preemptions += 1
                finish = segment.finish
        finally:
            usage.total_ms = (time.perf_counter() - started) * 1000
            usage.cost = (usage.tokens_in + usage.tokens_out) / 1000 * self._price(usage.model)
            self._table.end_ask(query.pid, interrupt.fire, usage)
        if finish != "killed" and not query.stateless:
            # Durable before the answer's end is sent: what the caller saw is remembered,
            # now or, if vfm-datad is away, when it is back.
            lost = await self._context.remember_exchange(record, query.prompt,
                                                         "".join(answer.text))
            if lost:
                degraded.append(Degradation("not-remembered", lost))
        return AskDone(finish, usage, degraded)

    async def _acquire(self, model: str, lease: Lease, interrupt: Interrupt) -> bool:
        """Wait for a slot; give up (and leave the queue) on kill or suspend."""
        acquire = asyncio.ensure_future(self._dispatcher.acquire(model, lease))
        while not acquire.done():
            interrupt.changed.clear()
            if interrupt.stops_waiting:
                break
            changed = asyncio.ensure_future(interrupt.changed.wait())
            await asyncio.wait({acquire, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
        if acquire.done() and not interrupt.stops_waiting:
            return True
        acquire.cancel()
        await asyncio.gather(acquire, return_exceptions=True)
        self._dispatcher.release(model, lease)
        return False

    @staticmethod
    async def _wait_resumed(interrupt: Interrupt) -> None:
        """A suspended process keeps its asks open; they go on after resume (or end on kill)."""
        while interrupt.state not in (Interruption.RESUMED, Interruption.KILLED):
            interrupt.changed.clear()
            await interrupt.changed.wait()
        interrupt.settle()

    async def _segment(self, record: ProcRecord, query: AskQuery, model: str, answer: _Answer,
                       usage: Usage, interrupt: Interrupt, started: float) -> _Segment:
        """Generate while the slot is held: until the answer is over or an interruption.
        A piece of several tokens that would cross the token budget is not taken; the
        model is asked again for exactly what is left, so the cap is met to the token."""
        segment = _Segment()
        segment_start = time.perf_counter()
        try:
            while not segment.finish and await self._stream(record, query, model, answer,
                                                            usage, interrupt, started, segment):
                pass
        finally:
            usage.decode_ms += (time.perf_counter() - segment_start) * 1000
        if not segment.finish:
            state = interrupt.state
            if state is Interruption.KILLED:
                segment.finish = "killed"
            else:
                segment.interrupted = state
                interrupt.settle()
        return segment

    async def _stream(self, record: ProcRecord, query: AskQuery, model: str, answer: _Answer,
                      usage: Usage, interrupt: Interrupt, started: float,
                      segment: _Segment) -> bool:
        """One Generate stream, accounted piece by piece. True when it stopped short of
        the budget only to be asked again for the exact remainder."""
        quota, counters = record.spec.quota, record.counters
        asked = query.max_new_tokens or DEFAULT_NEW_TOKENS
        limited = quota.max_tokens > 0
        out = usage.tokens_out
        # Ask for what may still come. Until the prompt's size is known (from the first
        # piece) this counts the budget without it, and the stream is cut at the true cap.
        cap = new_token_cap(quota, counters, usage.tokens_in, asked)
        if out >= cap:
            segment.finish = "quota" if cap < asked else "length"
            return False
        stream = self._model.generate(self._call(record, query, model, answer, cap - out))
        interrupt.attach(stream)
        texts, ids, grown = answer.text, answer.ids, answer.grown
        charge, tenant = self._dispatcher.charge, record.tenant
        need_prompt, first = not usage.tokens_in, not usage.ttft_ms
        again = False
        try:
            async for piece in stream:
                if need_prompt and piece.prompt_tokens:
                    need_prompt = False
                    self._check_prompt_fits(record, piece.prompt_tokens, stream)
                    usage.tokens_in = piece.prompt_tokens
                if piece.done:
                    finish = piece.finish_reason or "stop"
                    if finish == "length" and limited:
                        cap = new_token_cap(quota, counters, usage.tokens_in, asked)
                        if out >= cap and cap < asked:
                            finish = "quota"  # the request was cut to the budget's remainder
                    segment.finish = finish
                    break
                n = piece.tokens
                if limited:
                    cap = new_token_cap(quota, counters, usage.tokens_in, asked)
                if out + n > cap:
                    stream.cancel()
                    if n > 1 and out < cap:
                        again = True
                    else:
                        segment.finish = "quota" if cap < asked else "length"
                    break
                out += n
                charge(tenant, n)
                if first and n:
                    first = False
                    usage.ttft_ms = (time.perf_counter() - started) * 1000
                ids.extend(piece.token_ids)
                if piece.text:
                    texts.append(piece.text)
                    grown.set()
        finally:
            interrupt.attach(None)
            stream.cancel()  # a no-op when the stream is over; frees it when we left early
            usage.tokens_out = out
        return again

    async def _refresh_models(self) -> None:
        """Model prices and batch sizes from the model service (refreshed each minute)."""
        if time.monotonic() - self._models_at < MODELS_TTL_S:
            return
        models = await self._model.list_models()
        self._models = {m.name: m for m in models}
        self._dispatcher.set_default_model(next((m.name for m in models if m.is_default), ""))
        for m in models:
            self._dispatcher.set_capacity(m.name, m.max_batch)
        self._models_at = time.monotonic()

    def _price(self, model: str) -> float:
        info = self._models.get(model)
        return info.cost_per_1k_tokens if info else 0.0

    @staticmethod
    def _check_prompt_fits(record: ProcRecord, prompt_tokens: int, stream) -> None:
        left = remaining_tokens(record.spec.quota, record.counters)
        if left is not None and prompt_tokens >= left:
            stream.cancel()
            raise QuotaExceeded(
                f"the question is {prompt_tokens} tokens but process {record.pid} has only "
                f"{left} left of its {record.spec.quota.max_tokens}-token budget",
                "max_tokens", f"pid {record.pid}")

    @staticmethod
    def _call(record: ProcRecord, query: AskQuery, model: str, answer: _Answer,
              max_new: int) -> GenerateCall:
        spec = record.spec
        messages = []
        system = "\n\n".join(part for part in (spec.system_prompt, query.context) if part)
        if system:
            messages.append(ChatMessage("system", system))
        messages.append(ChatMessage("user", query.prompt))
        return GenerateCall(
            model=model, messages=tuple(messages), max_new_tokens=max_new,
            assistant_prefix="".join(answer.text), assistant_prefix_ids=tuple(answer.ids),
            temperature=query.temperature, top_p=query.top_p, seed=query.seed,
            stop=tuple(query.stop), priority=spec.priority)
