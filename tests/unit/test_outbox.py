"""The exchange outbox on a real kernel store (temp-dir LMDB) with an in-memory data service
that can be away, lose its replies, or refuse: every exchange lands exactly once per id, in
each process's order, after outages and after a restart of the kernel itself."""

from __future__ import annotations

import asyncio

import pytest

from kernel.outbox import ExchangeOutbox, OutboxStore
from kernel.ports import MemoryEntry
from kernel.store import KernelStore
from vfmos_runtime.errors import InvalidArgument, Unavailable


class Data:
    """A data service that dedupes on the exchange id, as vfm-datad does. `away`: every call
    is UNAVAILABLE; `lose_replies`: the next N calls append, then fail as if the service died
    before it could answer; `refuse`: texts it answers INVALID_ARGUMENT to."""

    def __init__(self, away: bool = False):
        self.away = away
        self.lose_replies = 0
        self.refuse: set[str] = set()
        self.calls: list[tuple[int, str]] = []      # (pid, exchange id) of every attempt
        self.memory: dict[int, list[str]] = {}     # pid -> texts, in the order appended
        self.seen: set[str] = set()

    async def remember(self, tenant, pid, entries, exchange_id=""):
        self.calls.append((pid, exchange_id))
        await asyncio.sleep(0)
        if self.away:
            raise Unavailable("service vfm-datad is down")
        if entries[0].text in self.refuse:
            raise InvalidArgument("an entry is longer than 65536 characters")
        if exchange_id not in self.seen:
            self.seen.add(exchange_id)
            self.memory.setdefault(pid, []).extend(e.text for e in entries)
        if self.lose_replies:
            self.lose_replies -= 1
            raise Unavailable("connection reset")


def entries(text: str) -> list[MemoryEntry]:
    return [MemoryEntry("user", text, 1.0), MemoryEntry("assistant", f"re: {text}", 1.0)]


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def waiting(path) -> int:
    store = KernelStore(path)
    try:
        return len(OutboxStore(store).load())
    finally:
        store.close()


def test_delivered_at_once_and_gone_from_the_store(tmp_path):
    store = KernelStore(tmp_path)
    data = Data()
    outbox = ExchangeOutbox(OutboxStore(store), data)

    async def scenario():
        await asyncio.wrap_future(outbox.add("alice", 1, entries("hello")))
        await until(lambda: outbox.pending == 0)
    asyncio.run(scenario())
    store.close()
    assert data.memory == {1: ["hello", "re: hello"]}
    assert waiting(tmp_path) == 0


def test_an_outage_keeps_exchanges_in_order_until_the_service_is_back(tmp_path):
    store = KernelStore(tmp_path)
    data = Data(away=True)
    outbox = ExchangeOutbox(OutboxStore(store), data)

    async def scenario():
        for pid, text in ((1, "a1"), (2, "b1"), (1, "a2"), (1, "a3"), (2, "b2")):
            await asyncio.wrap_future(outbox.add("alice", pid, entries(text)))
        await until(lambda: len(data.calls) >= 4)  # tried, and tried again
        assert outbox.pending == 5 and not data.memory
        data.away = False
        await until(lambda: outbox.pending == 0)
    asyncio.run(scenario())
    store.close()
    assert data.memory[1] == ["a1", "re: a1", "a2", "re: a2", "a3", "re: a3"]
    assert data.memory[2] == ["b1", "re: b1", "b2", "re: b2"]
    assert waiting(tmp_path) == 0


def test_a_lost_reply_means_a_second_delivery_of_the_same_id(tmp_path):
    store = KernelStore(tmp_path)
    data = Data()
    data.lose_replies = 1
    outbox = ExchangeOutbox(OutboxStore(store), data)

    async def scenario():
        await asyncio.wrap_future(outbox.add("alice", 7, entries("once")))
        await until(lambda: outbox.pending == 0)
    asyncio.run(scenario())
    store.close()
    assert len(data.calls) == 2 and data.calls[0] == data.calls[1]  # the same exchange id
    assert data.memory == {7: ["once", "re: once"]}


def test_what_waited_is_delivered_after_a_kernel_restart(tmp_path):
    store = KernelStore(tmp_path)
    away = Data(away=True)
    outbox = ExchangeOutbox(OutboxStore(store), away)

    async def before_the_restart():
        await asyncio.wrap_future(outbox.add("alice", 3, entries("kept")))
        await until(lambda: away.calls)
    asyncio.run(before_the_restart())
    store.close()

    store = KernelStore(tmp_path)
    back = Data()
    outbox = ExchangeOutbox(OutboxStore(store), back)
    assert outbox.pending == 1

    async def after_the_restart():
        outbox.kick()
        await until(lambda: outbox.pending == 0)
    asyncio.run(after_the_restart())
    store.close()
    assert back.memory == {3: ["kept", "re: kept"]}
    assert back.calls[0][1] == away.calls[0][1]  # vfm-datad can tell it is the same exchange
    assert waiting(tmp_path) == 0


def test_a_refused_exchange_is_dropped_and_the_rest_go_on(tmp_path):
    store = KernelStore(tmp_path)
    data = Data()
    data.refuse.add("too long")
    outbox = ExchangeOutbox(OutboxStore(store), data)

    async def scenario():
        await asyncio.wrap_future(outbox.add("alice", 1, entries("too long")))
        await asyncio.wrap_future(outbox.add("alice", 1, entries("fine")))
        await until(lambda: outbox.pending == 0)
    asyncio.run(scenario())
    store.close()
    assert data.memory == {1: ["fine", "re: fine"]}
    assert len(data.calls) == 2  # refused once, not retried
    assert waiting(tmp_path) == 0


def test_a_full_outbox_refuses_and_says_why(tmp_path):
    store = KernelStore(tmp_path)
    outbox = ExchangeOutbox(OutboxStore(store), Data(away=True), max_bytes=400)

    async def scenario():
        await asyncio.wrap_future(outbox.add("alice", 1, entries("x" * 50)))
        with pytest.raises(Unavailable, match="outbox already holds 1 exchanges"):
            await asyncio.wrap_future(outbox.add("alice", 1, entries("y" * 400)))
    try:
        asyncio.run(scenario())
    finally:
        store.close()
