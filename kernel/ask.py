"""The Ask path: admit a question, stream it through the model service, account for it."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from kernel.identity import Caller
from kernel.quota import new_token_cap, remaining_tokens
from kernel.registry import ServiceRegistry
from kernel.table import ProcessTable
from libvfm.errors import (InvalidArgument, QuotaExceeded, Unavailable, VfmError,
                           from_rpc_error)
from libvfm.types import Usage
from vfmos.model.v1 import model_pb2, model_pb2_grpc

log = logging.getLogger("vfmd.ask")

MODEL_SERVICE = "vfm-modeld"
MAX_PROMPT_CHARS = 256 * 1024
MAX_NEW_TOKENS = 4096
DEFAULT_NEW_TOKENS = 256


@dataclass
class AskQuery:
    pid: int
    prompt: str
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.prompt.strip():
            raise InvalidArgument("the question is empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"the question is longer than {MAX_PROMPT_CHARS} characters")
        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument(f"max_new_tokens must be 0..{MAX_NEW_TOKENS}, "
                                  f"got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise InvalidArgument(f"temperature must be 0..5, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be 0..1, got {self.top_p}")


@dataclass
class AskDone:
    finish_reason: str
    usage: Usage


class AskRunner:
    def __init__(self, table: ProcessTable, registry: ServiceRegistry):
        self._table = table
        self._registry = registry
        self._prices: dict[str, float] = {}
        self._default_model = ""
        self._prices_at = 0.0

    async def _refresh_prices(self) -> None:
        """Cost per 1k tokens of each model, from the model service (refreshed each minute)."""
        if time.monotonic() - self._prices_at < 60.0:
            return
        stub = model_pb2_grpc.ModelStub(self._registry.channel(MODEL_SERVICE))
        reply = await stub.ListModels(model_pb2.ListModelsRequest(), timeout=5.0)
        self._prices = {m.name: m.cost_per_1k_tokens for m in reply.models}
        self._default_model = next((m.name for m in reply.models if m.is_default), "")
        self._prices_at = time.monotonic()

    @staticmethod
    def _check_prompt_fits(record, prompt_tokens: int, stream) -> None:
        left = remaining_tokens(record.spec.quota, record.counters)
        if left is not None and prompt_tokens >= left:
            stream.cancel()
            raise QuotaExceeded(
                f"the question is {prompt_tokens} tokens but process {record.pid} has only "
                f"{left} left of its {record.spec.quota.max_tokens}-token budget",
                "max_tokens", f"pid {record.pid}")

    async def ask(self, caller: Caller, query: AskQuery) -> AsyncIterator[str | AskDone]:
        """Yield the answer's text pieces, then one AskDone."""
        query.validate()
        started = time.perf_counter()
        task = asyncio.current_task()
        stopped: list[str] = []

        def preempt(reason: str) -> None:
            stopped.append(reason)
            if task is not None:
                task.cancel()

        record = self._table.begin_ask(caller, query.pid, preempt)
        usage = Usage(queue_ms=(time.perf_counter() - started) * 1000)
        finish = "stop"
        try:
            left = remaining_tokens(record.spec.quota, record.counters)
            asked = query.max_new_tokens or DEFAULT_NEW_TOKENS
            request = self._request(record.spec, query, asked if left is None else min(asked, left))
            await self._refresh_prices()
            stream = model_pb2_grpc.ModelStub(self._registry.channel(MODEL_SERVICE)).Generate(request)
            async for chunk in stream:
                if chunk.prompt_tokens and not usage.tokens_in:
                    self._check_prompt_fits(record, chunk.prompt_tokens, stream)
                    usage.tokens_in = chunk.prompt_tokens
                cap = new_token_cap(record.spec.quota, record.counters, usage.tokens_in, asked)
                if chunk.done:
                    finish = chunk.finish_reason or "stop"
                    usage.model = chunk.model
                    break
                if usage.tokens_out + chunk.tokens > cap:
                    finish = "quota" if cap < asked else "length"
                    stream.cancel()
                    break
                usage.tokens_out += chunk.tokens
                if not usage.ttft_ms:
                    usage.ttft_ms = (time.perf_counter() - started) * 1000
                if chunk.text:
                    yield chunk.text
        except asyncio.CancelledError:
            if not stopped:
                raise  # the caller went away
            task.uncancel()  # a kill or suspend stopped the answer; the call itself goes on
            finish = stopped[0]
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if err.code == grpc.StatusCode.UNAVAILABLE:
                self._registry.mark_down(MODEL_SERVICE)
                raise Unavailable(f"service {MODEL_SERVICE} is unavailable: {err.message}") from None
            raise err from None
        finally:
            usage.total_ms = (time.perf_counter() - started) * 1000
            usage.model = usage.model or record.spec.model or self._default_model
            usage.cost = (usage.tokens_in + usage.tokens_out) / 1000 * \
                self._prices.get(usage.model, 0.0)
            self._table.end_ask(query.pid, preempt, usage.tokens_in, usage.tokens_out, usage.cost)
        yield AskDone(finish, usage)

    @staticmethod
    def _request(spec, query: AskQuery, max_new: int) -> model_pb2.GenerateRequest:
        messages = []
        if spec.system_prompt:
            messages.append(model_pb2.ChatMessage(role="system", content=spec.system_prompt))
        messages.append(model_pb2.ChatMessage(role="user", content=query.prompt))
        return model_pb2.GenerateRequest(
            model=spec.model, messages=messages, max_new_tokens=max_new,
            temperature=query.temperature, top_p=query.top_p, seed=query.seed,
            stop=list(query.stop))


__all__ = ["AskDone", "AskQuery", "AskRunner", "VfmError"]
