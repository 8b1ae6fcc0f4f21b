"""Every generation the kernel runs, over one `GenerateMany` stream to vfm-modeld.

A stream per generation costs the kernel one gRPC read per token; a batched engine's step
makes a token for each of its rows at once, and over one shared stream that step is one
read. `ModelMux` owns the stream: it writes starts and cancels, reads each message and
hands every chunk to its generation's `MuxStream`, which the Ask path reads like the
stream of one Generate call (the `GenerateStream` port).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Callable

import grpc

from kernel.ports import GenPiece
from vfmos_runtime.convert import enum_str
from vfmos_runtime.errors import DeadlineExceeded, Unavailable, VfmError, error_for_code
from vfmos_runtime.protocol import MODEL_SERVICE
from vfmos.model.v1 import model_pb2, model_pb2_grpc


FINISH_REASONS = model_pb2.FinishReason


class MuxStream:
    """One generation: its chunks as GenPieces, in order; `cancel()` ends it within one step
    (the model service frees its row) and the iteration just stops."""

    __slots__ = ("request", "timeout_s", "id", "_opener", "_mux", "_chunks", "_waiter",
                 "_error", "_over", "_timer")

    def __init__(self, opener: Callable[[], "ModelMux"], request: model_pb2.GenerateRequest,
                 timeout_s: float):
        self.request = request
        self.timeout_s = timeout_s
        self.id = 0
        self._opener = opener
        self._mux: ModelMux | None = None
        self._chunks: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._error: VfmError | None = None
        self._over = False  # cancelled, failed or done: nothing more will come
        self._timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self._over:
            return
        self._end()
        if self._mux is not None:
            self._mux.cancel(self)

    # the mux's side
    def push(self, chunk: model_pb2.GenerateResponse) -> None:
        self._chunks.append(chunk)
        if chunk.done:
            self._end()  # wakes the reader too
        else:
            self._wake()

    def fail(self, error: VfmError) -> None:
        if not self._over:
            self._error = error
            self._end()

    def _end(self) -> None:
        self._over = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        if not self._over:
            self.fail(DeadlineExceeded(f"service {MODEL_SERVICE} took more than "
                                       f"{self.timeout_s:.0f} s for one generation"))
            if self._mux is not None:
                self._mux.cancel(self)

    # the reader's side
    def __aiter__(self) -> "MuxStream":
        return self

    async def __anext__(self) -> GenPiece:
        if self._mux is None:
            if self._over:
                raise StopAsyncIteration  # cancelled before it started
            self._mux = self._opener()
            self._mux.start(self)
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire)
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._over:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = chunks.popleft()
        done = chunk.done  # only the last piece has a finish reason: no enum lookup per token
        return GenPiece(chunk.text, chunk.tokens, chunk.token_ids, chunk.prompt_tokens, done,
                        enum_str(FINISH_REASONS, chunk.finish_reason) if done else "",
                        chunk.logprob if chunk.HasField("logprob") else None,
                        chunk.tool_calls_json if done else "")


class ModelMux:
    """One GenerateMany call and the generations running on it."""

    def __init__(self, channel: grpc.aio.Channel, metadata,
                 error: Callable[[grpc.RpcError], VfmError],
                 failure: Callable[[VfmError], VfmError]):
        self.channel, self.metadata = channel, metadata
        self._error = error        # the stream's own failure, in the caller's words
        self._failure = failure    # one generation's error, in the caller's words
        self._streams: dict[int, MuxStream] = {}
        self._next_id = 0
        self._outgoing: collections.deque = collections.deque()
        self._writing = False
        self.broken: VfmError | None = None
        self.retired = False
        self._call = model_pb2_grpc.ModelServiceStub(channel).GenerateMany(metadata=metadata)
        self._reader = asyncio.ensure_future(self._read())

    @property
    def running(self) -> int:
        return len(self._streams)

    def start(self, stream: MuxStream) -> None:
        if self.broken is not None:
            stream.fail(self.broken)
            return
        self._next_id += 1
        stream.id = self._next_id
        self._streams[stream.id] = stream
        self._send(model_pb2.GenerateManyRequest(id=stream.id, start=stream.request))

    def cancel(self, stream: MuxStream) -> None:
        if self._streams.pop(stream.id, None) is not None and self.broken is None:
            self._send(model_pb2.GenerateManyRequest(id=stream.id, cancel=True))
        self._maybe_close()

    def retire(self) -> None:
        """No new generations: close the call once the running ones are over."""
        self.retired = True
        self._maybe_close()

    def close(self) -> None:
        self._call.cancel()

    def _maybe_close(self) -> None:
        if self.retired and not self._streams:
            self.close()

    def _send(self, message: model_pb2.GenerateManyRequest) -> None:
        self._outgoing.append(message)
        if not self._writing:
            self._writing = True
            asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        try:
            while self._outgoing and self.broken is None:
                await self._call.write(self._outgoing.popleft())
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call is over: the reader says why to every generation
        finally:
            self._writing = False

    async def _read(self) -> None:
        error: VfmError | None = None
        streams = self._streams
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                for c in message.chunks:
                    stream = streams.get(c.id)
                    if stream is None:
                        continue  # cancelled: its last chunks were already on the way
                    if c.error_code:
                        del streams[c.id]
                        stream.fail(self._failure(error_for_code(c.error_code, c.error_message)))
                        continue
                    chunk = c.chunk
                    if chunk.done:
                        del streams[c.id]
                    stream.push(chunk)
                if self.retired and not streams:
                    break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                error = self._error(exc)
        except asyncio.CancelledError:
            error = Unavailable("the kernel is stopping")
        finally:
            if error is None:
                # The service ended the stream (it is stopping): what is running is cut.
                error = Unavailable(f"service {MODEL_SERVICE} ended the generation stream")
                if streams:
                    error = self._failure(Unavailable("it ended the generation stream"))
            self.broken = error
            for stream in list(streams.values()):
                stream.fail(error)
            streams.clear()
            self._call.cancel()
