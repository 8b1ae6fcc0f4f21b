"""Continuous batching with the real model: shared steps, joins mid-flight, cancellation, prefixes."""

from __future__ import annotations

import asyncio

import pytest

from services.model.local import cache_root
from services.model.registry import ModelRegistry
from services.model.service import ModelService
from services.model.types import GenParams

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say hello in French.",
           "Count to five."]


@pytest.fixture(scope="module")
def service():
    svc = ModelService(ModelRegistry.load(), cache_root(), max_batch=4)
    yield svc
    svc.stop()


def _msgs(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


async def _answer(service, prompt, delay=0.0, **params) -> str:
    await asyncio.sleep(delay)
    pieces = [p async for p in service.generate("", _msgs(prompt),
                                                GenParams(**{"max_new_tokens": 12, **params}))]
    return "".join(p.text for p in pieces), pieces[-1]


def _engine(service):
    return service.backend("").engine


def test_concurrent_requests_share_forward_passes_and_match_sequential(service):
    sequential = [asyncio.run(_answer(service, p))[0] for p in PROMPTS]
    before = _engine(service).stats.steps, _engine(service).stats.rows_decoded

    async def together():
        return await asyncio.gather(*(_answer(service, p) for p in PROMPTS))
    batched = asyncio.run(together())
    stats = _engine(service).stats
    steps, rows = stats.steps - before[0], stats.rows_decoded - before[1]
    assert [text for text, _ in batched] == sequential  # greedy: padding changes nothing
    assert stats.max_rows == 4 and rows / steps > 2.5  # most steps decoded several rows


def test_a_request_joining_mid_flight_gets_its_own_answer(service):
    alone = asyncio.run(_answer(service, PROMPTS[1]))[0]

    async def staggered():
        return await asyncio.gather(_answer(service, PROMPTS[0], max_new_tokens=30),
                                    _answer(service, PROMPTS[1], delay=0.4))
    (_, _), (joined, _) = asyncio.run(staggered())
    assert joined == alone


def test_per_request_limits_inside_one_batch(service):
    async def mixed():
        return await asyncio.gather(_answer(service, PROMPTS[3], max_new_tokens=3),
                                    _answer(service, PROMPTS[3], max_new_tokens=9),
                                    _answer(service, PROMPTS[2], temperature=1.0, seed=5))
    (a, da), (b, db), (_, dc) = asyncio.run(mixed())
    assert da.completion_tokens == 3 and db.completion_tokens == 9
    assert b.startswith(a)
    assert asyncio.run(_answer(service, PROMPTS[2], temperature=1.0, seed=5))[1].completion_tokens \
        == dc.completion_tokens


def test_cancelling_one_row_leaves_the_others_intact(service):
    expected, expected_done = asyncio.run(_answer(service, PROMPTS[0], max_new_tokens=20))

    async def scenario():
        doomed = service.generate("", _msgs(PROMPTS[3]), GenParams(max_new_tokens=200))
        keeper = asyncio.create_task(_answer(service, PROMPTS[0], max_new_tokens=20))
        await doomed.__anext__()
        await doomed.aclose()
        return await keeper
    text, done = asyncio.run(scenario())
    assert text == expected and done.completion_tokens == expected_done.completion_tokens
    assert len(_engine(service)._rows) == 0  # the cancelled row did not linger


@pytest.mark.parametrize("prompt", PROMPTS)
def test_assistant_prefix_continues_the_answer(service, prompt):
    async def pieces(**params):
        return [p async for p in service.generate("", _msgs(prompt),
                                                  GenParams(max_new_tokens=16, **params))]
    full = asyncio.run(pieces())
    k = len(full) // 2
    cut = "".join(p.text for p in full[:k])  # where an interrupted answer stops
    ids = tuple(i for p in full[:k] for i in p.token_ids)
    rest = asyncio.run(pieces(assistant_prefix=cut, assistant_prefix_ids=ids))
    assert cut + "".join(p.text for p in rest[:len(full) - 1 - k]) == \
        "".join(p.text for p in full)  # greedy continuation = the uninterrupted answer


def test_shared_prompt_prefix_is_reused(service):
    stats = _engine(service).stats
    hits, reused = stats.prefix_hits, stats.prefix_tokens_reused
    asyncio.run(_answer(service, "Tell me about owls.", max_new_tokens=2))
    asyncio.run(_answer(service, "Tell me about cats.", max_new_tokens=2))
    assert stats.prefix_hits > hits and stats.prefix_tokens_reused - reused >= 20
