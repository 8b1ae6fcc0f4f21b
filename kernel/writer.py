"""The kernel store's one writer: a thread that commits queued writes in groups, one fsync each."""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import lmdb

log = logging.getLogger("vfmd.store")

Write = Callable[[lmdb.Transaction], Any]  # applies one change inside the writer's transaction


class WriterClosed(RuntimeError):
    """A write was submitted after the store was closed."""


class GroupCommitWriter:
    """Applies writes on its own thread, in the order they were submitted.

    Writes that queue up while a commit is in flight go out together in the next one: one
    transaction and one fsync however many callers wait, and the event loop that submitted
    them never waits on the disk. Each write gets a Future that settles once its transaction
    is durable (or with the write's error). A failing write (the map is full, a bug) fails
    alone: its group is retried one write per transaction, and the thread lives on.
    """

    def __init__(self, env: lmdb.Environment, before_commit: Callable[[], None] | None = None):
        self._env = env
        self._before_commit = before_commit  # runs on the writer thread (tests: a slow disk)
        self._queue: deque[tuple[Write, Future]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._after_commit: list[Callable[[bool], None]] = []
        self.transactions = 0  # committed so far
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Write) -> Future:
        """Queue `write`; the Future holds what it returned once its transaction is durable."""
        future: Future = Future()
        # Running from the start, so cancelling an awaiter never drops a change that memory
        # already shows: a queued write is applied whatever becomes of whoever waits on it.
        future.set_running_or_notify_cancel()
        with self._wake:
            if self._closing:
                raise WriterClosed("the kernel store is closed")
            self._queue.append((write, future))
            self._wake.notify()
        return future

    def after_each_transaction(self, hook: Callable[[bool], None]) -> None:
        """Run `hook(committed)` on the writer thread after each transaction, before its
        Futures are settled (so whoever awaits a write sees the hook's work done): work a
        group needs once, not once per write (the audit head file: one fsync per group).
        `committed` False: the transaction was rolled back."""
        self._after_commit.append(hook)

    def close(self) -> None:
        """Commit everything queued so far, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return  # closing, and drained
                group = list(self._queue)
                self._queue.clear()
            self._commit(group)

    def _commit(self, group: list[tuple[Write, Future]]) -> None:
        try:
            results = self._transaction([write for write, _ in group])
        except Exception as exc:
            if len(group) > 1:  # find the culprit: the others must still land
                for item in group:
                    self._commit([item])
                return
            log.error("a kernel store write failed: %s", exc, exc_info=exc)
            group[0][1].set_exception(exc)
            return
        log.debug("committed %d writes in one transaction", len(group))
        for (_, future), result in zip(group, results):
            future.set_result(result)

    def _transaction(self, writes: list[Write]) -> list:
        try:
            with self._env.begin(write=True) as txn:
                results = [write(txn) for write in writes]
                if self._before_commit is not None:
                    self._before_commit()
        except BaseException:
            self._hooks(False)
            raise
        self.transactions += 1
        self._hooks(True)
        return results

    def _hooks(self, committed: bool) -> None:
        for hook in self._after_commit:
            try:
                hook(committed)
            except Exception as exc:  # the writer must outlive a hook's bug
                log.error("an after-commit hook failed: %s", exc, exc_info=exc)
