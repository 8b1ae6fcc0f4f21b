"""The PyTorch engine's continuous batching with the real model (HF directories, adapters, and
where llama.cpp cannot load a model): shared steps, joins mid-flight, cancellation, prefixes."""

from __future__ import annotations

import asyncio
import queue

import pytest
import torch

from services.model import batch
from vfmos_runtime.paths import cache_root
from services.model.prefix import PrefixCache, common_prefix
from services.model.registry import ModelRegistry
from services.model.service import ModelService
from services.model.types import GenParams

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say hello in French.",
           "Count to five."]
SYSTEM = "You are a terse assistant for a museum of natural history. Answer in one sentence."


@pytest.fixture(scope="module")
def service():
    svc = ModelService(ModelRegistry.load(), cache_root(), max_batch=4, engine="torch")
    yield svc
    svc.stop()


def _msgs(prompt: str, system: str = "") -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]


async def _pieces(service, prompt, delay=0.0, system="", **params):
    await asyncio.sleep(delay)
    return [p async for p in service.generate("", _msgs(prompt, system),
                                              GenParams(**{"max_new_tokens": 12, **params}))]


async def _answer(service, prompt, delay=0.0, system="", **params):
    pieces = await _pieces(service, prompt, delay, system, **params)
    return "".join(p.text for p in pieces), pieces[-1]


def _engine(service):
    return service.backend("").engine


def _ids(pieces) -> tuple[int, ...]:
    return tuple(i for p in pieces for i in p.token_ids)


def test_prefix_cache_keeps_longest_prefixes_within_its_budget():
    def kv(n):
        return [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]
    cache = PrefixCache(max_bytes=16 * 40, min_tokens=4)  # 16 bytes a token: room for 40
    cache.store(range(10), kv(10))
    cache.store(range(12), kv(12))          # extends the first: replaces it
    assert len(cache) == 1
    cache.store(range(6), kv(6))            # already held by the longer entry
    assert len(cache) == 1
    n, past = cache.lookup(list(range(8)) + [99], limit=8)
    assert n == 8 and past[0][0].shape[2] == 8
    assert cache.lookup([0, 1, 2, 99], limit=3) == (0, None)  # too short to be worth it
    cache.store([7] * 20, kv(20))
    cache.store([8] * 20, kv(20))           # over budget: the least recent goes
    assert cache.lookup(list(range(12)), limit=11) == (0, None)
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def test_engine_matches_transformers_generate(service, monkeypatch):
    """Our growing KV cache and merges against the stock path, through several regrowths."""
    monkeypatch.setattr(batch._GrowingLayer, "SPARE", 5)
    backend = service.backend("")
    asyncio.run(backend.wait_loaded())
    pieces = asyncio.run(_pieces(service, PROMPTS[3], max_new_tokens=24))
    ids = backend.encode(_msgs(PROMPTS[3]), GenParams())
    with torch.inference_mode():
        out = backend.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    reference = tuple(out[0, len(ids):].tolist())
    assert len(_ids(pieces)) > 12 and _ids(pieces) == reference[:len(_ids(pieces))]


def test_concurrent_requests_share_forward_passes_and_match_sequential(service):
    sequential = [asyncio.run(_answer(service, p))[0] for p in PROMPTS]
    stats = _engine(service).stats
    before = stats.steps, stats.rows_decoded

    async def together():
        return await asyncio.gather(*(_answer(service, p) for p in PROMPTS))
    batched = asyncio.run(together())
    steps, rows = stats.steps - before[0], stats.rows_decoded - before[1]
    assert [text for text, _ in batched] == sequential  # greedy: padding changes nothing
    assert stats.max_rows == 4 and rows / steps > 2.5  # most steps decoded several rows


def test_arrivals_with_a_shared_system_prompt_compute_it_once(service):
    system = SYSTEM + " (exhibit hall B)"  # not in the prefix cache yet
    stats = _engine(service).stats
    hits, tokens = stats.prefix_hits, stats.prefill_tokens

    async def together():
        return await asyncio.gather(*(_answer(service, p, system=system) for p in PROMPTS))
    batched = asyncio.run(together())
    assert stats.prefix_hits - hits >= len(PROMPTS) - 1
    shared = len(service.backend("").tokenizer.encode(system))
    assert stats.prefill_tokens - tokens < sum(
        len(service.backend("").encode(_msgs(p, system), GenParams())) for p in PROMPTS) \
        - (len(PROMPTS) - 1) * shared
    # Each answer is the one it gets alone (which now reuses the cached prefix).
    alone = [asyncio.run(_answer(service, p, system=system))[0] for p in PROMPTS]
    assert [text for text, _ in batched] == alone


def test_a_request_joining_mid_flight_gets_its_own_answer(service):
    alone = asyncio.run(_answer(service, PROMPTS[1]))[0]
    stats = _engine(service).stats
    before = stats.steps, stats.rows_decoded

    async def staggered():
        return await asyncio.gather(_answer(service, PROMPTS[0], max_new_tokens=30),
                                    _answer(service, PROMPTS[1], delay=0.3))
    _, (joined, _) = asyncio.run(staggered())
    assert joined == alone
    assert stats.rows_decoded - before[1] > stats.steps - before[0]  # it shared steps


def test_an_urgent_arrival_is_prefilled_between_layers_of_a_step(service):
    alone = asyncio.run(_answer(service, PROMPTS[3], priority=39))[0]
    stats = _engine(service).stats

    async def urgent_while_busy():
        background = [asyncio.ensure_future(_answer(
            service, f"Write a long story about {topic}.", max_new_tokens=60))
            for topic in ("a dragon", "the sea")]
        steps = stats.steps
        while stats.steps < steps + 3:  # the batch is decoding now
            await asyncio.sleep(0.01)
        urgent = await _answer(service, PROMPTS[3], priority=39)
        await asyncio.gather(*background)
        return urgent

    # An arrival can land in the few ms between two steps (then it joins there, as
    # before), so give it a few tries to land inside one.
    for _ in range(4):
        before = stats.interleaved
        urgent, done = asyncio.run(urgent_while_busy())
        assert urgent == alone and done.finish_reason in ("stop", "length")
        if stats.interleaved > before:
            break
    assert stats.interleaved > before  # it did not wait for the step to end


def _engine_with_jobs(service, max_batch: int):
    """A private engine driven by the test (no thread), and a maker of jobs whose pieces
    land in `out[i]`."""
    backend = service.backend("")
    asyncio.run(backend.wait_loaded())
    engine = batch.BatchEngine(backend.model, backend.tokenizer, max_batch, prefix_cache_mb=0)
    engine._jobs = queue.Queue()
    out: dict[int, list] = {}

    def job(i: int, priority: int) -> batch.Job:
        return batch.Job(backend.encode(_msgs(PROMPTS[i]), GenParams()),
                         GenParams(max_new_tokens=12, priority=priority),
                         lambda piece, i=i: out.setdefault(i, []).append(piece))
    return engine, job, out


def test_an_urgent_arrival_is_prefilled_between_layers_of_others_prefill(service):
    alone = asyncio.run(_answer(service, PROMPTS[3], priority=39))[0]
    engine, job, out = _engine_with_jobs(service, max_batch=4)
    group, urgent = [job(i, 0) for i in range(3)], job(3, 39)
    engine._jobs.put(urgent)  # it arrives once the engine has started prefilling the group
    with torch.inference_mode():
        engine._join(group)
        assert len(engine.active_jobs()) == 4
        while engine.active_jobs():
            engine._step()
    assert urgent.interleaved and urgent.first_at < min(j.first_at for j in group)
    assert urgent.first_token_ms()["prefill"] < group[0].first_token_ms()["prefill"]
    assert "".join(p.text for p in out[3]) == alone
    assert all(out[i][-1].done for i in range(4))


def test_an_urgent_arrival_into_a_full_batch_joins_when_a_row_leaves(service):
    """The kernel sends an urgent ask right after preempting a row; the row's cancel may
    land after the ask: the first token does not wait for it."""
    alone = asyncio.run(_answer(service, PROMPTS[3], priority=39))[0]
    engine, job, out = _engine_with_jobs(service, max_batch=2)
    group, urgent = [job(0, 0), job(1, 0)], job(3, 39)
    with torch.inference_mode():
        engine._join(group)
        engine._jobs.put(urgent)
        engine._step()
        assert urgent.interleaved and out[3] and len(engine.active_jobs()) == 2
        group[0].cancel.set()  # the preemption lands
        engine._admit(engine._jobs)
        assert urgent in engine.active_jobs() and len(engine.active_jobs()) == 2
        while engine.active_jobs():
            engine._step()
    assert "".join(p.text for p in out[3]) == alone and out[3][-1].done


def test_per_request_limits_inside_one_batch(service):
    full = asyncio.run(_answer(service, PROMPTS[3], max_new_tokens=20))[0]
    stop = full.split()[2]  # a word from the middle of the answer

    async def mixed():
        return await asyncio.gather(_answer(service, PROMPTS[3], max_new_tokens=3),
                                    _answer(service, PROMPTS[3], max_new_tokens=9),
                                    _answer(service, PROMPTS[3], max_new_tokens=20, stop=[stop]),
                                    _answer(service, PROMPTS[2], temperature=1.0, seed=5))
    (a, da), (b, db), (c, dc), (d, dd) = asyncio.run(mixed())
    assert da.completion_tokens == 3 and db.completion_tokens == 9
    assert b.startswith(a) and full.startswith(b)
    assert c == full[:full.find(stop)] and dc.finish_reason == "stop"
    assert asyncio.run(_answer(service, PROMPTS[2], temperature=1.0, seed=5))[0] == d


def test_cancelling_one_row_leaves_the_others_intact(service):
    expected, expected_done = asyncio.run(_answer(service, PROMPTS[0], max_new_tokens=20))
    stats = _engine(service).stats

    async def scenario():
        doomed = service.generate("", _msgs(PROMPTS[3]), GenParams(max_new_tokens=200))
        keeper = asyncio.create_task(_answer(service, PROMPTS[0], max_new_tokens=20))
        await doomed.__anext__()
        await asyncio.sleep(0.1)
        cancelled, at = stats.cancelled, stats.steps
        await doomed.aclose()
        while stats.cancelled == cancelled:
            await asyncio.sleep(0.01)
        left_after = stats.last_cancel_step - at
        return await keeper, left_after
    (text, done), left_after = asyncio.run(scenario())
    assert text == expected and done.completion_tokens == expected_done.completion_tokens
    assert left_after <= 2  # dropped before the next step (give or take the one in flight)


def test_assistant_prefix_continues_the_answer(service):
    tokenizer = service.backend("").tokenizer
    full = asyncio.run(_pieces(service, PROMPTS[2], max_new_tokens=16))
    exact_text = 0
    for k in (3, 8):
        cut = "".join(p.text for p in full[:k])  # where an interrupted answer stops
        as_ids = asyncio.run(_pieces(service, PROMPTS[2], max_new_tokens=16 - k,
                                     assistant_prefix=cut, assistant_prefix_ids=_ids(full[:k])))
        assert _ids(full[:k]) + _ids(as_ids) == _ids(full)  # ids resume exactly
        assert as_ids[-1].prompt_tokens == full[-1].prompt_tokens + k
        # Text is re-tokenised; where that gives the same ids, it resumes exactly too.
        if tokenizer.encode(cut, add_special_tokens=False) == list(_ids(full[:k])):
            as_text = asyncio.run(_pieces(service, PROMPTS[2], max_new_tokens=16 - k,
                                          assistant_prefix=cut))
            assert cut + "".join(p.text for p in as_text) == "".join(p.text for p in full)
            exact_text += 1
    assert exact_text


def test_a_preempted_answer_resumes_from_its_kept_kv(service):
    full = asyncio.run(_pieces(service, PROMPTS[1], max_new_tokens=14))
    stats = _engine(service).stats

    async def interrupted():
        gen = service.generate("", _msgs(PROMPTS[1]), GenParams(max_new_tokens=200))
        got = [await gen.__anext__() for _ in range(6)]
        await gen.aclose()  # the kernel preempts it
        return got
    got = asyncio.run(interrupted())
    tokens = stats.prefill_tokens
    rest = asyncio.run(_pieces(service, PROMPTS[1], max_new_tokens=14 - len(got),
                               assistant_prefix_ids=_ids(got)))
    assert _ids(got) + _ids(rest) == _ids(full)
    assert stats.prefill_tokens - tokens <= 2  # prompt and answer so far were not recomputed


def test_shared_prompt_prefix_is_reused(service):
    stats = _engine(service).stats
    hits, reused = stats.prefix_hits, stats.prefix_tokens_reused
    asyncio.run(_answer(service, "Tell me about owls.", max_new_tokens=2))
    asyncio.run(_answer(service, "Tell me about cats.", max_new_tokens=2))
    assert stats.prefix_hits > hits and stats.prefix_tokens_reused - reused >= 20


def test_the_engine_gives_freed_memory_back_once_each_time_it_goes_idle(service):
    """After a busy spell the engine returns the batch's freed memory to the system (glibc
    keeps it otherwise: vfm-modeld's RSS stayed at its load peak), once, not at every wake.
    (A None in the queue lets an idle `_admit` return instead of sleeping for work.)"""
    engine, job, out = _engine_with_jobs(service, max_batch=2)
    with torch.inference_mode():
        engine._jobs.put(None)
        engine._admit(engine._jobs)  # idle before any work: nothing to give back
        assert engine.stats.heap_trims == 0
        engine._jobs.put(job(0, 0))
        engine._jobs.put(job(1, 0))
        engine._admit(engine._jobs)
        while engine.active_jobs():
            engine._step()
        assert engine.stats.heap_trims == 0  # busy: not yet
        engine._jobs.put(None)
        engine._admit(engine._jobs)  # the last row has left: idle
        assert engine.stats.heap_trims == 1 and out[0][-1].done and out[1][-1].done
        engine._jobs.put(None)
        engine._admit(engine._jobs)  # idle again, nothing ran: no second trim
        assert engine.stats.heap_trims == 1


def test_prefill_groups_keep_order_within_a_token_budget():
    jobs = [batch.Job([1] * n, GenParams(), print) for n in (30, 50, 40, 200, 10)]
    groups = batch.prefill_groups(jobs, budget=100)
    assert [[len(j.input_ids) for j in g] for g in groups] == [[30, 50], [40], [200], [10]]
    assert batch.prefill_groups([], budget=100) == []


def test_arrivals_beyond_the_prefill_budget_are_prefilled_in_several_forwards(service):
    """The transient memory of a prefill grows with its tokens, so a crowd of arrivals is
    cut into forwards of at most `prefill_tokens` prompt tokens; each still gets its own
    answer, and all of them decode together."""
    alone = [asyncio.run(_answer(service, p))[0] for p in PROMPTS[:3]]
    engine, job, out = _engine_with_jobs(service, max_batch=4)
    jobs = [job(i, 0) for i in range(3)]
    engine.prefill_tokens = max(len(j.input_ids) for j in jobs) + 1  # one prompt a forward
    for j in jobs:
        engine._jobs.put(j)
    with torch.inference_mode():
        engine._admit(engine._jobs)
        assert engine.stats.prefills == 3 and len(engine.active_jobs()) == 3
        while engine.active_jobs():
            engine._step()
    assert engine.stats.max_rows == 3
    assert ["".join(p.text for p in out[i]) for i in range(3)] == alone
