"""The gateway's pure mapping of OpenAI requests onto an FM process, and its turn book."""

from __future__ import annotations

import pytest

from services.gateway import api
from services.gateway.api import BadRequest, Turn
from services.gateway.turns import TurnBook


def test_messages_map_to_instructions_history_and_question():
    conv = api.conversation([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "there"}]},
        {"role": "developer", "content": "Use French."},
        {"role": "user", "content": "  "},
        {"role": "user", "content": "How are you?"}])
    assert conv.instructions == "Be brief.\n\nUse French."
    assert conv.history == [Turn("user", "Hi"), Turn("assistant", "Hello\nthere")]
    assert conv.question == "How are you?"


@pytest.mark.parametrize("messages, fragment", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "x"}], "must be a user message"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
     "must be a user message"),
    ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "tool"),
    ([{"role": "wizard", "content": "x"}], "role must be"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "'image_url' part"),
    ([{"role": "user", "content": 3}], "string or a list"),
    ([{"role": "user", "content": ""}], "empty"),
])
def test_bad_messages_are_named(messages, fragment):
    with pytest.raises(BadRequest) as err:
        api.conversation(messages)
    assert fragment in err.value.message and err.value.param == "messages"


def test_chat_sampling_fields_and_their_limits():
    call = api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "q"}],
                           "max_completion_tokens": 12, "temperature": 0.5, "top_p": 0.9,
                           "seed": 7, "stop": "END", "stream": True,
                           "stream_options": {"include_usage": True}, "user": "u1"})
    assert call.sampling == api.Sampling(12, 0.5, 0.9, 7, ["END"])
    assert call.stream and call.include_usage and call.user == "u1"
    base = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    for extra, param in (({"max_tokens": 5000}, "max_tokens"), ({"temperature": 3}, "temperature"),
                         ({"top_p": True}, "top_p"), ({"stop": ["a"] * 5}, "stop"),
                         ({"n": 3}, "n"), ({"stream_options": {"include_usage": True}},
                                            "stream_options"),
                         ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"logprobs": True}, "logprobs"), ({"model": 5}, "model")):
        with pytest.raises(BadRequest) as err:
            api.parse_chat({**base, **extra})
        assert err.value.param == param


def test_completion_responses_and_embedding_inputs():
    assert api.parse_completion({"model": "m", "prompt": ["once"]}).prompt == "once"
    with pytest.raises(BadRequest):
        api.parse_completion({"model": "m", "prompt": ["a", "b"]})
    r = api.parse_responses({"model": "m", "input": "hello", "instructions": "Be kind.",
                             "max_output_tokens": 9})
    assert r.conversation.question == "hello" and r.conversation.instructions == "Be kind."
    assert r.sampling.max_new_tokens == 9
    with pytest.raises(BadRequest) as err:
        api.parse_responses({"model": "m", "input": "x", "previous_response_id": "resp_1"})
    assert err.value.param == "previous_response_id"
    e = api.parse_embeddings({"model": "m", "input": "x", "encoding_format": "base64"}, 384)
    assert e.texts == ["x"] and e.base64
    for bad in ({"input": [1, 2]}, {"input": []}, {"input": "x", "dimensions": 10}):
        with pytest.raises(BadRequest):
            api.parse_embeddings({"model": "m", **bad}, 384)


def test_tools_pass_the_apps_turns_through_and_keep_the_rules_as_instructions():
    import json
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    call = api.parse_chat({"model": "m", "tools": tools, "tool_choice": "auto", "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                              "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "Sunny"}]})
    wire = json.loads(call.tools_json)
    assert call.conversation.instructions == "Use tools." and not call.conversation.history
    assert call.conversation.question == "Weather?"
    assert [m["role"] for m in wire["messages"]] == ["user", "assistant", "tool"]
    assert wire["messages"][1]["content"] == "" and wire["tool_choice"] == "auto"
    assert wire["tools"] == tools
    assert api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}
                          ).tools_json == ""
    for bad, param in (({"tools": [{"type": "retrieval"}]}, "tools"),
                       ({"tools": tools, "tool_choice": "sometimes"}, "tool_choice"),
                       ({"functions": [{"name": "f"}]}, "functions")):
        with pytest.raises(BadRequest) as err:
            api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], **bad})
        assert err.value.param == param


def test_turn_book_is_bounded_and_per_process():
    book = TurnBook(max_processes=2, max_turns=3)
    book.learn(1, [Turn("user", f"q{i}") for i in range(4)])
    assert not book.knows(1, Turn("user", "q0")) and book.knows(1, Turn("user", "q3"))
    assert book.knows(1, Turn("user", " q3 "))  # the kernel keeps the text; spaces aside
    assert not book.knows(1, Turn("assistant", "q3")) and not book.knows(2, Turn("user", "q3"))
    book.learn(2, [Turn("user", "a")])
    book.learn(3, [Turn("user", "b")])
    assert not book.knows(1, Turn("user", "q3"))  # the least recently used process went
    book.forget(3)
    assert not book.knows(3, Turn("user", "b"))
