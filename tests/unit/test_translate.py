"""OpenAI <-> Anthropic translation of requests, responses, errors and streams.

Translated payloads are checked against the official SDKs' pydantic models, so "the real wire
format" is the SDK's definition rather than ours.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from extproc.sse import SSEParser
from extproc.translate import (
    TranslationError,
    anthropic_request_to_openai,
    anthropic_response_to_openai,
    openai_request_to_anthropic,
    openai_response_to_anthropic,
)
from extproc.translate_errors import error_to_anthropic, error_to_openai
from extproc.translate_stream import AnthropicToOpenAIStream, OpenAIToAnthropicStream
from extproc.usage import Usage

ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

OPENAI_REQUEST: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "assistant", "content": "18C and sunny."},
        {"role": "user", "content": "Thanks!"},
    ],
    "max_tokens": 256,
    "temperature": 0.5,
    "top_p": 0.9,
    "stop": ["END"],
    "stream": True,
    "tools": [WEATHER_TOOL],
    "tool_choice": "auto",
    "user": "u-42",
}


def frames(data: bytes) -> list[tuple[str, bytes]]:
    return [(e.event, e.data) for e in SSEParser().feed(data)]


def an(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


TEXT = "Bonjour, le monde! Ünïcödé ✓ and \"quotes\"\nnewline"
PIECES = ["Bonjour, ", "le monde! ", "Ünïcödé ✓", " and \"quotes\"\nnewline"]
ANTHROPIC_STREAM = (
    an("message_start", {"message": {
        "id": "msg_01XYZ", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 25, "output_tokens": 1}}})
    + an("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    + an("ping", {})
    + b"".join(an("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}) for p in PIECES)
    + an("content_block_stop", {"index": 0})
    + an("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 15}})
    + an("message_stop", {})
)
TOOL_STREAM = (
    ANTHROPIC_STREAM.split(b"event: content_block_start")[0]
    + an("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}})
    + an("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"city": '}})
    + an("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'}})
    + an("content_block_stop", {"index": 0})
    + an("message_delta", {"delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 9}})
    + an("message_stop", {})
)


def oa(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
    body = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o",
            "choices": choices, "usage": usage}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]


OPENAI_STREAM = (
    oa(delta({"role": "assistant", "content": ""}))
    + b"".join(oa(delta({"content": p})) for p in PIECES)
    + oa(delta({}, "stop"))
    + oa([], {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
    + b"data: [DONE]\n\n"
)


def run(stream: AnthropicToOpenAIStream | OpenAIToAnthropicStream, data: bytes, cuts: list[int] = []) -> bytes:  # noqa: B006
    out, prev = [], 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(stream.feed(data[prev:cut]))
        prev = cut
    return b"".join(out) + stream.finish()


def openai_chunks(out: bytes) -> list[dict[str, Any]]:
    data = [d for _, d in frames(out)]
    assert data[-1] == b"[DONE]" and data.count(b"[DONE]") == 1
    return [orjson.loads(d) for d in data[:-1]]


class TestOpenAIRequestToAnthropic:
    def test_a_full_request_maps_messages_tools_and_parameters(self) -> None:
        out = openai_request_to_anthropic(OPENAI_REQUEST, "claude-sonnet-4-5")
        assert out["model"] == "claude-sonnet-4-5"
        assert out["system"] == "You are terse."
        assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user", "assistant", "user"]
        assert out["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
        assert out["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"}]
        assert (out["max_tokens"], out["temperature"], out["top_p"]) == (256, 0.5, 0.9)
        assert out["stop_sequences"] == ["END"] and out["stream"] is True
        assert out["tools"] == [{"name": "get_weather", "description": "Weather for a city",
                                 "input_schema": WEATHER_TOOL["function"]["parameters"]}]  # type: ignore[index]
        assert out["tool_choice"] == {"type": "auto"}
        assert out["metadata"] == {"user_id": "u-42"}

    def test_system_and_developer_messages_join_into_one_system_string(self) -> None:
        body = {"messages": [{"role": "system", "content": "A"}, {"role": "developer", "content": [{"type": "text", "text": "B"}]},
                             {"role": "user", "content": "hi"}]}
        assert openai_request_to_anthropic(body, "m")["system"] == "A\n\nB"

    def test_consecutive_same_role_messages_merge_into_one_turn(self) -> None:
        body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                             {"role": "tool", "tool_call_id": "c", "content": "r"}]}
        (msg,) = openai_request_to_anthropic(body, "m")["messages"]
        assert [b["type"] for b in msg["content"]] == ["text", "text", "tool_result"]

    def test_images_become_base64_or_url_sources(self) -> None:
        parts = [{"type": "text", "text": "what is this"},
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                 {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]
        (msg,) = openai_request_to_anthropic({"messages": [{"role": "user", "content": parts}]}, "m")["messages"]
        assert msg["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        assert msg["content"][2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}

    def test_max_tokens_defaults_to_4096_and_prefers_max_completion_tokens(self) -> None:
        msgs = [{"role": "user", "content": "x"}]
        assert openai_request_to_anthropic({"messages": msgs}, "m")["max_tokens"] == 4096
        assert openai_request_to_anthropic({"messages": msgs, "max_tokens": 5, "max_completion_tokens": 7}, "m")["max_tokens"] == 7

    def test_stop_string_becomes_a_list_and_stream_options_and_n_1_are_dropped(self) -> None:
        out = openai_request_to_anthropic({"messages": [], "stop": "X", "n": 1, "stream_options": {"include_usage": True}}, "m")
        assert out["stop_sequences"] == ["X"]
        assert "stream_options" not in out and "n" not in out

    def test_temperature_above_anthropics_range_is_clamped(self) -> None:
        assert openai_request_to_anthropic({"messages": [], "temperature": 1.7}, "m")["temperature"] == 1.0

    @pytest.mark.parametrize(("choice", "expected"), [
        ("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"})])
    def test_tool_choice_maps_to_anthropic_form(self, choice: Any, expected: dict[str, Any]) -> None:
        assert openai_request_to_anthropic({"messages": [], "tool_choice": choice}, "m")["tool_choice"] == expected

    def test_parallel_tool_calls_false_disables_parallel_tool_use(self) -> None:
        out = openai_request_to_anthropic({"messages": [], "parallel_tool_calls": False}, "m")
        assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}

    @pytest.mark.parametrize("body", [
        {"messages": [], "n": 2},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{bad"}}]}]},
        {"messages": [], "tools": [{"type": "custom", "custom": {"name": "x"}}]},
    ])
    def test_inexpressible_requests_raise_translation_error(self, body: dict[str, Any]) -> None:
        with pytest.raises(TranslationError):
            openai_request_to_anthropic(body, "m")

    def test_the_input_is_not_mutated(self) -> None:
        before = orjson.dumps(OPENAI_REQUEST)
        openai_request_to_anthropic(OPENAI_REQUEST, "m")
        assert orjson.dumps(OPENAI_REQUEST) == before


class TestAnthropicRequestToOpenAI:
    def test_system_blocks_become_the_first_system_message(self) -> None:
        body = {"system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}], "messages": [{"role": "user", "content": "x"}]}
        assert anthropic_request_to_openai(body, "gpt", False)["messages"][0] == {"role": "system", "content": "A\n\nB"}

    def test_tool_results_become_tool_messages_ahead_of_the_users_text(self) -> None:
        body = {"messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]},
            {"type": "text", "text": "and now?"}]}]}
        assert anthropic_request_to_openai(body, "gpt", False)["messages"] == [
            {"role": "tool", "tool_call_id": "t1", "content": "42"}, {"role": "user", "content": "and now?"}]

    def test_images_make_the_content_a_list_of_parts(self) -> None:
        body = {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "see"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAA"}}]}]}
        (msg,) = anthropic_request_to_openai(body, "gpt", False)["messages"]
        assert msg["content"] == [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAA"}}]

    def test_streaming_adds_stream_options_with_the_requested_include_usage(self) -> None:
        out = anthropic_request_to_openai({"messages": [], "stream": True, "max_tokens": 9, "stop_sequences": ["S"]}, "gpt", True)
        assert out["stream_options"] == {"include_usage": True}
        assert (out["max_tokens"], out["stop"]) == (9, ["S"])

    def test_tool_choice_any_becomes_required_and_server_tools_are_refused(self) -> None:
        assert anthropic_request_to_openai({"messages": [], "tool_choice": {"type": "any"}}, "g", False)["tool_choice"] == "required"
        with pytest.raises(TranslationError):
            anthropic_request_to_openai({"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "g", False)


class TestRoundTrip:
    def test_openai_to_anthropic_and_back_keeps_messages_and_parameters(self) -> None:
        back = anthropic_request_to_openai(openai_request_to_anthropic(OPENAI_REQUEST, "claude"), "gpt-4o", include_usage=False)
        expected = {**OPENAI_REQUEST, "stream_options": {"include_usage": False}}
        assert back == expected


class TestResponses:
    ANTHROPIC_MESSAGE: dict[str, Any] = {
        "id": "msg_01ABC", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 4, "output_tokens": 10}}

    def test_an_anthropic_message_becomes_a_valid_chat_completion(self) -> None:
        out = anthropic_response_to_openai(self.ANTHROPIC_MESSAGE, "my-model")
        cc = ChatCompletion.model_validate(out)
        assert cc.model == "my-model" and cc.choices[0].finish_reason == "tool_calls"
        assert cc.choices[0].message.content == "Let me check."
        call = cc.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert (call.id, call.function.name, orjson.loads(call.function.arguments)) == ("toolu_1", "get_weather", {"city": "Paris"})  # type: ignore[union-attr]
        assert (cc.usage.prompt_tokens, cc.usage.completion_tokens, cc.usage.total_tokens) == (24, 10, 34)  # type: ignore[union-attr]

    @pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("tool_use", "tool_calls")])
    def test_stop_reasons_map_to_finish_reasons(self, stop: str, finish: str) -> None:
        assert anthropic_response_to_openai({**self.ANTHROPIC_MESSAGE, "stop_reason": stop}, "m")["choices"][0]["finish_reason"] == finish

    def test_a_chat_completion_becomes_a_valid_anthropic_message(self) -> None:
        cc = anthropic_response_to_openai(self.ANTHROPIC_MESSAGE, "m")
        msg = Message.model_validate(openai_response_to_anthropic(cc, "claude-x"))
        assert msg.model == "claude-x" and msg.stop_reason == "tool_use"
        assert [b.type for b in msg.content] == ["text", "tool_use"]
        assert msg.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == (24, 10)

    @pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use")])
    def test_finish_reasons_map_to_stop_reasons(self, finish: str, stop: str) -> None:
        body = {"id": "chatcmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": finish}]}
        assert openai_response_to_anthropic(body, "m")["stop_reason"] == stop


class TestErrors:
    ANTHROPIC_ERR = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}'
    OPENAI_ERR = b'{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}'

    def test_an_anthropic_error_becomes_an_openai_error(self) -> None:
        assert orjson.loads(error_to_openai(529, self.ANTHROPIC_ERR)) == {
            "error": {"message": "Overloaded", "type": "server_error", "code": "overloaded_error"}}

    def test_an_anthropic_auth_error_keeps_its_meaning(self) -> None:
        body = b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
        assert orjson.loads(error_to_openai(401, body))["error"]["type"] == "authentication_error"

    def test_an_openai_error_stays_openai_shaped(self) -> None:
        assert orjson.loads(error_to_openai(429, self.OPENAI_ERR)) == {"error": {
            "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded", "param": None}}

    def test_an_openai_error_becomes_an_anthropic_error_typed_by_status(self) -> None:
        assert orjson.loads(error_to_anthropic(429, self.OPENAI_ERR)) == {
            "type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}}

    def test_an_anthropic_error_stays_anthropic_shaped(self) -> None:
        assert orjson.loads(error_to_anthropic(529, self.ANTHROPIC_ERR)) == {
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

    @pytest.mark.parametrize("body", [b"", b"<html>502 Bad Gateway</html>", b"upstream connect error", b"[1]", b'{"detail":"x"}'])
    def test_garbage_becomes_a_well_formed_error_in_both_shapes(self, body: bytes) -> None:
        o = orjson.loads(error_to_openai(502, body))["error"]
        assert o["type"] == "server_error" and "502" in o["message"] and "code" in o
        a = orjson.loads(error_to_anthropic(502, body))
        assert a["type"] == "error" and a["error"]["type"] == "api_error" and "502" in a["error"]["message"]

    def test_a_client_error_status_maps_to_invalid_request(self) -> None:
        assert orjson.loads(error_to_openai(400, b"nope"))["error"]["type"] == "invalid_request_error"
        assert orjson.loads(error_to_anthropic(400, b"nope"))["error"]["type"] == "invalid_request_error"


class TestAnthropicToOpenAIStream:
    def test_a_realistic_stream_yields_valid_chunks_with_the_original_text_and_usage(self) -> None:
        chunks = openai_chunks(run(AnthropicToOpenAIStream("my-model", include_usage=True), ANTHROPIC_STREAM))
        parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
        assert parsed[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parsed if p.choices) == TEXT
        assert [p.choices[0].finish_reason for p in parsed if p.choices][-1] == "stop"
        assert parsed[-1].choices == [] and parsed[-1].usage is not None
        assert (parsed[-1].usage.prompt_tokens, parsed[-1].usage.completion_tokens, parsed[-1].usage.total_tokens) == (25, 15, 40)
        assert len({(p.id, p.created, p.model) for p in parsed}) == 1
        assert parsed[0].id == "chatcmpl-01XYZ" and parsed[0].model == "my-model"
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])

    def test_without_include_usage_there_is_no_usage_anywhere(self) -> None:
        out = run(AnthropicToOpenAIStream("m", include_usage=False), ANTHROPIC_STREAM)
        assert b"usage" not in out
        assert all(c["choices"] for c in openai_chunks(out))

    def test_each_complete_event_is_translated_at_once(self) -> None:
        s = AnthropicToOpenAIStream("m", include_usage=False)
        first_delta = ANTHROPIC_STREAM.index(b"event: content_block_delta")
        assert b'"role":"assistant"' in s.feed(ANTHROPIC_STREAM[:first_delta])
        end = ANTHROPIC_STREAM.index(b"\n\n", first_delta) + 2
        assert b'"content":"Bonjour, "' in s.feed(ANTHROPIC_STREAM[first_delta:end])

    @settings(max_examples=60)
    @given(st.lists(st.integers(min_value=0, max_value=len(ANTHROPIC_STREAM)), max_size=12))
    def test_any_split_gives_the_same_chunks(self, cuts: list[int]) -> None:
        whole = openai_chunks(run(AnthropicToOpenAIStream("m", True), ANTHROPIC_STREAM))
        split = openai_chunks(run(AnthropicToOpenAIStream("m", True), ANTHROPIC_STREAM, cuts))
        strip = lambda cs: [{k: v for k, v in c.items() if k != "created"} for c in cs]  # noqa: E731
        assert strip(split) == strip(whole)

    def test_tool_use_streams_as_tool_call_deltas(self) -> None:
        parsed = [ChatCompletionChunk.model_validate(c) for c in openai_chunks(run(AnthropicToOpenAIStream("m", False), TOOL_STREAM))]
        calls = [tc for p in parsed for tc in (p.choices[0].delta.tool_calls or [])]
        assert calls[0].id == "toolu_1" and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert "".join(c.function.arguments or "" for c in calls) == '{"city": "Paris"}'  # type: ignore[union-attr]
        assert {c.index for c in calls} == {0}
        assert parsed[-1].choices[0].finish_reason == "tool_calls"

    def test_an_error_event_becomes_an_openai_error_frame_then_done(self) -> None:
        stream = ANTHROPIC_STREAM.split(b"event: content_block_stop")[0] + an("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
        s = AnthropicToOpenAIStream("m", include_usage=True)
        chunks = openai_chunks(run(s, stream))
        assert chunks[-1] == {"error": {"message": "Overloaded", "type": "server_error", "code": "overloaded_error"}}

    def test_done_is_emitted_exactly_once_even_when_finish_follows_message_stop(self) -> None:
        s = AnthropicToOpenAIStream("m", include_usage=False)
        out = s.feed(ANTHROPIC_STREAM) + s.finish() + s.finish()
        assert out.count(b"[DONE]") == 1

    def test_a_truncated_stream_still_ends_with_done(self) -> None:
        out = run(AnthropicToOpenAIStream("m", include_usage=True), ANTHROPIC_STREAM[:200])
        assert out.endswith(b"data: [DONE]\n\n") and out.count(b"[DONE]") == 1


class TestOpenAIToAnthropicStream:
    def events(self, out: bytes) -> list[Any]:
        evs = frames(out)
        for name, data in evs:
            assert orjson.loads(data)["type"] == name
        return [ANTHROPIC_EVENT.validate_python(orjson.loads(d)) for n, d in evs if n != "ping"]

    def test_a_realistic_stream_yields_the_full_anthropic_event_sequence(self) -> None:
        s = OpenAIToAnthropicStream("claude-x")
        evs = self.events(run(s, OPENAI_STREAM))
        assert [e.type for e in evs] == ["message_start", "content_block_start", *["content_block_delta"] * 4,
                                         "content_block_stop", "message_delta", "message_stop"]
        assert evs[0].message.model == "claude-x"
        assert "".join(e.delta.text for e in evs if e.type == "content_block_delta") == TEXT
        assert (evs[-2].delta.stop_reason, evs[-2].usage.output_tokens, evs[-2].usage.input_tokens) == ("end_turn", 7, 11)
        assert s.usage == Usage(11, 7)

    def test_the_message_ends_as_soon_as_the_usage_chunk_arrives(self) -> None:
        s = OpenAIToAnthropicStream("m")
        out = s.feed(OPENAI_STREAM.split(b"data: [DONE]")[0])
        assert out.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        assert s.feed(b"data: [DONE]\n\n") == b"" and s.finish() == b""

    @settings(max_examples=60)
    @given(st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM)), max_size=12))
    def test_any_split_gives_byte_identical_output(self, cuts: list[int]) -> None:
        s1, s2 = OpenAIToAnthropicStream("m"), OpenAIToAnthropicStream("m")
        s2._id = s1._id
        assert run(s2, OPENAI_STREAM, cuts) == run(s1, OPENAI_STREAM)

    def test_tool_calls_become_tool_use_blocks_after_text(self) -> None:
        stream = (oa(delta({"role": "assistant", "content": "Checking."}))
                  + oa(delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}))
                  + oa(delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}))
                  + oa(delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}))
                  + oa(delta({}, "tool_calls")) + oa([], {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})
                  + b"data: [DONE]\n\n")
        evs = self.events(run(OpenAIToAnthropicStream("m"), stream))
        starts = [e for e in evs if e.type == "content_block_start"]
        assert [(e.index, e.content_block.type) for e in starts] == [(0, "text"), (1, "tool_use")]
        assert starts[1].content_block.id == "call_1" and starts[1].content_block.name == "get_weather"
        assert "".join(e.delta.partial_json for e in evs if e.type == "content_block_delta" and e.index == 1) == '{"city":"Paris"}'
        assert [e.index for e in evs if e.type == "content_block_stop"] == [0, 1]
        assert evs[-2].delta.stop_reason == "tool_use"

    def test_an_upstream_error_frame_becomes_the_final_error_event(self) -> None:
        s = OpenAIToAnthropicStream("m")
        head = s.feed(oa(delta({"role": "assistant", "content": "a"})))
        out = run(s, b'data: {"error":{"message":"boom","type":"server_error","code":null}}\n\n')
        assert frames(out) == [("error", b'{"type":"error","error":{"type":"api_error","message":"boom"}}')]
        assert [e.type for e in self.events(head)] == ["message_start", "content_block_start", "content_block_delta"]

    def test_finish_closes_a_stream_the_upstream_cut_short(self) -> None:
        evs = self.events(run(OpenAIToAnthropicStream("m"), oa(delta({"content": "par"}))))
        assert [e.type for e in evs][-3:] == ["content_block_stop", "message_delta", "message_stop"]


class TestMalformedBodies:
    @pytest.mark.parametrize("body", [
        {"messages": ["hello"]}, {"messages": 5}, {"messages": [{"role": "user", "content": 3}]},
        {"messages": [], "tools": [1]}, {"messages": [], "temperature": "hot"},
    ])
    def test_malformed_openai_requests_raise_translation_error(self, body: dict[str, Any]) -> None:
        with pytest.raises(TranslationError):
            openai_request_to_anthropic(body, "m")

    @pytest.mark.parametrize("body", [{"messages": ["x"]}, {"messages": [{"role": "user", "content": [5]}]}, {"system": 3, "messages": [], "tools": "x"}])
    def test_malformed_anthropic_requests_raise_translation_error(self, body: dict[str, Any]) -> None:
        with pytest.raises(TranslationError):
            anthropic_request_to_openai(body, "m", False)

    def test_malformed_responses_raise_translation_error(self) -> None:
        with pytest.raises(TranslationError):
            anthropic_response_to_openai({"content": "oops"}, "m")
        with pytest.raises(TranslationError):
            openai_response_to_anthropic({"choices": ["oops"]}, "m")
