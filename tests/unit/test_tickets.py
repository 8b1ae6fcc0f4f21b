"""Session tickets: bounded per uid (one user's handshake flood logs no one else out), and
idle ones expire."""

from __future__ import annotations

from kernel.identity import TicketBook


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_from_one_uid_does_not_evict_another_uids_ticket():
    book = TicketBook(frozenset({0}))
    root_ticket, _ = book.issue(0)
    for _ in range(66_000):  # what one local user managed in 9 s on the credentials socket
        book.issue(1000)
    caller = book.lookup(root_ticket)
    assert caller is not None and caller.uid == 0 and caller.admin
    assert len(book) <= 1 + 1024  # root's, and the flooder's own bounded share


def test_a_uid_over_its_share_loses_its_own_least_recently_used_ticket():
    book = TicketBook(frozenset(), per_uid=3)
    kept, _ = book.issue(1000)
    first_idle, _ = book.issue(1000)
    book.issue(1000)
    assert book.lookup(kept) is not None  # used: now the most recent of the three
    book.issue(1000)
    assert book.lookup(first_idle) is None
    assert book.lookup(kept) is not None
    assert len(book) == 3


def test_an_idle_ticket_expires_and_a_used_one_does_not():
    clock = Clock()
    book = TicketBook(frozenset(), idle_s=60, clock=clock)
    busy, _ = book.issue(1000)
    idle, _ = book.issue(1001)
    for _ in range(3):
        clock.now += 40
        assert book.lookup(busy) is not None
    assert book.lookup(idle) is None
    assert book.lookup(busy).uid == 1000


def test_expired_tickets_are_freed_without_being_looked_up():
    clock = Clock()
    book = TicketBook(frozenset(), idle_s=60, clock=clock)
    for uid in range(100, 200):
        book.issue(uid)
    clock.now += 61
    book.issue(5)
    assert len(book) == 1
