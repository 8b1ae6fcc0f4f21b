"""AskRunner without daemons: an in-memory model service behind the ModelClient port, a real
ProcessTable on a temp-dir LMDB, the real Dispatcher: kill, suspend/resume, preemption as a
context switch, exact token budgets, the relay's coalescing."""

from __future__ import annotations

import asyncio

import pytest

from kernel.ask import AskDone, AskQuery, AskRunner
from kernel.context import ContextManager
from kernel.dispatch import Dispatcher
from kernel.identity import Caller
from kernel.memory import PageTable
from kernel.outbox import ExchangeOutbox, OutboxStore
from kernel.ports import GenerateCall, GenPiece, ModelInfo
from kernel.store import KernelStore
from kernel.table import ProcessTable
from vfmos_runtime.errors import QuotaExceeded, Unavailable
from vfmos_runtime.types import ProcessSpec, Quota

PROMPT = 10  # what the fake model says every prompt is, in tokens
ALICE = Caller("alice", 1000, False, "unix")


class FakeModel:
    """A model service in memory: every answer is tokens "<0>", "<1>", ... numbered from
    where the assistant prefix ends (so a continuation visibly carries on), ids 1000+i.
    It runs while `running` is set; each piece is `per_piece` tokens."""

    def __init__(self, max_batch: int = 8, per_piece: int = 1, piece_delay_s: float = 0.0):
        self.max_batch = max_batch
        self.per_piece = per_piece
        self.piece_delay_s = piece_delay_s
        self.calls: list[GenerateCall] = []
        self.streams: list[FakeStream] = []
        self.running = asyncio.Event()
        self.running.set()
        self.produced = 0
        self.pause_at: int | None = None  # hold the model once this many tokens are out

    def generate(self, call: GenerateCall) -> "FakeStream":
        self.calls.append(call)
        stream = FakeStream(self, call)
        self.streams.append(stream)
        return stream

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name="fake", is_default=True, max_batch=self.max_batch,
                          cost_per_1k_tokens=2.0)]


class FakeStream:
    def __init__(self, model: FakeModel, call: GenerateCall):
        self.model, self.call = model, call
        self.start = len(call.assistant_prefix_ids)
        self.sent = 0
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenPiece:
        await asyncio.sleep(self.model.piece_delay_s)
        if self.model.pause_at is not None and self.model.produced >= self.model.pause_at:
            self.model.running.clear()  # the test acts at a known token, then lets it go on
            self.model.pause_at = None
        while not self.model.running.is_set() and not self.cancelled:
            await asyncio.sleep(0.001)
        if self.cancelled or self.finished:
            raise StopAsyncIteration
        left = self.call.max_new_tokens - self.sent
        if left <= 0:
            self.finished = True
            return GenPiece(done=True, finish_reason="length", prompt_tokens=PROMPT)
        n = min(self.model.per_piece, left)
        first = self.start + self.sent
        self.sent += n
        self.model.produced += n
        return GenPiece(text="".join(f"<{i}>" for i in range(first, first + n)), tokens=n,
                        token_ids=tuple(1000 + i for i in range(first, first + n)),
                        prompt_tokens=PROMPT)


class FakeData:
    """The data service is not there: asks go on without a working set."""

    async def candidates(self, query):
        raise Unavailable("service vfm-datad is not running")

    async def remember(self, tenant, pid, entries, exchange_id=""):
        raise Unavailable("service vfm-datad is not running")

    async def fork_memory(self, tenant, parent, child):
        raise Unavailable("service vfm-datad is not running")


class Kernel:
    def __init__(self, path, model: FakeModel, stream_interval_s: float = 0.0):
        self.store = KernelStore(path)
        self.table = ProcessTable(self.store)
        self.dispatcher = Dispatcher()
        self.model = model
        data = FakeData()
        self.outbox = ExchangeOutbox(OutboxStore(self.store), data)
        context = ContextManager(self.table, data, PageTable(self.store), self.outbox)
        self.runner = AskRunner(self.table, model, self.dispatcher, context,
                                stream_interval_s=stream_interval_s)

    def spawn(self, name: str = "p", priority: int = 20, quota: Quota | None = None) -> int:
        spec = ProcessSpec(name=name, priority=priority, quota=quota or Quota())
        return asyncio.run(self.table.spawn(ALICE, spec)).pid

    async def ask(self, pid: int, tokens: int, prompt: str = "Tell me a story.") -> list:
        items = []
        async for item in self.runner.ask(ALICE, AskQuery(pid=pid, prompt=prompt,
                                                           max_new_tokens=tokens)):
            items.append(item)
        return items


@pytest.fixture
def kernel(tmp_path):
    made: list[Kernel] = []

    def make(stream_interval_s: float = 0.0, **options) -> Kernel:
        k = Kernel(tmp_path, FakeModel(**options), stream_interval_s)
        made.append(k)
        return k
    yield make
    for k in made:
        k.store.close()


def answer(items: list) -> tuple[str, AskDone]:
    assert isinstance(items[-1], AskDone) and all(isinstance(i, str) for i in items[:-1])
    return "".join(items[:-1]), items[-1]


def tokens(first: int, count: int) -> str:
    return "".join(f"<{i}>" for i in range(first, first + count))


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_an_answer_is_streamed_and_accounted(kernel):
    k = kernel()
    pid = k.spawn()
    text, done = answer(asyncio.run(k.ask(pid, 12)))
    assert text == tokens(0, 12)
    assert done.finish_reason == "length" and done.usage.tokens_out == 12
    assert done.usage.tokens_in == PROMPT and done.usage.model == "fake"
    assert done.usage.cost == pytest.approx((PROMPT + 12) / 1000 * 2.0)
    record = k.table.get(ALICE, pid)
    assert record.counters.tokens_out == 12 and record.counters.asks == 1
    assert record.state.name == "READY" and k.table.running(pid) == 0
    assert k.model.calls[0].max_new_tokens == 12 and k.model.calls[0].model == "fake"


def test_an_answer_without_its_working_set_says_so(kernel):
    k = kernel()  # the data service is not there (FakeData)
    pid = k.spawn()
    text, done = answer(asyncio.run(k.ask(pid, 4)))
    assert text == tokens(0, 4)
    assert [(d.kind, d.reason) for d in done.degraded] == [
        ("memory-unavailable", "vfm-datad not reachable")]
    assert k.outbox.pending == 1  # the exchange waits to be remembered
    stateless = asyncio.run(_ask_stateless(k, pid))
    assert stateless.degraded == []  # it asked for no memory: it went without nothing


async def _ask_stateless(k: Kernel, pid: int) -> AskDone:
    items = [item async for item in k.runner.ask(ALICE, AskQuery(
        pid=pid, prompt="Tell me a story.", max_new_tokens=4, stateless=True))]
    return items[-1]


def test_kill_ends_the_answer_where_it_is(kernel):
    async def scenario(k: Kernel, pid: int):
        ask = asyncio.create_task(k.ask(pid, 400))
        await until(lambda: k.model.produced >= 5)
        await k.table.kill(ALICE, pid)
        return await ask
    k = kernel()
    pid = k.spawn()
    text, done = answer(asyncio.run(scenario(k, pid)))
    assert done.finish_reason == "killed"
    assert 5 <= done.usage.tokens_out < 400 and text == tokens(0, done.usage.tokens_out)
    assert k.model.streams[0].cancelled
    assert k.table.get(ALICE, pid).state.name == "KILLED"


def test_suspend_holds_the_answer_and_resume_continues_it(kernel):
    async def scenario(k: Kernel, pid: int):
        k.model.pause_at = 5
        ask = asyncio.create_task(k.ask(pid, 40))
        await until(lambda: k.model.produced >= 5)
        await k.table.suspend(ALICE, pid)
        k.model.running.set()
        await asyncio.sleep(0.05)
        held = k.model.produced
        await asyncio.sleep(0.05)
        assert k.model.produced == held and not ask.done()  # nothing while suspended
        assert k.table.get(ALICE, pid).state.name == "SUSPENDED"
        await k.table.resume(ALICE, pid)
        return held, await ask
    k = kernel()
    pid = k.spawn()
    held, items = asyncio.run(scenario(k, pid))
    text, done = answer(items)
    assert text == tokens(0, 40)  # the same answer, carried on
    assert done.finish_reason == "length" and done.usage.tokens_out == 40
    assert done.usage.preemptions == 0 and len(k.model.calls) == 2
    resumed = k.model.calls[1]
    assert resumed.assistant_prefix == tokens(0, held)
    assert resumed.assistant_prefix_ids == tuple(1000 + i for i in range(held))
    assert resumed.max_new_tokens == 40 - held


def test_kill_while_suspended_ends_the_answer(kernel):
    async def scenario(k: Kernel, pid: int):
        k.model.pause_at = 3
        ask = asyncio.create_task(k.ask(pid, 40))
        await until(lambda: k.model.produced >= 3)
        await k.table.suspend(ALICE, pid)
        k.model.running.set()
        await asyncio.sleep(0.02)
        await k.table.kill(ALICE, pid)
        return await asyncio.wait_for(ask, 5)
    k = kernel()
    pid = k.spawn()
    _, done = answer(asyncio.run(scenario(k, pid)))
    assert done.finish_reason == "killed" and len(k.model.calls) == 1


def test_preemption_is_a_context_switch(kernel):
    """One slot; a higher-priority ask of the same tenant takes it; the first ask continues
    afterwards from the answer so far, as the assistant's prefix and ids."""
    async def scenario(k: Kernel, low: int, high: int):
        k.model.pause_at = 6  # hold the model so the cut is at a known token
        first = asyncio.create_task(k.ask(low, 30))
        await until(lambda: k.model.produced >= 6)
        await asyncio.sleep(0.01)
        cut = k.model.produced
        second = asyncio.create_task(k.ask(high, 5))
        await until(lambda: k.model.streams[0].cancelled)
        k.model.running.set()
        return cut, await first, await second
    k = kernel(max_batch=1)
    low, high = k.spawn("low", priority=10), k.spawn("high", priority=30)
    cut, first, second = asyncio.run(scenario(k, low, high))
    text, done = answer(first)
    assert text == tokens(0, 30) and done.usage.tokens_out == 30
    assert done.usage.preemptions == 1 and done.finish_reason == "length"
    assert answer(second)[1].usage.tokens_out == 5
    low_calls = [c for c in k.model.calls if c.priority == 10]
    assert len(low_calls) == 2
    assert low_calls[1].assistant_prefix_ids == tuple(1000 + i for i in range(cut))
    assert low_calls[1].max_new_tokens == 30 - cut
    # the high-priority ask ran while the low one waited: it was started before the resume
    assert k.model.calls.index(low_calls[1]) > [c.priority for c in k.model.calls].index(30)
    assert k.table.get(ALICE, low).counters.preemptions == 1


@pytest.mark.parametrize("per_piece", [1, 4])
def test_token_budget_is_met_to_the_token(kernel, per_piece):
    """Room for exactly 6 new tokens: the answer stops at 6, whatever the pieces carry (a
    piece of 4 that would cross the cap is not taken; the model is asked for the 2 left)."""
    k = kernel(per_piece=per_piece)
    budget = PROMPT + 6
    pid = k.spawn(quota=Quota(max_tokens=budget))
    text, done = answer(asyncio.run(k.ask(pid, 50)))
    assert done.finish_reason == "quota" and done.usage.tokens_out == 6
    assert text == tokens(0, 6)
    counters = k.table.get(ALICE, pid).counters
    assert counters.tokens_in + counters.tokens_out == budget
    assert k.model.calls[0].max_new_tokens == budget  # the prompt's size is not known yet
    if per_piece > 1:
        assert [c.max_new_tokens for c in k.model.calls[1:]] == [2]
        assert k.model.calls[1].assistant_prefix_ids == tuple(1000 + i for i in range(4))
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(k.ask(pid, 5))
    assert info.value.quota == "max_tokens"


def test_a_question_bigger_than_what_is_left_is_refused_before_any_charge(kernel):
    k = kernel()
    pid = k.spawn(quota=Quota(max_tokens=PROMPT))  # the prompt alone takes all of it
    with pytest.raises(QuotaExceeded) as info:
        asyncio.run(k.ask(pid, 5))
    assert info.value.quota == "max_tokens"
    counters = k.table.get(ALICE, pid).counters
    assert counters.tokens_in == 0 and counters.tokens_out == 0
    assert k.model.streams[0].cancelled and k.table.running(pid) == 0


def test_a_slow_reader_gets_the_pieces_joined_the_first_one_at_once(kernel):
    async def scenario(k: Kernel, pid: int):
        pieces = []
        async for item in k.runner.ask(ALICE, AskQuery(pid=pid, prompt="Go.",
                                                        max_new_tokens=20)):
            pieces.append(item)
            if len(pieces) == 1:
                await until(lambda: k.model.produced == 20)  # the reader falls behind
        return pieces
    k = kernel()
    pid = k.spawn()
    pieces = asyncio.run(scenario(k, pid))
    assert pieces[0] == "<0>"
    text, done = answer(pieces)
    assert text == tokens(0, 20) and len(pieces) == 3  # <0>, then the other 19 in one
    assert done.usage.tokens_out == 20


async def _timed_pieces(k: Kernel, pid: int, tokens: int) -> list[tuple[float, object]]:
    loop = asyncio.get_running_loop()
    return [(loop.time(), item) async for item in k.runner.ask(
        ALICE, AskQuery(pid=pid, prompt="Go.", max_new_tokens=tokens))]


def test_the_stream_interval_joins_fast_text_the_first_piece_at_once(kernel):
    k = kernel(stream_interval_s=0.04, piece_delay_s=0.002)
    timed = asyncio.run(_timed_pieces(k, k.spawn(), 100))
    pieces = [item for _, item in timed]
    text, done = answer(pieces)
    assert text == tokens(0, 100) and done.usage.tokens_out == 100
    assert pieces[0] == "<0>"  # the first token is not held back
    texts = timed[:-1]
    gaps = [b[0] - a[0] for a, b in zip(texts, texts[1:])]
    assert 3 <= len(texts) < 40  # streamed in several messages, far fewer than 100 pieces
    assert min(gaps) >= 0.035    # no two messages closer than the interval (timer slack)


def test_without_a_stream_interval_each_piece_goes_as_it_comes(kernel):
    k = kernel(piece_delay_s=0.002)
    pieces = [item for _, item in asyncio.run(_timed_pieces(k, k.spawn(), 30))]
    assert answer(pieces)[0] == tokens(0, 30) and len(pieces) == 31


def test_a_caller_that_goes_away_stops_the_generation_and_is_accounted(kernel):
    async def scenario(k: Kernel, pid: int):
        stream = k.runner.ask(ALICE, AskQuery(pid=pid, prompt="Go.", max_new_tokens=400))
        await stream.__anext__()
        await stream.aclose()
    k = kernel()
    pid = k.spawn()
    asyncio.run(scenario(k, pid))
    assert k.model.streams[0].cancelled and k.table.running(pid) == 0
    record = k.table.get(ALICE, pid)
    assert record.counters.asks == 1 and 1 <= record.counters.tokens_out < 400
    assert record.state.name == "READY"


def test_the_model_list_sets_the_default_model_and_capacity(kernel):
    k = kernel(max_batch=3)
    asyncio.run(k.ask(k.spawn(), 1))
    assert k.dispatcher.default_model == "fake"
    assert k.dispatcher.pool("fake").capacity == 3
