"""The server side of `GenerateMany`: many generations over one stream.

Each generation runs as its own task and puts its chunks in one outbox; the stream sends
everything the outbox holds as one message whenever it can. A batched engine's step ends
with one chunk for each of its rows, so a step reaches the kernel as one message instead
of one per row; when the kernel is behind, a generation's waiting chunks are joined (as
`merge_queued` does for Generate). A generation's error ends only that generation.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import AsyncIterator, Callable

import grpc

from vfmos_runtime.errors import InvalidArgument, VfmError, short_message
from vfmos.model.v1 import model_pb2 as pb

Responses = Callable[[pb.GenerateRequest], AsyncIterator[pb.GenerateResponse]]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def join(earlier: pb.GenerateResponse, later: pb.GenerateResponse) -> None:
    """Add `later` to `earlier` in place (neither is a generation's last chunk)."""
    earlier.text += later.text
    earlier.tokens += later.tokens
    earlier.token_ids.extend(later.token_ids)
    if not earlier.prompt_tokens:
        earlier.prompt_tokens = later.prompt_tokens
    if earlier.HasField("logprob") and later.HasField("logprob"):
        earlier.logprob += later.logprob
    else:
        earlier.ClearField("logprob")  # unknown for part of it: unknown for the whole


class Outbox:
    """What the running generations produced and the stream has not sent yet."""

    def __init__(self):
        self._waiting: dict[int, list[pb.GenerateManyChunk]] = {}  # by generation, in order
        self.ready = asyncio.Event()

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def put(self, gid: int, chunk: pb.GenerateResponse) -> None:
        waiting = self._waiting.get(gid)
        if waiting is None:
            self._waiting[gid] = [pb.GenerateManyChunk(id=gid, chunk=chunk)]
        else:
            last = waiting[-1]
            if not last.error_code and not last.chunk.done and not chunk.done:
                join(last.chunk, chunk)
            else:
                waiting.append(pb.GenerateManyChunk(id=gid, chunk=chunk))
        self.ready.set()

    def fail(self, gid: int, code: int, message: str) -> None:
        self._waiting.setdefault(gid, []).append(
            pb.GenerateManyChunk(id=gid, error_code=code, error_message=message))
        self.ready.set()

    def drop(self, gid: int) -> None:
        self._waiting.pop(gid, None)

    def take(self) -> pb.GenerateManyResponse:
        chunks = [c for waiting in self._waiting.values() for c in waiting]
        self._waiting.clear()
        return pb.GenerateManyResponse(chunks=chunks)


class ManyStreams:
    """The GenerateMany streams a daemon serves. The kernel keeps one open for as long as
    both run, so when the daemon stops (`drain`), each stream ends as soon as none of its
    generations runs: stopping does not wait out the server's grace period for it."""

    def __init__(self):
        self._outboxes: set[Outbox] = set()
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        for outbox in self._outboxes:
            outbox.ready.set()

    async def serve(self, requests: AsyncIterator[pb.GenerateManyRequest],
                    responses: Responses,
                    log: logging.Logger) -> AsyncIterator[pb.GenerateManyResponse]:
        """Run one stream: start and cancel generations as `requests` say, yield what they
        produce. Ends when the caller has closed its side (or the daemon stops) and no
        generation runs; a bad request (zero or reused id) ends it with INVALID_ARGUMENT."""
        outbox = Outbox()
        running: dict[int, asyncio.Task] = {}

        async def run(gid: int, request: pb.GenerateRequest) -> None:
            try:
                async for chunk in responses(request):
                    outbox.put(gid, chunk)
            except VfmError as exc:
                outbox.fail(gid, exc.code.value[0], short_message(exc.message))
            except asyncio.CancelledError:
                pass  # cancelled by the caller: nothing more is sent for it
            except Exception as exc:  # noqa: BLE001 - one generation's bug ends only it
                incident = secrets.token_hex(4)
                log.error("Generate failed (error id %s)", incident, exc_info=exc)
                outbox.fail(gid, _INTERNAL, f"internal error in Generate (error id {incident}; "
                                            "see the daemon's log)")
            finally:
                if running.get(gid) is asyncio.current_task():
                    del running[gid]
                outbox.ready.set()

        async def read() -> None:
            async for message in requests:
                gid = message.id
                action = message.WhichOneof("action")
                if action == "start":
                    if not gid or gid in running:
                        raise InvalidArgument(f"generation id {gid} is zero or already running")
                    if self.draining:
                        outbox.fail(gid, _UNAVAILABLE, "vfm-modeld is stopping")
                        continue
                    running[gid] = asyncio.create_task(run(gid, message.start))
                elif action == "cancel":
                    task = running.pop(gid, None)
                    if task is not None:
                        task.cancel()
                    outbox.drop(gid)

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: outbox.ready.set())
        self._outboxes.add(outbox)
        try:
            while True:
                outbox.ready.clear()  # every reason to wake is looked at below, before waiting
                if outbox:
                    yield outbox.take()
                    continue
                if reader.done() and (not running or reader.exception() is not None):
                    reader.result()  # the caller's bad request, if that is what ended it
                    return
                if self.draining and not running:
                    return
                await outbox.ready.wait()
        finally:
            self._outboxes.discard(outbox)
            reader.cancel()
            for task in list(running.values()):
                task.cancel()
