"""The llama.cpp engine with the packaged GGUF: its greedy output is llama.cpp's own, alone and
in a batch; prefixes are shared, preempted answers resume exactly, urgent arrivals do not
wait for long prompts, and a model it cannot load goes to the PyTorch engine."""

from __future__ import annotations

import asyncio
import logging
import queue

import pytest

from services.model.batch import Job
from services.model.llama_engine import LlamaEngine
from services.model.local import LocalBackend, gguf_file
from services.model.registry import ModelEntry, ModelRegistry
from services.model.service import ModelService
from services.model.types import GenParams
from tests.llama_kernels import use_engine_kernels
from vfmos_runtime.errors import InvalidArgument, Unavailable
from vfmos_runtime.paths import cache_root

PROMPTS = ["Name a fruit.", "What is the capital of Italy?", "Say hello in French.",
           "Count to five."]
SYSTEM = "You are a terse assistant for a museum of natural history. Answer in one sentence."


@pytest.fixture(scope="module")
def service():
    svc = ModelService(ModelRegistry.load(), cache_root(), max_batch=4, engine="llama.cpp")
    asyncio.run(svc.backend("").wait_loaded())
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def reference():
    """llama.cpp's own greedy generation (its high-level API, its own sampler)."""
    from llama_cpp import Llama, llama_vocab_is_eog

    path = gguf_file(ModelRegistry.load().get(""), cache_root())
    undo = use_engine_kernels()
    try:
        llm = Llama(str(path), n_ctx=2048, n_threads=2, flash_attn=True, verbose=False)
    finally:
        undo()

    def greedy(ids: list[int], n: int) -> tuple[int, ...]:
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if llama_vocab_is_eog(llm._model.vocab, token) or len(out) == n:
                break
            out.append(token)
        return tuple(out)
    yield greedy
    llm.close()


def _msgs(prompt: str, system: str = "") -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]


async def _pieces(service, prompt, delay=0.0, system="", **params):
    await asyncio.sleep(delay)
    return [p async for p in service.generate("", _msgs(prompt, system),
                                              GenParams(**{"max_new_tokens": 12, **params}))]


def _text(pieces) -> str:
    return "".join(p.text for p in pieces)


def _ids(pieces) -> tuple[int, ...]:
    return tuple(i for p in pieces for i in p.token_ids)


def _stats(service):
    return service.backend("").engine.stats


def test_the_default_model_is_served_by_llama_cpp(service):
    backend = service.backend("")
    assert backend.engine_name == "llama.cpp" and service.engine("") == "llama.cpp"
    assert isinstance(backend.engine, LlamaEngine)


def test_greedy_output_is_llama_cpps_own_alone_and_in_a_batch(service, reference):
    backend = service.backend("")
    expected = [reference(backend.encode(_msgs(p), GenParams()), 24) for p in PROMPTS]
    alone = [_ids(asyncio.run(_pieces(service, p, max_new_tokens=24))) for p in PROMPTS]
    stats = _stats(service)
    before = stats.steps, stats.rows_decoded

    async def together():
        return await asyncio.gather(*(_pieces(service, p, max_new_tokens=24) for p in PROMPTS))
    batched = [_ids(pieces) for pieces in asyncio.run(together())]
    assert all(len(ids) > 3 for ids in expected)
    assert alone == expected
    assert batched == expected
    assert stats.rows_decoded - before[1] > 2 * (stats.steps - before[0])  # steps were shared


def test_a_shared_system_prompt_is_computed_once(service):
    system = SYSTEM + " (exhibit hall C)"  # not parked yet
    stats = _stats(service)
    hits, tokens = stats.prefix_hits, stats.prefill_tokens

    async def together():
        return await asyncio.gather(*(_pieces(service, p, system=system) for p in PROMPTS))
    batched = [_text(p) for p in asyncio.run(together())]
    backend = service.backend("")
    prompts = [backend.encode(_msgs(p, system), GenParams()) for p in PROMPTS]
    shared = len(backend.tokenizer.encode(system))
    assert stats.prefix_hits - hits >= len(PROMPTS) - 1
    assert stats.prefill_tokens - tokens < sum(map(len, prompts)) - (len(PROMPTS) - 1) * shared
    alone = [_text(asyncio.run(_pieces(service, p, system=system))) for p in PROMPTS]
    assert batched == alone


def test_a_preempted_answer_resumes_exactly_from_its_kept_cells(service):
    full = asyncio.run(_pieces(service, PROMPTS[1], max_new_tokens=14))
    stats = _stats(service)

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


def test_cancelling_one_row_leaves_the_others_intact(service):
    expected = _text(asyncio.run(_pieces(service, PROMPTS[0], max_new_tokens=20)))
    stats = _stats(service)

    async def scenario():
        doomed = service.generate("", _msgs(PROMPTS[3]), GenParams(max_new_tokens=200))
        keeper = asyncio.create_task(_pieces(service, PROMPTS[0], max_new_tokens=20))
        await doomed.__anext__()
        await asyncio.sleep(0.1)
        cancelled, at = stats.cancelled, stats.steps
        await doomed.aclose()
        while stats.cancelled == cancelled:
            await asyncio.sleep(0.01)
        return await keeper, stats.last_cancel_step - at
    kept, left_after = asyncio.run(scenario())
    assert _text(kept) == expected and left_after <= 2  # dropped within a step or two


def test_per_request_limits_stops_and_seeds_inside_one_batch(service):
    full = _text(asyncio.run(_pieces(service, PROMPTS[3], max_new_tokens=20)))
    stop = full.split()[2]

    async def mixed():
        return await asyncio.gather(_pieces(service, PROMPTS[3], max_new_tokens=3),
                                    _pieces(service, PROMPTS[3], max_new_tokens=20, stop=[stop]),
                                    _pieces(service, PROMPTS[2], temperature=1.0, seed=5),
                                    _pieces(service, PROMPTS[2], temperature=1.0, seed=6))
    a, c, d, e = asyncio.run(mixed())
    assert a[-1].completion_tokens == 3 and full.startswith(_text(a))
    assert _text(c) == full[:full.find(stop)] and c[-1].finish_reason == "stop"
    assert _text(asyncio.run(_pieces(service, PROMPTS[2], temperature=1.0, seed=5))) == _text(d)
    assert all(p.logprob is not None and p.logprob <= 0 for p in d if p.tokens)
    assert _text(d) != _text(e) or _ids(d) != _ids(e) or len(_ids(d)) < 3


def test_an_urgent_arrival_does_not_wait_for_a_long_prompt(service):
    """A long prompt is prefilled a chunk per step; an urgent arrival's prompt goes first at
    the next step, so its first token comes long before the long prompt's."""
    alone = _text(asyncio.run(_pieces(service, PROMPTS[3], priority=39)))
    long = "Summarise this. " + " ".join(f"Item {i} is a stone from hall {i % 7}."
                                         for i in range(260))
    stats = _stats(service)

    async def scenario():
        slow = asyncio.ensure_future(_pieces(service, long, max_new_tokens=2))
        prefills = stats.prefills
        while stats.prefills < prefills + 1:  # its first chunk is done: it is prefilling
            await asyncio.sleep(0.005)
        urgent = await _pieces(service, PROMPTS[3], priority=39)
        urgent_done = asyncio.get_running_loop().time()
        slow_pieces = await slow
        return urgent, urgent_done, slow_pieces, asyncio.get_running_loop().time()
    urgent, urgent_done, slow_pieces, slow_done = asyncio.run(scenario())
    assert _text(urgent) == alone and urgent[-1].done
    assert slow_pieces[-1].prompt_tokens > 4 * service.backend("").engine.chunk
    assert urgent_done < slow_done


def test_a_prompt_longer_than_a_row_is_refused_and_the_engine_goes_on(service):
    backend = service.backend("")
    engine = LlamaEngine(backend.model, backend.tokenizer, max_batch=2, prefix_cache_mb=0,
                         row_tokens=256)
    long = backend.encode(_msgs("Describe the hall. " + "Stones and bones. " * 60),
                          GenParams())
    short = backend.encode(_msgs(PROMPTS[0]), GenParams())
    assert len(long) > 256
    out: dict[int, list] = {}
    jobs = queue.Queue()
    for i, ids in enumerate((long, short)):
        jobs.put(Job(ids, GenParams(max_new_tokens=400),
                     lambda piece, i=i: out.setdefault(i, []).append(piece)))
    engine._admit(jobs)  # both arrive; the long one is refused at once
    while engine.active_jobs():
        engine._step()
    engine.close()
    assert isinstance(out[0][-1], InvalidArgument) and "holds 256" in out[0][-1].message
    assert out[1][-1].done and len(short) + out[1][-1].completion_tokens <= 256
    assert service.window("") == backend.window < 8192  # ListModels says what a row holds


def test_a_model_llama_cpp_cannot_load_goes_to_the_pytorch_engine(caplog):
    from services.model.local import converted_dir

    entry = ModelRegistry.load().get("")
    hf_dir = converted_dir(entry, cache_root())
    local = ModelEntry("smollm2-hf", source=str(hf_dir), options={"engine": "llama.cpp"})
    backend = LocalBackend(local, cache_root(), threads=2, max_batch=2)
    with caplog.at_level(logging.INFO, logger="vfm-modeld.local"):
        backend.start()
        try:
            asyncio.run(backend.wait_loaded())
            pieces = asyncio.run(_collect(backend, "Name a fruit."))
        finally:
            backend.stop()
    assert backend.engine_name == "torch" and pieces[-1].done
    assert any("llama.cpp" in r.getMessage() and "not a GGUF" in r.getMessage()
               for r in caplog.records)


def test_a_broken_gguf_is_refused_saying_why(tmp_path, caplog):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    backend = LocalBackend(ModelEntry("broken", source=str(broken)), cache_root(), threads=2)
    with caplog.at_level(logging.WARNING, logger="vfm-modeld.local"):
        backend.start()
        try:
            with pytest.raises(Unavailable, match="model broken failed to load"):
                asyncio.run(backend.wait_loaded())
        finally:
            backend.stop()
    assert any("llama.cpp could not load" in r.getMessage() for r in caplog.records)


async def _collect(backend, prompt: str):
    return [p async for p in backend.generate(_msgs(prompt), GenParams(max_new_tokens=4))]
