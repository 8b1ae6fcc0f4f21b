"""The kernel's side of GenerateMany (kernel/model_mux.py) against the bench's fake model
service on a real socket: every generation gets its own chunks in order, a cancel ends one
and spares the others, a deadline ends a slow one, and a service that goes away fails every
running generation with UNAVAILABLE while a new stream works once it is back."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bench.fake_modeld import VOCAB, FakeModel
from kernel.model_mux import ModelMux, MuxStream
from vfmos_runtime.errors import DeadlineExceeded, Unavailable, from_rpc_error
from vfmos_runtime.server import ServerConfig, create_server
from vfmos.model.v1 import model_pb2, model_pb2_grpc


async def _serve(sock, token_delay_s: float = 0.0):
    server, _, _ = create_server(
        ServerConfig(unix_socket=sock),
        lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(
            FakeModel(64, token_delay_s), s), ["vfmos.model.v1.ModelService"])
    await server.start()
    return server


def _mux(channel) -> ModelMux:
    def error(exc):
        err = from_rpc_error(exc)
        return Unavailable(f"gone: {err.message}") if err.code == grpc.StatusCode.UNAVAILABLE \
            else err
    return ModelMux(channel, (), error=error, failure=lambda err: err)


def _request(tokens: int) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(
        messages=[model_pb2.ChatMessage(role=model_pb2.ROLE_USER, content="tell me a story")],
        max_new_tokens=tokens)


async def _collect(stream: MuxStream, cancel_after: int = 0):
    pieces = []
    async for piece in stream:
        pieces.append(piece)
        if cancel_after and len(pieces) == cancel_after:
            stream.cancel()
    return pieces


def _expected_text(tokens: int) -> str:
    return "".join(VOCAB[i % len(VOCAB)] for i in range(tokens))


def test_generations_share_one_stream_each_with_its_own_chunks(tmp_path):
    async def scenario():
        server = await _serve(tmp_path / "m.sock")
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'm.sock'}") as channel:
                mux = _mux(channel)
                sizes = (5, 40, 17, 1)
                streams = [MuxStream(lambda: mux, _request(n), 30.0) for n in sizes]
                cut = MuxStream(lambda: mux, _request(500), 30.0)
                results = await asyncio.gather(*(_collect(s) for s in streams),
                                               _collect(cut, cancel_after=3))
                # the stream still serves after a cancel
                after = await _collect(MuxStream(lambda: mux, _request(3), 30.0))
                mux.retire()
                return sizes, results, after, mux.running
        finally:
            await server.stop(0)

    sizes, results, after, running = asyncio.run(scenario())
    for n, pieces in zip(sizes, results):
        assert pieces[-1].done and pieces[-1].finish_reason == "length"
        assert sum(p.tokens for p in pieces) == n
        assert "".join(p.text for p in pieces) == _expected_text(n)
        assert [i for p in pieces for i in p.token_ids] == [
            100 + i % len(VOCAB) for i in range(n)]
    cut = results[-1]
    assert len(cut) == 3 and not any(p.done for p in cut)
    assert "".join(p.text for p in after) == _expected_text(3)
    assert running == 0


def test_a_generation_past_its_deadline_ends_with_deadline_exceeded(tmp_path):
    async def scenario():
        server = await _serve(tmp_path / "m.sock", token_delay_s=0.05)
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'm.sock'}") as channel:
                mux = _mux(channel)
                slow = MuxStream(lambda: mux, _request(200), 0.3)
                quick = MuxStream(lambda: mux, _request(3), 30.0)
                got = await asyncio.gather(_collect(slow), _collect(quick),
                                           return_exceptions=True)
                return got, mux.running
        finally:
            await server.stop(0)

    (slow, quick), running = asyncio.run(scenario())
    assert isinstance(slow, DeadlineExceeded) and "took more than" in slow.message
    assert quick[-1].done and sum(p.tokens for p in quick) == 3
    assert running == 0


def test_service_gone_fails_every_running_generation_then_a_new_stream_works(tmp_path):
    sock = tmp_path / "m.sock"

    async def scenario():
        server = await _serve(sock, token_delay_s=0.02)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            mux = _mux(channel)
            streams = [MuxStream(lambda: mux, _request(1000), 60.0) for _ in range(3)]
            tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
            await asyncio.sleep(0.3)
            await server.stop(0)
            failed = await asyncio.gather(*tasks, return_exceptions=True)
            late = MuxStream(lambda: mux, _request(2), 5.0)  # on the broken stream
            late_error = await asyncio.gather(_collect(late), return_exceptions=True)
            server = await _serve(sock)
            try:
                fresh = _mux(channel)
                again = await _collect(MuxStream(lambda: fresh, _request(4), 30.0))
            finally:
                await server.stop(0)
            return failed, late_error[0], mux.broken, again

    failed, late_error, broken, again = asyncio.run(scenario())
    assert all(isinstance(f, Unavailable) for f in failed), failed
    assert isinstance(late_error, Unavailable)
    assert isinstance(broken, Unavailable)
    assert sum(p.tokens for p in again) == 4 and again[-1].done


def test_cancel_before_the_first_read_never_starts_it(tmp_path):
    async def scenario():
        server = await _serve(tmp_path / "m.sock")
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'm.sock'}") as channel:
                opened = []
                stream = MuxStream(lambda: opened.append(1) or _mux(channel), _request(5), 5.0)
                stream.cancel()
                return await _collect(stream), opened
        finally:
            await server.stop(0)

    pieces, opened = asyncio.run(scenario())
    assert pieces == [] and opened == []


@pytest.mark.parametrize("number,kind", [(5, "NotFound"), (3, "InvalidArgument"),
                                          (14, "Unavailable"), (99, "Internal")])
def test_error_codes_sent_as_numbers_map_to_their_errors(number, kind):
    from vfmos_runtime.errors import error_for_code
    err = error_for_code(number, "why")
    assert type(err).__name__ == kind and err.message == "why"


class _Counting(model_pb2_grpc.ModelServiceServicer):
    """GenerateMany over vfm-modeld's own ManyStreams, each generation `max_new_tokens`
    chunks 10 ms apart (no model)."""

    def __init__(self):
        from services.model.mux import ManyStreams
        self.many = ManyStreams()

    async def _responses(self, request):
        for i in range(request.max_new_tokens):
            await asyncio.sleep(0.01)
            yield model_pb2.GenerateResponse(text=f"<{i}>", tokens=1)
        yield model_pb2.GenerateResponse(done=True, completion_tokens=request.max_new_tokens)

    async def GenerateMany(self, requests, context):
        import logging
        async for response in self.many.serve(requests, self._responses,
                                              logging.getLogger("test")):
            yield response


def test_a_stopping_service_ends_its_streams_once_idle_not_after_the_grace(tmp_path):
    """The kernel keeps its stream open; on drain the service finishes what runs, refuses
    new generations with UNAVAILABLE, and ends the stream, so stopping takes no grace."""
    sock = tmp_path / "m.sock"

    async def scenario():
        servicer = _Counting()
        server, _, _ = create_server(
            ServerConfig(unix_socket=sock),
            lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, s),
            ["vfmos.model.v1.ModelService"])
        await server.start()
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            mux = _mux(channel)
            idle = await _collect(MuxStream(lambda: mux, _request(2), 5.0))
            running = asyncio.ensure_future(_collect(MuxStream(lambda: mux, _request(30), 5.0)))
            await asyncio.sleep(0.05)
            servicer.many.drain()
            late = await asyncio.gather(_collect(MuxStream(lambda: mux, _request(3), 5.0)),
                                        return_exceptions=True)
            finished = await running
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.stop(3.0)
            return idle, late[0], finished, loop.time() - started, mux.broken

    idle, late, finished, stop_s, broken = asyncio.run(scenario())
    assert sum(p.tokens for p in idle) == 2
    assert isinstance(late, Unavailable) and "stopping" in late.message
    assert sum(p.tokens for p in finished) == 30 and finished[-1].done  # not cut
    assert stop_s < 1.0  # the stream was over: no grace period waited out
    assert isinstance(broken, Unavailable)  # the next generation opens a new stream
