"""Routing: model rewrite, credential swap, API translation, weighted backends and fallback."""

from __future__ import annotations

import time
from collections import Counter

import httpx

from tests.conftest import ACME_KEY, PROVIDER_KEY, Gateway


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_the_model_name_is_rewritten_for_the_backend(gw: Gateway) -> None:
    assert "model=mock-gpt " in content(gw.chat("chat"))


def test_the_provider_credential_replaces_the_clients_key(gw: Gateway) -> None:
    gw.clear_upstream()
    assert gw.chat("chat", "credential check").status_code == 200
    seen = [r for r in gw.upstream_requests() if r["path"] == "/v1/chat/completions"][-1]
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert ACME_KEY not in str(seen)
    assert not any(h.startswith("x-crdgol-") for h in headers)


def test_an_openai_client_is_served_by_an_anthropic_backend(gw: Gateway) -> None:
    gw.clear_upstream()
    r = gw.chat("claude", "translate me")
    text = content(r)
    assert r.json()["object"] == "chat.completion"
    assert "model=mock-claude" in text and "last=translate me" in text
    seen = gw.upstream_requests()[-1]
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == PROVIDER_KEY  # type: ignore[index]
    assert r.json()["usage"]["prompt_tokens"] > 0


def test_an_anthropic_client_is_served_by_an_openai_backend(gw: Gateway) -> None:
    r = httpx.post(
        f"{gw.url}/v1/messages",
        json={"model": "chat", "max_tokens": 64, "system": "client system", "messages": [{"role": "user", "content": "hello claude"}]},
        headers={"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "message"
    text = body["content"][0]["text"]
    assert "model=mock-gpt" in text and "last=hello claude" in text
    assert "client system" in text  # the client's own system prompt is kept
    assert body["usage"]["output_tokens"] > 0


def test_a_connect_failure_falls_back_to_the_next_priority_with_its_own_model(gw: Gateway) -> None:
    text = content(gw.chat("fallback-dead", "are you there"))
    assert "model=rescue-claude" in text


def test_a_5xx_falls_back_to_the_next_priority(gw: Gateway) -> None:
    text = content(gw.chat("fallback-503"))
    assert "model=rescue-gpt" in text and text.startswith("[mock]")


def test_a_429_falls_back_to_the_next_priority(gw: Gateway) -> None:
    text = content(gw.chat("fallback-429"))
    assert "model=rescue-gpt" in text


def test_a_429_on_the_last_backend_reaches_the_client_as_429(gw: Gateway) -> None:
    r = gw.chat("limited")
    assert r.status_code == 429
    assert r.json()["error"]["message"]


def test_weighted_backends_in_one_priority_share_the_traffic(gw: Gateway) -> None:
    seen = Counter()
    for _ in range(40):
        text = content(gw.chat("split"))
        seen["a" if "model=split-a" in text else "b"] += 1
    assert seen["a"] >= 8 and seen["b"] >= 8, seen


def test_embeddings_are_routed_and_metered(gw: Gateway) -> None:
    with gw.client() as c:
        r = c.post("/v1/embeddings", json={"model": "embed", "input": ["one", "two"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["data"]) == 2 and body["usage"]["prompt_tokens"] > 0
    # Usage is counted from Envoy's access log, within its flush interval of the response.
    deadline = time.monotonic() + 2
    while 'gen_ai_operation_name="embeddings"' not in (text := gw.metrics()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 'gen_ai_operation_name="embeddings"' in text
