"""Response readers: for every (backend API, client API) pair, the client's bytes and what the
response says (usage, the provider's model, the reply text) come out of one parse per frame."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from extproc.phases import BUFFERED, STREAMED
from extproc.policy import Api
from extproc.readers import ResponseReader, metric_model, read_body
from extproc.usage import Usage
from mockllm import wire

REPLY = "the quick brown fox jumps over the lazy dog"
OA, AN = Api.OPENAI, Api.ANTHROPIC
PAIRS = list(itertools.product((OA, AN), (OA, AN)))


def backend_json(api: Api) -> bytes:
    if api is OA:
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        return orjson.dumps(wire.openai_completion("provider-model-1", REPLY, usage))
    return orjson.dumps(wire.anthropic_message("provider-model-1", REPLY, 11, 7))


def backend_stream(api: Api) -> list[bytes]:
    if api is OA:
        usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
        return wire.openai_stream("provider-model-1", REPLY, usage, include_usage=True)
    return wire.anthropic_stream("provider-model-1", REPLY, 11, 7)


@pytest.fixture
def loads_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts every orjson.loads the code under test makes."""
    calls = [0]
    real: Callable[[Any], Any] = orjson.loads

    def counting(data: Any) -> Any:
        calls[0] += 1
        return real(data)

    monkeypatch.setattr(orjson, "loads", counting)
    yield calls


@pytest.mark.parametrize(("backend", "client"), PAIRS)
def test_a_json_body_is_parsed_once_for_bytes_usage_model_and_text(backend: Api, client: Api, loads_calls: list[int]) -> None:
    reader = ResponseReader(backend, client, "alias", observe=True)
    assert reader.start(200, "application/json") == int(BUFFERED)
    raw = backend_json(backend)
    out = reader.body(raw, True)
    assert loads_calls[0] == 1
    assert (reader.usage, reader.model, reader.text, reader.done) == (Usage(11, 7), "provider-model-1", REPLY, True)
    if backend is client:
        assert out is raw  # untouched, not re-serialised
    else:
        doc = orjson.loads(out)
        assert doc["model"] == "alias"  # the client sees the name it called
        assert reader.rewrites


@pytest.mark.parametrize(("backend", "client"), PAIRS)
@pytest.mark.parametrize("split", [1, 7, 1000])
def test_a_stream_is_parsed_once_per_frame(backend: Api, client: Api, split: int, loads_calls: list[int]) -> None:
    reader = ResponseReader(backend, client, "alias", observe=True)
    assert reader.start(200, "text/event-stream; charset=utf-8") == int(STREAMED)
    data = b"".join(backend_stream(backend))
    json_frames = sum(1 for f in backend_stream(backend) if b"data: {" in f)
    out = b"".join(reader.body(data[i : i + split], False) for i in range(0, len(data), split)) + reader.body(b"", True)
    assert loads_calls[0] == json_frames
    assert (reader.usage, reader.model, reader.text, reader.done) == (Usage(11, 7), "provider-model-1", REPLY, True)
    if client is OA:
        assert out.endswith(b"data: [DONE]\n\n")
    else:
        assert out.rstrip().endswith(b'data: {"type":"message_stop"}')


@pytest.mark.parametrize("backend", [OA, AN])
def test_an_openai_client_that_did_not_ask_for_usage_gets_none_yet_it_is_metered(backend: Api) -> None:
    reader = ResponseReader(backend, OA, "alias", include_usage=False, observe=True)
    reader.start(200, "text/event-stream")
    out = reader.body(b"".join(backend_stream(backend)), True)
    assert b'"usage"' not in out
    assert reader.usage == Usage(11, 7)
    assert reader.rewrites


@pytest.mark.parametrize(("backend", "client"), [(AN, OA), (OA, AN)])
def test_a_translator_makes_up_no_usage_when_the_provider_reported_none(backend: Api, client: Api) -> None:
    if backend is OA:  # a compatible server that ignores stream_options.include_usage
        frames = wire.openai_stream("provider-model-1", REPLY, {}, include_usage=False)
    else:  # message_start and message_delta without their usage blocks
        frames = [f.replace(b',"usage":{"input_tokens":11,"output_tokens":1}', b"").replace(b',"usage":{"output_tokens":7}', b"")
                  for f in backend_stream(backend)]
    reader = ResponseReader(backend, client, "alias", observe=True)
    reader.start(200, "text/event-stream")
    out = reader.body(b"".join(frames), True)
    assert reader.text == REPLY and len(out) > 100  # the stream itself went through
    assert reader.usage is None


def test_the_per_attempt_filter_only_reads_what_it_translates() -> None:
    same = ResponseReader(OA, OA, "alias")
    assert same.start(200, "application/json") is None and same.start(200, "text/event-stream") is None
    error = ResponseReader(AN, OA, "alias")
    assert error.start(529, "application/json") == int(BUFFERED)
    out = orjson.loads(error.body(b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}', True))
    assert out["error"]["message"] == "busy"
    observing = ResponseReader(OA, OA, "alias", observe=True)
    assert observing.start(503, "application/json") is None  # an error's usage is not read


def test_a_body_that_is_not_json() -> None:
    assert read_body(OA, OA, "alias", b"<html>").body == b"<html>"
    translated = orjson.loads(read_body(AN, OA, "alias", b"<html>").body)
    assert "error" in translated and read_body(AN, OA, "alias", b"<html>").usage is None


def test_the_metric_label_is_the_reported_model_when_it_looks_like_one() -> None:
    assert metric_model("gpt-4o-2024-08-06", "gpt-4o") == "gpt-4o-2024-08-06"
    assert metric_model("", "gpt-4o") == "gpt-4o"
    assert metric_model("x" * 500, "gpt-4o") == "gpt-4o"
    assert metric_model('evil"} 1\nfake_metric{', "gpt-4o") == "gpt-4o"
