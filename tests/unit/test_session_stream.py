"""A session call's answer on its request's own stream (``extproc.session_stream``), in pieces:
a JSON answer that comes in several chunks is read whole at its end, and passes unchanged as it
comes unless it is translated; the access log is told once that this stream accounts for it."""

from __future__ import annotations

import json

from crdgol.usage_log import SETTLE_NAMESPACE
from extproc.phases import PASS, Continue
from extproc.policy import Api
from extproc.readers import ResponseReader
from extproc.session_stream import SessionAnswer
from tests.unit.request_path import openai_completion


def test_a_json_answer_in_chunks_passes_as_it_comes_and_is_read_whole_at_its_end() -> None:
    reader = ResponseReader(Api.OPENAI, Api.OPENAI, "alias", observe=True)
    reader.start(200, "application/json")
    answer = SessionAnswer(reader)
    raw = openai_completion(text="remember me")
    parts = [raw[:10], raw[10:30], raw[30:]]
    out = [answer.body(reader, p, i == len(parts) - 1) for i, p in enumerate(parts)]
    assert out == parts
    assert reader.text == "remember me" and reader.usage is not None and reader.usage.input_tokens == 7


def test_a_translated_json_answer_is_held_and_sent_whole_in_the_clients_api() -> None:
    reader = ResponseReader(Api.OPENAI, Api.ANTHROPIC, "alias", observe=True)
    reader.start(200, "application/json")
    answer = SessionAnswer(reader)
    raw = openai_completion(text="translated")
    assert answer.body(reader, raw[:25], False) == b""
    whole = json.loads(answer.body(reader, raw[25:], True))
    assert whole["type"] == "message" and whole["content"][0]["text"] == "translated" and whole["model"] == "alias"


def test_a_stream_is_read_frame_by_frame_and_the_access_log_is_told_once() -> None:
    reader = ResponseReader(Api.OPENAI, Api.OPENAI, "alias", include_usage=True, observe=True)
    reader.start(200, "text/event-stream")
    answer = SessionAnswer(reader)
    frame = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    assert answer.body(reader, frame, False) == frame and reader.text == "hi"
    first = answer.mark(PASS)
    assert isinstance(first, Continue) and first is not PASS
    assert first.dynamic_metadata == {SETTLE_NAMESPACE: {"handled": "1"}}
    assert answer.mark(PASS) is PASS
