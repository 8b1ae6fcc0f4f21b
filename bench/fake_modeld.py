"""A fake-fast model service for `bench kernel_load`: a real `vfmos.model.v1.Model` gRPC server
with no model behind it, registered with a kernel as `vfm-modeld`.

What it sends, kept as honest as the real vfm-modeld's wire traffic: one `GenerateResponse` per
token (tokens=1, a short word of text, its token id, and `prompt_tokens` on every chunk, as
`services/model/batch.py` emits them), then one final chunk (done, finish_reason "length",
completion_tokens, model). Every answer runs to `max_new_tokens`. No sleeping, no joining of
tokens: it streams as fast as gRPC lets it (tests that need an answer to last a while give
`--token-delay-ms`). `Generate` sends one message per token; `GenerateMany` (what the kernel
uses) sends one message per decode step, one token for each running generation, as the real
engine's steps arrive. `ListModels` reports one default model whose
`max_batch` is large (64) so the kernel runs every ask at once.

    python -m bench.fake_modeld --socket PATH | --state-dir DIR [--kernel-socket PATH]
        [--max-batch 64] [--token-delay-ms 0]

Without --kernel-socket it only serves (the bench's direct baseline reads it like that).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from services.registration import serve_registered
from vfmos_runtime.gate import KernelGate
from vfmos_runtime.server import ServerConfig, create_server, run_daemon, serve_until_signal
from vfmos.model.v1 import model_pb2 as pb
from vfmos.model.v1 import model_pb2_grpc

MODEL = "fake-fast"
# Short pieces like a real tokenizer's (about 4-5 characters a token).
VOCAB = (" the", " old", " light", "house", " keeper", " walked", " up", " the", " stairs",
         ",", " and", " looked", " out", " at", " the", " sea", ".", " It", " was", " dark")
DEFAULT_NEW_TOKENS = 256
_CYCLE = sum(len(word) for word in VOCAB)


def tokens_in_text(chars: int) -> int:
    """How many tokens the first `chars` characters of an answer are (every answer is the
    vocabulary in order), so a reader counts tokens exactly however pieces were joined."""
    cycles, rest = divmod(chars, _CYCLE)
    tokens = cycles * len(VOCAB)
    for word in VOCAB:
        if rest < len(word):
            break
        rest -= len(word)
        tokens += 1
    return tokens


def prompt_tokens(request: pb.GenerateRequest) -> int:
    """A stand-in for the chat template's token count: words plus a few per message."""
    words = sum(len(m.content.split()) for m in request.messages)
    return words + 4 * len(request.messages) + len(request.assistant_prefix_ids) + 1


class FakeModel(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, max_batch: int, token_delay_s: float = 0.0):
        self.max_batch = max_batch
        self.token_delay_s = token_delay_s
        self._wakes: set[asyncio.Event] = set()
        self.draining = False

    def drain(self) -> None:
        """Stopping: end each GenerateMany stream once it has nothing running."""
        self.draining = True
        for wake in self._wakes:
            wake.set()

    async def Generate(self, request: pb.GenerateRequest, context):
        prompt = prompt_tokens(request)
        n = request.max_new_tokens or DEFAULT_NEW_TOKENS
        vocab = len(VOCAB)
        for i in range(n):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            word = i % vocab
            yield pb.GenerateResponse(text=VOCAB[word], tokens=1, prompt_tokens=prompt,
                                      token_ids=(100 + word,))
        yield pb.GenerateResponse(done=True, finish_reason=pb.FINISH_REASON_LENGTH,
                                  prompt_tokens=prompt, completion_tokens=n, model=MODEL)

    async def GenerateMany(self, requests, context):
        """GenerateMany as a batched engine's decode loop: each step adds one token to every
        running generation and is one message, sent as fast as gRPC lets it. Like Generate
        here it never runs ahead of its reader, so no chunks are ever joined: one token per
        generation per message, as the real engine's steps are when the kernel keeps up."""
        running: dict[int, list[int]] = {}  # id: [prompt tokens, tokens asked, tokens sent]
        wake = asyncio.Event()

        async def read() -> None:
            async for message in requests:
                if message.WhichOneof("action") == "start":
                    running[message.id] = [prompt_tokens(message.start),
                                           message.start.max_new_tokens or DEFAULT_NEW_TOKENS, 0]
                else:
                    running.pop(message.id, None)
                wake.set()

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: wake.set())
        self._wakes.add(wake)
        vocab = len(VOCAB)
        try:
            while True:
                if not running:
                    if reader.done() or self.draining:
                        return
                    wake.clear()
                    await wake.wait()
                    continue
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                chunks = []
                for gid, state in list(running.items()):
                    prompt, n, i = state
                    if i < n:
                        word = i % vocab
                        state[2] = i + 1
                        chunk = pb.GenerateResponse(text=VOCAB[word], tokens=1,
                                                    prompt_tokens=prompt,
                                                    token_ids=(100 + word,))
                    else:
                        del running[gid]
                        chunk = pb.GenerateResponse(
                            done=True, finish_reason=pb.FINISH_REASON_LENGTH,
                            prompt_tokens=prompt, completion_tokens=n, model=MODEL)
                    chunks.append(pb.GenerateManyChunk(id=gid, chunk=chunk))
                yield pb.GenerateManyResponse(chunks=chunks)
        finally:
            self._wakes.discard(wake)
            reader.cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=MODEL, backend=pb.BACKEND_UNSPECIFIED, context_window=32768,
            cost_per_1k_tokens=0.0, loaded=True, is_default=True, max_batch=self.max_batch)])


async def serve(socket: Path, kernel_socket: Path | None, max_batch: int,
                token_delay_s: float = 0.0) -> None:
    servicer = FakeModel(max_batch, token_delay_s)
    service_name = pb.DESCRIPTOR.services_by_name["ModelService"].full_name
    # One server serves both the kernel and the direct baseline, so it admits anyone: the
    # registration's secret is kept but not checked (the real gate costs once per call).
    gate = KernelGate("vfm-modeld")
    server, health, _ = create_server(
        ServerConfig(unix_socket=socket),
        lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, s), [service_name])
    await server.start()
    if kernel_socket is None:
        from grpc_health.v1 import health_pb2
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await serve_until_signal(server)
        return
    await serve_registered(server, health, "vfm-modeld", service_name, socket, kernel_socket,
                           close=lambda: None, gate=gate, drain=servicer.drain)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_modeld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, help="Unix socket to serve on (default: "
                        "fake-modeld.sock in --state-dir)")
    parser.add_argument("--state-dir", type=Path, help="where the default socket lives")
    parser.add_argument("--kernel-socket", type=Path, help="register with this vfmd as vfm-modeld")
    parser.add_argument("--max-batch", type=int, default=64, help="max_batch in ListModels")
    parser.add_argument("--token-delay-ms", type=float, default=0.0,
                        help="wait this long before each token (default 0: none)")
    args = parser.parse_args()
    if args.socket is None:
        if args.state_dir is None:
            parser.error("give --socket or --state-dir")
        args.socket = args.state_dir / "fake-modeld.sock"
    return run_daemon(lambda: serve(args.socket, args.kernel_socket, args.max_batch,
                                    args.token_delay_ms / 1000))


if __name__ == "__main__":
    raise SystemExit(main())
