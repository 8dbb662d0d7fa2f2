"""The one-message request path through the real Envoy: what each kind of call costs extproc.

Counted from Envoy's own ext_proc statistics (messages Envoy sent, streams it opened, for the
downstream filter and the response filter). The provider gets the provider's credential, which
Envoy injects from an SDS secret, and never the caller's; the config Envoy runs holds neither.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from crdgol.stack import Stack

KEY = "sk-crdgol-quickstart"
CHAT = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hello"}]}


def ext_proc_stats(stack: Stack) -> dict[str, int]:
    text = httpx.get(f"http://127.0.0.1:{stack.admin_port}/stats?filter=ext_proc", timeout=5).text
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit() and (name.endswith("stream_msgs_sent") or name.endswith("streams_started")):
            kind = "response" if ".ext_proc.response." in name else "request"
            out[f"{kind}.{name.rsplit('.', 1)[1]}"] = out.get(f"{kind}.{name.rsplit('.', 1)[1]}", 0) + int(value)
    return out


def cost(stack: Stack, path: str, body: dict[str, Any] | None, **headers: str) -> tuple[httpx.Response, dict[str, int]]:
    """One call and the ext_proc messages and streams it cost."""
    before = ext_proc_stats(stack)
    r = httpx.post(f"{stack.url}{path}", json=body, headers={"authorization": f"Bearer {KEY}", **headers}, timeout=10)
    time.sleep(0.1)  # Envoy counts a stream's last message after the client has its answer
    after = ext_proc_stats(stack)
    return r, {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_a_call_whose_response_needs_nothing_costs_one_message(quickstart: Stack) -> None:
    r, used = cost(quickstart, "/v1/chat/completions", CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}
    # A stream whose client asked for usage: still one, however many chunks.
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    r, used = cost(quickstart, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]") and '"usage"' in r.text
    assert used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}


def test_the_provider_gets_the_injected_credential_and_never_the_callers(quickstart: Stack) -> None:
    httpx.delete(f"{quickstart.mock_url}/_mock/requests")
    r = httpx.post(
        f"{quickstart.url}/v1/chat/completions", json=CHAT, headers={"x-api-key": KEY, "authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert r.status_code == 200
    [seen] = httpx.get(f"{quickstart.mock_url}/_mock/requests").json()
    assert seen["headers"]["authorization"] == "Bearer sk-mock-provider" and "x-api-key" not in seen["headers"]
    assert seen["body"]["model"] == "mock-gpt" and seen["path"] == "/v1/chat/completions"
    assert not any(h.startswith("x-crdgol-") for h in seen["headers"])
    config = httpx.get(f"http://127.0.0.1:{quickstart.admin_port}/config_dump", timeout=5).text
    assert "sk-mock-provider" not in config  # Envoy's own dump redacts the SDS secret


def test_a_response_extproc_needs_comes_on_the_response_filters_stream(quickstart: Stack) -> None:
    # An Anthropic-API call to the quickstart's OpenAI backend: the answer is translated.
    body = {**CHAT, "max_tokens": 20}
    r, used = cost(quickstart, "/v1/messages", body, **{"anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.json()["type"] == "message" and r.json()["usage"]["input_tokens"] > 0
    assert used == {"request.stream_msgs_sent": 1, "request.streams_started": 1, "response.stream_msgs_sent": 2, "response.streams_started": 1}
    # A provider's error: mapped and sanitized there too.
    r, used = cost(quickstart, "/v1/chat/completions", CHAT, **{"x-mock-fail-status": "401", "x-mock-echo-credential": "1"})
    assert r.status_code == 502 and "sk-mock-provider" not in r.text
    assert used["response.streams_started"] == 1


def session_call(stack: Stack, session: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {KEY}", "x-session-id": session, **headers}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body or CHAT, headers=h, timeout=10)


def metric(stack: Stack, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def settled(stack: Stack, before: float, grown_by: float) -> float:
    """The token usage extproc has counted, once it grew by ``grown_by`` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and metric(stack, "gen_ai_client_token_usage_sum") - before < grown_by:
        time.sleep(0.05)
    time.sleep(0.3)  # anything counted twice would have arrived by now
    return metric(stack, "gen_ai_client_token_usage_sum") - before


def test_a_call_naming_a_session_costs_two_messages_on_one_stream_and_keeps_history(quickstart: Stack) -> None:
    tokens = metric(quickstart, "gen_ai_client_token_usage_sum")
    first, used = cost(quickstart, "/v1/chat/completions", CHAT, **{"x-session-id": "one-message-test"})
    assert first.status_code == 200
    # The body (headers as attributes), then the response body: its headers are skipped.
    assert used == {"request.stream_msgs_sent": 2, "request.streams_started": 1}
    second = session_call(quickstart, "one-message-test")
    assert second.status_code == 200 and second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]
    assert "x-crdgol-backend" not in second.headers
    # Counted once each: this stream settled them, and the access log did not again.
    spent = sum(r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] for r in (first, second))
    assert settled(quickstart, tokens, spent) == spent


def test_a_failed_session_answer_is_mapped_and_joins_no_history(quickstart: Stack) -> None:
    failed, used = cost(quickstart, "/v1/chat/completions", CHAT, **{"x-session-id": "failing", "x-mock-fail-status": "401", "x-mock-echo-credential": "1"})
    assert failed.status_code == 502 and "sk-mock-provider" not in failed.text
    assert used["request.stream_msgs_sent"] == 2 and used["response.streams_started"] == 1  # mapped by the response filter
    after = session_call(quickstart, "failing")
    fresh = session_call(quickstart, "never-used")
    assert after.status_code == fresh.status_code == 200
    assert after.json()["usage"]["prompt_tokens"] == fresh.json()["usage"]["prompt_tokens"]  # nothing was remembered


def test_a_streamed_session_answer_arrives_chunk_by_chunk_and_joins_history(quickstart: Stack) -> None:
    httpx.post(f"{quickstart.mock_url}/_mock/config", json={"chunk_delay_ms": 150}, timeout=5).raise_for_status()
    body = {**CHAT, "stream": True}
    arrivals: list[float] = []
    text = ""
    started = time.monotonic()
    headers = {"authorization": f"Bearer {KEY}", "x-session-id": "streamed"}
    with httpx.stream("POST", f"{quickstart.url}/v1/chat/completions", json=body, headers=headers, timeout=20) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            arrivals.append(time.monotonic() - started)
            text += chunk.decode()
    httpx.post(f"{quickstart.mock_url}/_mock/config", json={"chunk_delay_ms": 0}, timeout=5).raise_for_status()
    assert text.rstrip().endswith("data: [DONE]") and '"usage"' not in text  # the forced usage chunk is stripped
    # Each chunk reached the client when the provider sent it, not all at the end.
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 0.3
    first_gap = arrivals[1] - arrivals[0]
    assert first_gap > 0.1, arrivals
    after = session_call(quickstart, "streamed")
    fresh = session_call(quickstart, "not-streamed-before")
    assert after.json()["usage"]["prompt_tokens"] > fresh.json()["usage"]["prompt_tokens"]


def test_a_refusal_and_a_bodyless_call_cost_one_message_or_none(quickstart: Stack) -> None:
    r, used = cost(quickstart, "/v1/chat/completions", CHAT, authorization="Bearer sk-nope")
    assert r.status_code == 401 and used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}
    before = ext_proc_stats(quickstart)
    r = httpx.post(f"{quickstart.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is empty: send a JSON object"
    assert ext_proc_stats(quickstart) == before  # never reached extproc, nor a provider
