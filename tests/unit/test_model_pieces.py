"""The model service merges decode steps queued behind a slow reader into one piece."""

import asyncio

from services.model.local import _merge_queued
from services.model.types import Piece


def step(i: int) -> Piece:
    return Piece(text=f"<{i}>", tokens=1, prompt_tokens=7, token_ids=(i,))


def test_queued_steps_merge_up_to_the_final_piece():
    async def scenario():
        queue = asyncio.Queue()
        for i in (1, 2, 3):
            queue.put_nowait(step(i))
        final = Piece(text="", tokens=0, prompt_tokens=7, done=True, finish_reason="length")
        queue.put_nowait(final)
        queue.put_nowait(step(9))  # never reached: nothing follows the final piece
        merged, held = _merge_queued(step(0), queue)
        return merged, held, final
    merged, held, final = asyncio.run(scenario())
    assert merged == Piece(text="<0><1><2><3>", tokens=4, prompt_tokens=7, token_ids=(0, 1, 2, 3))
    assert held is final


def test_nothing_queued_leaves_the_piece_alone_and_an_error_is_held():
    async def scenario():
        queue = asyncio.Queue()
        alone = _merge_queued(step(0), queue)
        error = RuntimeError("engine failed")
        queue.put_nowait(error)
        return alone, _merge_queued(step(1), queue), error
    alone, (piece, held), error = asyncio.run(scenario())
    assert alone == (step(0), None)
    assert piece == step(1) and held is error
