"""What stops an Ask's generation: one enum with its table of legal transitions, and the latch an ask holds.

Interruptions come from others at any time (the process table on kill, suspend and resume;
the dispatcher when the planner preempts the ask), so an event that makes no sense in the
current state is moot and ignored rather than an error: a preemption of an ask that is
already suspended changes nothing, and nothing follows a kill.
"""

from __future__ import annotations

import asyncio
import enum

from kernel.ports import GenerateStream


class Interruption(enum.Enum):
    """Values are the words the process table's listeners hear (see ProcessTable.Listener)."""

    NONE = ""               # generating, or waiting for a slot
    PREEMPTED = "preempted"  # the planner gave the slot away: queue again, then continue
    SUSPENDED = "suspended"  # the process is suspended: hold the answer until it is resumed
    RESUMED = "resumed"      # the suspension is over: queue again, then continue
    KILLED = "killed"        # the answer ends here


I = Interruption
TRANSITIONS: dict[Interruption, frozenset[Interruption]] = {
    I.NONE: frozenset({I.PREEMPTED, I.SUSPENDED, I.KILLED}),
    # -> NONE: the ask settled it (re-queued); a suspend or kill may still come first.
    I.PREEMPTED: frozenset({I.NONE, I.SUSPENDED, I.KILLED}),
    I.SUSPENDED: frozenset({I.RESUMED, I.KILLED}),
    # A resumed ask may be granted a slot before it settles, so it can be preempted too.
    I.RESUMED: frozenset({I.NONE, I.PREEMPTED, I.SUSPENDED, I.KILLED}),
    I.KILLED: frozenset(),
}
# These stop the generation that is running, if any.
STOPPING = frozenset({I.PREEMPTED, I.SUSPENDED, I.KILLED})


class Interrupt:
    """One ask's interruption state; firing a stopping one cancels the attached stream."""

    def __init__(self) -> None:
        self.state = Interruption.NONE
        self.changed = asyncio.Event()
        self._stream: GenerateStream | None = None

    def fire(self, target: Interruption | str) -> bool:
        """Move to `target` if the table allows it; False when the event is moot."""
        target = Interruption(target)
        if target not in TRANSITIONS[self.state]:
            return False
        self.state = target
        self.changed.set()
        if target in STOPPING and self._stream is not None:
            self._stream.cancel()  # the model service frees the slot within one decode step
        return True

    def settle(self) -> None:
        """The ask has acted on a preemption or a resume: it goes on as if uninterrupted."""
        if self.state in (Interruption.PREEMPTED, Interruption.RESUMED):
            self.fire(Interruption.NONE)

    def attach(self, stream: GenerateStream | None) -> None:
        """The generation a stopping interruption must cancel (None when it is over). One
        that came between the slot's grant and now cancels it at once."""
        self._stream = stream
        if stream is not None and self.state in STOPPING:
            stream.cancel()

    @property
    def stops_waiting(self) -> bool:
        """Whether an ask waiting for a slot should leave the queue."""
        return self.state in (Interruption.KILLED, Interruption.SUSPENDED)
