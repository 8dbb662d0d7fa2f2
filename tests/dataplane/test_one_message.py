"""The one-message request path through the real Envoy: what each kind of call costs extproc.

Counted from Envoy's own ext_proc statistics (messages Envoy sent, streams it opened, for the
downstream filter and the response filter). The provider gets the provider's credential, which
Envoy injects from an SDS secret, and never the caller's; the config Envoy runs holds neither.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

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


def test_a_call_naming_a_session_goes_on_one_stream_with_its_headers(quickstart: Stack) -> None:
    first, used = cost(quickstart, "/v1/chat/completions", CHAT, **{"x-session-id": "one-message-test"})
    assert first.status_code == 200
    assert used == {"request.stream_msgs_sent": 2, "request.streams_started": 1}
    second = httpx.post(
        f"{quickstart.url}/v1/chat/completions",
        json=CHAT,
        headers={"authorization": f"Bearer {KEY}", "x-session-id": "one-message-test"},
        timeout=10,
    )
    assert second.status_code == 200 and second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"]


def test_a_refusal_and_a_bodyless_call_cost_one_message_or_none(quickstart: Stack) -> None:
    r, used = cost(quickstart, "/v1/chat/completions", CHAT, authorization="Bearer sk-nope")
    assert r.status_code == 401 and used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}
    before = ext_proc_stats(quickstart)
    r = httpx.post(f"{quickstart.url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is empty: send a JSON object"
    assert ext_proc_stats(quickstart) == before  # never reached extproc, nor a provider
