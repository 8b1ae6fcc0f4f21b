"""The Ask path: admit a question, queue it for a model slot, stream it (checked by the trust
agent on the way in and out), survive preemption, account."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from kernel.asklog import AskEntry, AskLog, new_ask_id
from kernel.cascade import Calibration, CascadePlan, Confidence, plan as plan_cascade
from kernel.context import ContextManager
from kernel.dispatch import Dispatcher, Lease
from kernel.identity import Caller
from kernel.interrupt import Interrupt, Interruption
from kernel.keys import KeyAccount, KeyLedger
from kernel.memory import Item, render
from kernel.ports import ChatMessage, GenerateCall, ModelClient, ModelInfo, Verdict
from kernel.process import MAX_SYSTEM_PROMPT, ProcRecord
from kernel.quota import new_token_cap, remaining_tokens
from kernel.table import ProcessTable
from kernel.trust_path import Ending, OutputGuard, Revision, TrustGate, TrustSession, strongest
from vfmos_runtime.errors import InvalidArgument, QuotaExceeded, VfmError
from vfmos_runtime.protocol import MAX_NEW_TOKENS
from vfmos_runtime.types import AUTO_MODEL, Usage

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
    # The caller's instructions for this Ask alone (an OpenAI app's system message): they
    # follow the process's own system prompt, never replace it.
    instructions: str = ""
    # An app's OpenAI messages, tools and tool_choice (JSON), for a model behind an
    # OpenAI-compatible backend; "" = an ordinary Ask.
    tools_json: str = ""
    # Set by the kernel, never by the caller: the working set rendered; what the model gets
    # instead of the process's system prompt and the question (pseudonymized for an
    # external model; None: as they are); a verifier's feedback for a revision.
    context: str = ""
    system_prompt: str | None = None
    model_prompt: str | None = None
    feedback: str = ""
    key: KeyAccount | None = None  # the caller's bearer token, charged with the answer

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
        if len(self.instructions) > MAX_SYSTEM_PROMPT:
            raise InvalidArgument(f"instructions are longer than {MAX_SYSTEM_PROMPT} characters")
        if self.tools_json:
            check_tools_json(self.tools_json)
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
    verdict: Verdict | None = None  # None with the trust agent off
    escalation_id: str = ""
    tool_calls_json: str = ""  # finish "tool-calls": the calls (OpenAI JSON array)


class _Answer:
    """The answer so far: the model's text, and its token ids when the model service reports
    them (they let a continuation resume exactly where the model stopped). `grown` is set
    each time text is added.

    The client is relayed `shown`, with `shown_grown` set as it grows. Without the trust
    agent those are the model's own list and event; with it, only checked text goes there."""

    def __init__(self, checked: bool = False):
        self.text: list[str] = []
        self.ids: list[int] = []
        self.grown = asyncio.Event()
        self.shown = [] if checked else self.text
        self.shown_grown = asyncio.Event() if checked else self.grown
        self.stopped = False  # the trust agent cut the answer
        self.stream = None    # the generation running, to cut it
        self.on_grown = self.grown.set
        self.confidence = Confidence()
        self.spent = 0        # tokens of earlier attempts (a revision, a cascade's first answer)
        self.tool_calls_json = ""  # what the model called, when it ended by calling tools
        self._relayed = 0

    def show(self, text: str) -> None:
        self.shown.append(text)
        self.shown_grown.set()

    def stop(self) -> None:
        self.stopped = True
        if self.stream is not None:
            self.stream.cancel()

    def restart(self, spent: int) -> None:
        """The answer so far is dropped (never shown); `spent` tokens count against the
        process's budget for the next attempt."""
        self.text.clear()
        self.ids.clear()
        self.stopped = False
        self.confidence = Confidence()
        self.spent = spent
        self._relayed = 0

    def pass_through(self) -> None:
        """From now on the model's text is shown as it comes (a cascade without the trust
        agent, once its hidden first answer was escalated)."""
        def relay() -> None:
            new = self.text[self._relayed:]
            self._relayed = len(self.text)
            if new:
                self.show("".join(new))
            self.grown.set()
        self.on_grown = relay


@dataclass
class _Segment:
    """Outcome of one stretch of generation between two interruptions."""

    finish: str = ""  # set when the answer is over ("stop", "length", "quota", "killed")
    interrupted: Interruption = Interruption.NONE  # set when it must continue later


class AskRunner:
    def __init__(self, table: ProcessTable, models: ModelClient, dispatcher: Dispatcher,
                 context: ContextManager, trust: TrustGate | None = None,
                 asks: AskLog | None = None, keys: KeyLedger | None = None,
                 stream_interval_s: float = 0.0):
        self._asks = asks
        self._interval = stream_interval_s
        self._keys = keys
        self._feedback_tasks: set[asyncio.Task] = set()
        self._context = context
        self._trust = trust or TrustGate(None)
        self._table = table
        self._model = models
        self._dispatcher = dispatcher
        self._models: dict[str, ModelInfo] = {}
        self._models_at = -1e9
        self._calibration = Calibration()  # calibrated cascades' recent first answers

    async def ask(self, caller: Caller, query: AskQuery) -> AsyncIterator[str | AskDone]:
        """Yield the answer's text pieces, then one AskDone.

        The answer is produced by its own task and relayed from `_Answer.text` as it grows:
        the first piece goes out at once, and the next ones no sooner than the stream
        interval after the one before: the pieces that came meanwhile (or while the reader
        was slower than the model) go out joined, in one message (far fewer writes for the
        same text). The AskDone stays last."""
        query.validate()
        # A cascade's first answer is never shown as it comes: it may be replaced.
        answer = _Answer(checked=self._trust.enabled or self._cascades(caller, query.pid))
        texts, grown = answer.shown, answer.shown_grown
        run = asyncio.ensure_future(self._run(caller, query, answer))
        run.add_done_callback(lambda _: grown.set())  # the answer is over: wake the relay
        sent, interval, clock = 0, self._interval, time.monotonic
        due = 0.0  # when the next message may go
        try:
            while True:
                n = len(texts)
                if n > sent:
                    if interval:
                        now = clock()
                        if now < due and not run.done():
                            await asyncio.sleep(due - now)
                            continue
                        due = now + interval
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

    def _cascades(self, caller: Caller, pid: int) -> bool:
        try:
            spec = self._table.get(caller, pid).spec
        except VfmError:
            return False  # the Ask itself will say what is wrong with the pid
        return spec.model == AUTO_MODEL and (spec.route.cascade_confidence > 0
                                             or spec.route.cascade_rate > 0)

    async def _run(self, caller: Caller, query: AskQuery, answer: _Answer) -> AskDone:
        started = time.perf_counter()
        interrupt = Interrupt()
        key = query.key = self._keys.get(caller.key) if self._keys is not None else None
        if key is not None:
            key.admit_ask()
        record = self._table.begin_ask(caller, query.pid, interrupt.fire)
        usage, finish, degraded = Usage(ask_id=new_ask_id()), "", []
        trust = self._trust.session(record.tenant, record.pid, query.prompt,
                                    system_of(record, query)) if self._trust.enabled else None
        ending, error = None, ""
        try:
            await self._refresh_models()
            items: list[Item] = []
            if not query.stateless:
                items, missing = await self._context.for_ask(record, query.prompt)
                if missing:
                    degraded.append(Degradation("memory-unavailable", missing))
            model, cascade = record.spec.model or self._dispatcher.default_model, None
            if model == AUTO_MODEL:
                model, cascade = await self._route(record, query, items, usage.ask_id, usage)
            usage.model = model
            if query.tools_json and self._backend(model) != "openai":
                raise InvalidArgument(f"model {model} runs in vfm-modeld and takes no tools; "
                                      "only a model behind an OpenAI-compatible server does")
            deadline = time.monotonic() + query.ttft_slo_ms / 1000 if query.ttft_slo_ms else None
            request = self._dispatcher.request(query.pid, record.tenant, record.spec.priority,
                                               deadline)

            async def generate(model: str, attempt: Usage) -> str:
                try:
                    return await self._generate(record, query, model, answer, attempt,
                                                interrupt, started, request)
                finally:  # each attempt is charged at the price of the model that made it
                    attempt.cost = (attempt.tokens_in + attempt.tokens_out) / 1000 * \
                        self._price(model)
            if trust is None:
                query.context = render(items)
                finish = await (generate(model, usage) if cascade is None else
                                self._cascade_unchecked(cascade, record.tenant, answer, usage,
                                                        generate))
            else:
                finish, ending = await self._answer_checked(trust, record, query, items, model,
                                                            answer, usage, generate, cascade)
        except Exception as err:
            error = getattr(err, "message", "") or repr(err)
            raise
        finally:
            usage.total_ms = (time.perf_counter() - started) * 1000
            confidence = answer.confidence.value()
            usage.confidence = confidence if confidence is not None else 0.0
            self._table.end_ask(query.pid, interrupt.fire, usage)
            if key is not None:
                self._keys.settle(key)
            if trust is not None:
                trust.close()
            self._trust.record(record.tenant, record.pid, usage, query.prompt,
                               "".join(answer.shown), trust, error)
            self._log_ask(record, usage, trust)
        if finish != "killed" and not query.stateless:
            # Durable before the answer's end is sent: what the caller saw is remembered,
            # now or, if vfm-datad is away, when it is back.
            lost = await self._context.remember_exchange(record, query.prompt,
                                                         "".join(answer.shown))
            if lost:
                degraded.append(Degradation("not-remembered", lost))
        return AskDone(finish, usage, degraded, trust.final_verdict() if trust else None,
                       ending.escalation_id if ending else "",
                       answer.tool_calls_json if finish == "tool-calls" else "")

    async def _route(self, record: ProcRecord, query: AskQuery, items: list[Item], ask_id: str,
                     usage: Usage) -> tuple[str, CascadePlan | None]:
        """The router's model for this Ask (vfm-modeld keeps the decision under ask_id), or
        with a cascade the model that answers first and the plan."""
        chars = len(system_of(record, query)) + len(query.prompt) + sum(len(i.text) for i in items)
        policy = record.spec.route
        budget = record.spec.quota.cost_budget
        if budget:  # the route also keeps within what is left of the process's total budget
            left = max(budget - record.counters.cost, 1e-12)
            cap = min(policy.max_cost_per_ask, left) if policy.max_cost_per_ask else left
            policy = dataclasses.replace(policy, max_cost_per_ask=cap)
        decision = await self._model.route(record.tenant, query.prompt, policy, chars // 4,
                                           query.max_new_tokens or DEFAULT_NEW_TOKENS, ask_id)
        usage.route_reason = decision.reason
        cascade = plan_cascade(decision, policy.cascade_confidence, policy.max_cost_per_ask,
                               policy.cascade_rate)
        if cascade is None:
            return decision.model, None
        cascade = self._calibration.calibrated(cascade, record.tenant)
        usage.route_reason += f"; {cascade.describe()}"
        return cascade.first, cascade

    async def _cascade_unchecked(self, cascade: CascadePlan, tenant: str, answer: _Answer,
                                 usage: Usage, generate) -> str:
        """A cascade without the trust agent: the first model's answer, held, is shown or
        escalated on its confidence alone."""
        finish = await generate(cascade.first, usage)
        if finish == "killed":
            return finish
        confidence = answer.confidence.value()
        escalate, why = cascade.escalation(confidence, "", usage.cost)
        self._calibration.record(tenant, cascade.first, confidence, None)
        usage.route_reason += f"; {why}"
        if not escalate:
            answer.show("".join(answer.text))
            return finish
        usage.escalated_from = cascade.first
        answer.restart(usage.tokens_in + usage.tokens_out)
        answer.pass_through()
        attempt = Usage(model=cascade.then)
        try:
            return await generate(cascade.then, attempt)
        finally:
            _add_usage(usage, attempt)

    def _log_ask(self, record: ProcRecord, usage: Usage, trust: TrustSession | None) -> None:
        """Keep the Ask's id for feedback; a routed answer that trust judged teaches the
        tenant's router (a refused or revised answer as bad, an allowed one as good)."""
        if self._asks is None:
            return
        routed = bool(usage.route_reason)
        self._asks.record(AskEntry(usage.ask_id, record.tenant, record.pid, usage.model, routed,
                                   time.time()))
        verdict = trust.final_verdict() if trust is not None else None
        if not routed or verdict is None or not usage.tokens_out:
            return
        good = verdict.outcome in ("allow", "redact")
        if not good and verdict.outcome not in ("refuse", "revise"):
            return
        task = asyncio.ensure_future(self._trust_feedback(record.tenant, usage.ask_id, good,
                                                          usage.model))
        self._feedback_tasks.add(task)
        task.add_done_callback(self._feedback_tasks.discard)

    async def _trust_feedback(self, tenant: str, ask_id: str, good: bool, model: str) -> None:
        try:
            await self._model.feedback(tenant, ask_id, good, "trust", model)
        except Exception as exc:  # feedback is advice: its loss never fails an Ask
            log.warning("the trust verdict of Ask %s was not recorded as feedback: %s",
                        ask_id, getattr(exc, "message", exc))

    async def _generate(self, record: ProcRecord, query: AskQuery, model: str, answer: _Answer,
                        usage: Usage, interrupt: Interrupt, started: float, request) -> str:
        """Queue for a slot and generate, again after each preemption, until the answer is
        over; returns its finish reason."""
        finish = ""
        while not finish:
            if interrupt.state is Interruption.KILLED:
                return "killed"
            if answer.stopped:
                return "refused"
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
        return finish

    async def _answer_checked(self, trust: TrustSession, record: ProcRecord, query: AskQuery,
                              items: list[Item], model: str, answer: _Answer, usage: Usage,
                              generate, cascade: CascadePlan | None = None
                              ) -> tuple[str, Ending | None]:
        """The Ask with the trust agent: screen the working set, pseudonymize toward an
        external model, release the answer window by window as vfm-trustd allows, verify
        it with system 2 (revising when asked), and end early where a check says so. A
        cascade's first answer is held and checked whole, then shown or escalated."""
        ahead, first = None, Usage(model=model)
        if cascade is None and self._backend(model) != "openai" and trust.may_start_early(items):
            # A model of ours starts on the question and the process's own turns while
            # system 1 screens them (its text is shown only once checked). A model elsewhere
            # must never see what the screen would pseudonymize, so it waits.
            query.context = render(items)
            ahead = asyncio.ensure_future(generate(model, first))
        try:
            screened, ending = await trust.screen(items)
        except BaseException:
            await self._drop_ahead(ahead, first, usage, answer)
            raise
        if ahead is not None and (ending is not None or trust.model_question is not None
                                  or len(screened) != len(items)):
            await self._drop_ahead(ahead, first, usage, answer)  # it read what is not allowed
            ahead, first = None, Usage(model=model)
        items = screened
        if ending is not None:
            answer.show(ending.reply)
            return ending.finish, ending
        query.context = render(items)
        if trust.model_question is not None:  # a redact rule on the input: the model sees it so
            query.model_prompt = trust.model_question
        if self._backend(model) == "openai":
            masked = await trust.pseudonymize(
                system_of(record, query),
                query.prompt if query.model_prompt is None else query.model_prompt, items)
            if masked is not None:
                query.system_prompt, query.model_prompt, masked_items = masked
                query.context = render(masked_items)
        attempt = first
        while True:
            hold = trust.verifies or cascade is not None
            guard = OutputGuard(trust, answer.text, answer.show, answer.stop, hold)
            answer.on_grown = guard.grown
            checking = asyncio.ensure_future(guard.run())
            try:
                finish = await (ahead if ahead is not None else generate(model, attempt))
            except BaseException:
                checking.cancel()
                await asyncio.gather(checking, return_exceptions=True)
                raise
            finally:
                ahead = None
                _add_usage(usage, attempt)
            guard.finish()
            await checking  # the last window's check (its error is the Ask's)
            if finish == "killed":
                return finish, None
            if cascade is not None:
                plan, cascade = cascade, None
                if await self._escalate(trust, record.tenant, plan, guard, items, answer,
                                        usage):
                    model = plan.then
                    attempt = Usage(model=model)
                    continue
                if guard.cut is None and not trust.verifies:
                    answer.show(guard.held)
                    return finish, None
            if guard.cut is not None:
                return await self._cut(trust, guard, answer)
            if not guard.hold:
                return finish, None
            judged = await trust.system2(guard.held, items, model)
            if isinstance(judged, Revision):  # the held answer is dropped: the client never saw it
                query.feedback, model = judged.feedback, judged.model or model
                answer.restart(usage.tokens_in + usage.tokens_out)
                attempt = Usage(model=model)
                continue
            if isinstance(judged, Ending):
                answer.show(judged.reply)
                return judged.finish, judged
            answer.show(guard.held)
            return finish, None

    @staticmethod
    async def _drop_ahead(ahead: asyncio.Future | None, first: Usage, usage: Usage,
                          answer: _Answer) -> None:
        """The answer begun before the screen is dropped unseen; what it spent counts."""
        if ahead is None:
            return
        ahead.cancel()
        await asyncio.gather(ahead, return_exceptions=True)
        _add_usage(usage, dataclasses.replace(first, ttft_ms=0.0))
        answer.restart(usage.tokens_in + usage.tokens_out)

    async def _escalate(self, trust: TrustSession, tenant: str, plan: CascadePlan,
                        guard: OutputGuard, items: list[Item], answer: _Answer,
                        usage: Usage) -> bool:
        """Judge a cascade's held first answer: its confidence, the output checks, and its
        grounding where the working set holds knowledge. True: it is dropped unseen (its
        checks stay in the record as the draft's) and the next model answers."""
        mark = trust.draft_mark()
        failed = guard.cut.verdict.reasons[0] if guard.cut is not None and \
            guard.cut.verdict.reasons else ("an output check" if guard.cut is not None else "")
        knowledge = [i for i in items if i.kind == "knowledge"]
        grounding, ungrounded = None, False
        if not failed and knowledge:
            verified = await trust.verify(guard.held, knowledge, plan.first, target="draft")
            if verified is not None:
                ungrounded = verified.verdict.outcome not in ("allow", "redact")
                grounding = next((c.score for c in verified.verdict.checks
                                  if c.check == "grounding"), None)
        confidence = answer.confidence.value()
        escalate, why = plan.escalation(confidence, failed, usage.cost, grounding, ungrounded)
        if not failed:  # a check failure says nothing of how sure the model usually is
            self._calibration.record(tenant, plan.first, confidence, grounding)
        usage.route_reason += f"; {why}"
        if not escalate:
            return False
        trust.drop_draft(mark, f"cascade: {why}")
        usage.escalated_from = plan.first
        answer.restart(usage.tokens_in + usage.tokens_out)
        return True

    @staticmethod
    async def _cut(trust: TrustSession, guard: OutputGuard,
                   answer: _Answer) -> tuple[str, Ending | None]:
        """vfm-trustd cut the answer: what it released stays, then the policy's reply."""
        verdict = guard.cut.verdict
        if verdict.outcome == "escalate":
            ending = await trust.escalate(verdict)
        else:
            trust.verdict.outcome = strongest(trust.verdict.outcome, "refuse")
            ending = Ending("refused", verdict.holding_reply or trust.reply("refusal"))
        answer.show(("\n" if guard.sent else "") + ending.reply)
        return ending.finish, ending

    def _backend(self, model: str) -> str:
        info = self._models.get(model)
        return info.backend if info else ""

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
        the budget only to be asked again for the exact remainder.

        The caller's key is charged each piece in the step that checks it fits (no await
        between), so concurrent Asks of one key share what it has left to the token."""
        key, price = query.key, self._price(model)
        asked = query.max_new_tokens or DEFAULT_NEW_TOKENS
        limited = record.spec.quota.max_tokens > 0 or (key is not None and key.limited)
        out = usage.tokens_out
        # Ask for what may still come. Until the prompt's size is known (from the first
        # piece) this counts the budget without it, and the stream is cut at the true cap.
        spent = answer.spent  # an earlier attempt's tokens (this Ask's, not yet in counters)

        def cap_now() -> int:
            return self._cap(record, key, price, usage.tokens_in + spent, asked, out)
        cap = cap_now()
        if out >= cap:
            if key is not None and not (usage.tokens_in or out or spent) and \
                    key.room(price) == 0:
                raise key.exhausted(price)  # its key ran out while it waited: nothing charged
            segment.finish = "quota" if cap < asked else "length"
            return False
        stream = self._model.generate(self._call(record, query, model, answer, cap - out))
        interrupt.attach(stream)
        answer.stream = stream
        if answer.stopped:
            stream.cancel()
        texts, ids, confidence = answer.text, answer.ids, answer.confidence
        charge, tenant = self._dispatcher.charge, record.tenant
        need_prompt, first = not usage.tokens_in, not usage.ttft_ms
        again = False
        try:
            async for piece in stream:
                if need_prompt and piece.prompt_tokens:
                    need_prompt = False
                    self._check_prompt_fits(record, piece.prompt_tokens, stream)
                    if key is not None:
                        self._charge_key_prompt(key, piece.prompt_tokens, price, stream)
                    usage.tokens_in = piece.prompt_tokens
                if piece.done:
                    finish = piece.finish_reason or "stop"
                    answer.tool_calls_json = piece.tool_calls_json
                    if finish == "length" and limited:
                        cap = cap_now()
                        if out >= cap and cap < asked:
                            finish = "quota"  # the request was cut to the budget's remainder
                    segment.finish = finish
                    break
                n = piece.tokens
                if limited:
                    cap = cap_now()
                if out + n > cap:
                    stream.cancel()
                    if n > 1 and out < cap:
                        again = True
                    else:
                        segment.finish = "quota" if cap < asked else "length"
                    break
                out += n
                charge(tenant, n)
                if key is not None:
                    key.charge(n, price)
                confidence.add(n, piece.logprob)
                if first and n:
                    first = False
                    usage.ttft_ms = (time.perf_counter() - started) * 1000
                ids.extend(piece.token_ids)
                if piece.text:
                    texts.append(piece.text)
                    answer.on_grown()  # looked up each time: a guard may take over mid-stream
        finally:
            interrupt.attach(None)
            answer.stream = None
            stream.cancel()  # a no-op when the stream is over; frees it when we left early
            usage.tokens_out = out
        if answer.stopped and not segment.finish:
            segment.finish = "refused"  # the trust agent cut it
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
    def _cap(record: ProcRecord, key: KeyAccount | None, price: float, prompt_tokens: int,
             asked: int, out: int) -> int:
        """New tokens the Ask may have in all: what the process's budget leaves, and what
        its key can still pay for at this model's price on top of the `out` it paid for."""
        cap = new_token_cap(record.spec.quota, record.counters, prompt_tokens, asked)
        room = key.room(price) if key is not None else None
        return cap if room is None else min(cap, out + room)

    @staticmethod
    def _charge_key_prompt(key: KeyAccount, prompt_tokens: int, price: float, stream) -> None:
        refusal = key.prompt_refusal(prompt_tokens, price)
        if refusal is not None:
            stream.cancel()
            raise refusal
        key.charge(prompt_tokens, price)

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
        own = system_of(record, query) if query.system_prompt is None else query.system_prompt
        feedback = f"A reviewer checked your previous answer to this question: " \
                   f"{query.feedback}\nAnswer again." if query.feedback else ""
        system = "\n\n".join(part for part in (own, query.context, feedback) if part)
        if system:
            messages.append(ChatMessage("system", system))
        messages.append(ChatMessage("user", query.prompt if query.model_prompt is None
                                    else query.model_prompt))
        return GenerateCall(
            model=model, messages=tuple(messages), max_new_tokens=max_new,
            assistant_prefix="".join(answer.text), assistant_prefix_ids=tuple(answer.ids),
            temperature=query.temperature, top_p=query.top_p, seed=query.seed,
            stop=tuple(query.stop), priority=spec.priority, tenant=record.tenant,
            tools_json=query.tools_json)


def check_tools_json(text: str) -> None:
    """An Ask's tools_json: a JSON object with a non-empty "messages" list and a "tools"
    list (OpenAI's shapes; the server behind the model checks the rest)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"tools_json is longer than {MAX_PROMPT_CHARS} characters")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"tools_json is not JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list) \
            or not value["messages"] or not isinstance(value.get("tools"), list):
        raise InvalidArgument('tools_json must be an object with a non-empty "messages" list '
                              'and a "tools" list')


def system_of(record: ProcRecord, query: AskQuery) -> str:
    """What the model is told first: the process's system prompt, then the Ask's own
    instructions."""
    return "\n\n".join(part for part in (record.spec.system_prompt, query.instructions) if part)


def _add_usage(total: Usage, part: Usage) -> None:
    """A revision's figures added to its Ask's (the first token is the first attempt's)."""
    total.tokens_in += part.tokens_in
    total.tokens_out += part.tokens_out
    total.queue_ms += part.queue_ms
    total.decode_ms += part.decode_ms
    total.preemptions += part.preemptions
    total.cost += part.cost
    total.ttft_ms = total.ttft_ms or part.ttft_ms
    total.model = part.model or total.model
