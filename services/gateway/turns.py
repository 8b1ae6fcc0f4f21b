"""Which turns of a resent conversation a process already remembers, and remembering the rest.

OpenAI clients send the whole conversation on every call. The kernel remembers each Ask's
question and answer itself, so on the next call those turns are already in the process's
memory; only turns it never saw (history written by the app, or a conversation begun
elsewhere) are remembered, in order, before the question is asked. What is known is kept
per process as digests of (speaker, text); a turn not among them is looked up in the
process's memory by Recall (after a gateway restart, say), and remembered when absent."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Protocol

from libvfm.types import MemoryEntry, RecallHit
from services.gateway.api import Turn
from vfmos_runtime.errors import Unavailable

log = logging.getLogger("vfm-gatewayd.turns")
MAX_PROCESSES = 4096       # processes whose turns are kept in mind
MAX_TURNS = 1024           # digests per process (the oldest are forgotten first)
RECALL_K = 5


class Memory(Protocol):
    """What the turn book needs of a kernel client (libvfm.AsyncClient has it)."""

    async def recall(self, pid: int, query: str, k: int = 10) -> list[RecallHit]: ...

    async def remember(self, pid: int, entries: list[MemoryEntry]) -> tuple[int, int]: ...


def digest(speaker: str, text: str) -> bytes:
    return hashlib.blake2b(f"{speaker}\0{text.strip()}".encode(), digest_size=16).digest()


class TurnBook:
    """Digests of the turns each process remembers, as far as this gateway knows."""

    def __init__(self, max_processes: int = MAX_PROCESSES, max_turns: int = MAX_TURNS):
        self._known: OrderedDict[int, OrderedDict[bytes, None]] = OrderedDict()
        self._max_processes, self._max_turns = max_processes, max_turns

    def knows(self, pid: int, turn: Turn) -> bool:
        return digest(turn.speaker, turn.text) in self._known.get(pid, ())

    def learn(self, pid: int, turns: list[Turn]) -> None:
        known = self._known.setdefault(pid, OrderedDict())
        self._known.move_to_end(pid)
        for turn in turns:
            known[digest(turn.speaker, turn.text)] = None
            known.move_to_end(digest(turn.speaker, turn.text))
        while len(known) > self._max_turns:
            known.popitem(last=False)
        while len(self._known) > self._max_processes:
            self._known.popitem(last=False)

    def forget(self, pid: int) -> None:
        self._known.pop(pid, None)

    async def sync(self, memory: Memory, pid: int, history: list[Turn]) -> int:
        """Remember the turns of `history` the process does not hold yet; returns how many.
        Without vfm-datad nothing can be checked or remembered: the Ask then says so itself."""
        missing = []
        try:
            for turn in history:
                if self.knows(pid, turn):
                    continue
                if await self._in_memory(memory, pid, turn):
                    self.learn(pid, [turn])
                else:
                    missing.append(turn)
            if missing:
                await memory.remember(pid, [MemoryEntry(text=t.text, speaker=t.speaker)
                                            for t in missing])
        except Unavailable as err:
            log.warning("cannot bring process %d's memory up to date: %s", pid, err.message)
            return 0
        self.learn(pid, missing)
        return len(missing)

    @staticmethod
    async def _in_memory(memory: Memory, pid: int, turn: Turn) -> bool:
        hits = await memory.recall(pid, turn.text[:4096], k=RECALL_K)
        text = turn.text.strip()
        return any(h.entry.speaker == turn.speaker and h.entry.text.strip() == text
                   for h in hits)
