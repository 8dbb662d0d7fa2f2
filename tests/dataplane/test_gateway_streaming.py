"""Streaming: SSE through Envoy, usage forced upstream and stripped again, translation."""

from __future__ import annotations

import json

import httpx

from tests.conftest import ACME_KEY, Gateway


def sse_data(r: httpx.Response) -> list[str]:
    return [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]


def stream_chat(gw: Gateway, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "stream please"}], **extra}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r


def joined(frames: list[str]) -> str:
    out = []
    for f in frames:
        if f == "[DONE]":
            continue
        for ch in json.loads(f).get("choices", []):
            out.append(ch["delta"].get("content") or "")
    return "".join(out)


OUTPUT_SERIES = 'crdgol_tokens_total{backend="crdgol-be.team-a.chat.primary",binding="team-a/chat",tenant="team-a/acme",type="output"}'


def counter(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_stream_without_include_usage_carries_no_usage_but_is_metered(gw: Gateway) -> None:
    before = counter(gw.metrics(), OUTPUT_SERIES)
    r = stream_chat(gw, "chat")
    frames = sse_data(r)
    assert frames[-1] == "[DONE]"
    assert all("usage" not in json.loads(f) for f in frames[:-1])
    assert "model=mock-gpt" in joined(frames)
    # The usage the client never saw was still charged: the tenant's output tokens went up.
    assert counter(gw.metrics(), OUTPUT_SERIES) > before


def test_a_stream_with_include_usage_keeps_the_usage_chunk(gw: Gateway) -> None:
    frames = sse_data(stream_chat(gw, "chat", stream_options={"include_usage": True}))
    usage = [json.loads(f)["usage"] for f in frames[:-1] if json.loads(f).get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] > 0


def test_an_anthropic_stream_is_translated_into_openai_chunks(gw: Gateway) -> None:
    frames = sse_data(stream_chat(gw, "claude"))
    assert frames[-1] == "[DONE]"
    text = joined(frames)
    assert "model=mock-claude" in text and "last=stream please" in text
    assert all(json.loads(f)["object"] == "chat.completion.chunk" for f in frames[:-1])


def test_an_anthropic_client_streams_from_an_openai_backend(gw: Gateway) -> None:
    r = httpx.post(
        f"{gw.url}/v1/messages",
        json={"model": "chat", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    events = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    deltas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    text = "".join(d["delta"].get("text", "") for d in deltas if d["type"] == "content_block_delta")
    assert "model=mock-gpt" in text
    final = next(d for d in deltas if d["type"] == "message_delta")
    assert final["usage"]["output_tokens"] > 0


def test_chunks_arrive_as_the_upstream_sends_them(gw: Gateway) -> None:
    """With 150 ms between upstream chunks, the client sees the first chunk long before the end."""
    import time

    httpx.post(f"{gw.mock_url}/_mock/config", json={"chunk_delay_ms": 150})
    try:
        body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "slowly"}]}
        start = time.monotonic()
        arrivals, frames = [], []
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic() - start)
                    frames.append(line)
    finally:
        httpx.post(f"{gw.mock_url}/_mock/config", json={"chunk_delay_ms": 0})
    assert len(arrivals) >= 4
    assert arrivals[0] < arrivals[-1] - 0.3, arrivals
    # Every chunk went through the usage tap: none carries the forced usage fields.
    assert frames[-1] == "data: [DONE]" and not any('"usage"' in f for f in frames)
