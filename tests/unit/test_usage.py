"""Usage and reply text from buffered bodies and from streams (StreamTap)."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from extproc.policy import Api
from extproc.sse import SSEParser
from extproc.usage import StreamTap, Usage, text_from_json, usage_from_json

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1"}


def oa_chunk(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
    body = {**HEAD, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": usage}
    return b"data: " + orjson.dumps(body) + b"\n\n"


OA_USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 0}}
OA_STREAM = (
    oa_chunk({"role": "assistant", "content": "", "refusal": None})
    + oa_chunk({"content": "Hello"})
    + oa_chunk({"content": ", world"})
    + oa_chunk({}, "stop")
    + b"data: " + orjson.dumps({**HEAD, "choices": [], "usage": OA_USAGE}) + b"\n\n"
    + b"data: [DONE]\n\n"
)


def an(kind: str, payload: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


AN_STREAM = (
    an("message_start", {"message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1}}})
    + an("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    + an("ping", {})
    + an("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hello"}})
    + an("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": ", world"}})
    + an("content_block_stop", {"index": 0})
    + an("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 15}})
    + an("message_stop", {})
)


def tap_all(tap: StreamTap, stream: bytes, cuts: list[int]) -> bytes:
    out, prev = [], 0
    for cut in [*sorted(cuts), len(stream)]:
        out.append(tap.feed(stream[prev:cut]))
        prev = cut
    out.append(tap.finish())
    return b"".join(out)


class TestUsage:
    def test_total_is_input_plus_output(self) -> None:
        assert Usage(3, 4).total_tokens == 7

    def test_openai_body_usage_is_prompt_and_completion_tokens(self) -> None:
        body = orjson.dumps({"choices": [], "usage": OA_USAGE})
        assert usage_from_json(Api.OPENAI, body) == Usage(9, 3)

    def test_anthropic_body_usage_counts_cached_prompt_tokens_as_input(self) -> None:
        body = orjson.dumps({"usage": {"input_tokens": 10, "cache_creation_input_tokens": 2,
                                       "cache_read_input_tokens": 3, "output_tokens": 7}})
        assert usage_from_json(Api.ANTHROPIC, body) == Usage(15, 7)

    def test_absent_or_unparseable_usage_is_none(self) -> None:
        assert usage_from_json(Api.OPENAI, b'{"choices": []}') is None
        assert usage_from_json(Api.OPENAI, b"not json") is None
        assert usage_from_json(Api.ANTHROPIC, b"[1, 2]") is None


class TestText:
    def test_openai_text_is_the_first_choice_content(self) -> None:
        body = orjson.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})
        assert text_from_json(Api.OPENAI, body) == "hi"

    def test_anthropic_text_joins_text_blocks_and_skips_tool_use(self) -> None:
        body = orjson.dumps({"content": [{"type": "text", "text": "a"},
                                         {"type": "tool_use", "id": "t", "name": "f", "input": {}},
                                         {"type": "text", "text": "b"}]})
        assert text_from_json(Api.ANTHROPIC, body) == "ab"

    def test_missing_text_is_empty(self) -> None:
        assert text_from_json(Api.OPENAI, b'{"choices":[{"message":{"content":null}}]}') == ""
        assert text_from_json(Api.ANTHROPIC, b"garbage") == ""


class TestOpenAITap:
    def test_without_stripping_chunks_are_forwarded_unchanged_and_observed(self) -> None:
        tap = StreamTap(Api.OPENAI, strip_usage=False)
        out = tap_all(tap, OA_STREAM, [])
        assert out == OA_STREAM
        assert tap.usage == Usage(9, 3)
        assert tap.text == "Hello, world"
        assert tap.done

    def test_without_stripping_even_a_partial_frame_is_forwarded_at_once(self) -> None:
        tap = StreamTap(Api.OPENAI, strip_usage=False)
        assert tap.feed(OA_STREAM[:10]) == OA_STREAM[:10]

    def test_stripping_leaves_no_usage_anywhere_yet_the_tap_reports_it(self) -> None:
        tap = StreamTap(Api.OPENAI, strip_usage=True)
        out = tap_all(tap, OA_STREAM, [])
        assert b"usage" not in out
        assert tap.usage == Usage(9, 3)
        frames = [e.data for e in SSEParser().feed(out)]
        assert frames[-1] == b"[DONE]"
        chunks = [orjson.loads(d) for d in frames[:-1]]
        assert len(chunks) == 4
        assert all(c["choices"] for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello, world"

    def test_stripping_passes_frames_without_a_usage_key_through_byte_identical(self) -> None:
        frame = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
        tap = StreamTap(Api.OPENAI, strip_usage=True)
        assert tap.feed(frame + b"data: [DONE]\n\n") == frame + b"data: [DONE]\n\n"

    def test_stripping_forwards_complete_frames_and_holds_only_the_partial_tail(self) -> None:
        tap = StreamTap(Api.OPENAI, strip_usage=True)
        first = oa_chunk({"content": "Hello"})
        out = tap.feed(first + b'data: {"id":')
        assert out.startswith(b"data: ") and b"Hello" in out
        assert tap.finish() == b'data: {"id":'

    @given(st.lists(st.integers(min_value=0, max_value=len(OA_STREAM)), max_size=10))
    def test_any_split_strips_the_same_way(self, cuts: list[int]) -> None:
        expected = tap_all(StreamTap(Api.OPENAI, strip_usage=True), OA_STREAM, [])
        tap = StreamTap(Api.OPENAI, strip_usage=True)
        assert tap_all(tap, OA_STREAM, cuts) == expected
        assert (tap.usage, tap.text, tap.done) == (Usage(9, 3), "Hello, world", True)

    def test_a_stream_cut_short_is_not_done(self) -> None:
        tap = StreamTap(Api.OPENAI, strip_usage=False)
        tap.feed(oa_chunk({"content": "x"}))
        assert not tap.done and tap.usage is None


class TestAnthropicTap:
    def test_usage_is_message_start_input_plus_message_delta_output(self) -> None:
        tap = StreamTap(Api.ANTHROPIC, strip_usage=True)
        out = tap_all(tap, AN_STREAM, [])
        assert out == AN_STREAM  # never stripped
        assert tap.usage == Usage(30, 15)
        assert tap.text == "Hello, world"
        assert tap.done

    def test_nonzero_input_tokens_in_message_delta_win(self) -> None:
        stream = AN_STREAM.replace(b'{"output_tokens":15}', b'{"input_tokens":40,"output_tokens":15}')
        tap = StreamTap(Api.ANTHROPIC, strip_usage=False)
        tap_all(tap, stream, [])
        assert tap.usage == Usage(40, 15)

    @given(st.lists(st.integers(min_value=0, max_value=len(AN_STREAM)), max_size=10))
    def test_any_split_gives_the_same_observations(self, cuts: list[int]) -> None:
        tap = StreamTap(Api.ANTHROPIC, strip_usage=False)
        assert tap_all(tap, AN_STREAM, cuts) == AN_STREAM
        assert (tap.usage, tap.text, tap.done) == (Usage(30, 15), "Hello, world", True)
