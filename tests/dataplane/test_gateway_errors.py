"""Bad input gets a precise 4xx with an OpenAI-shaped body; never a hang or a bare 500."""

from __future__ import annotations

import httpx

from tests.conftest import ACME_KEY, Gateway
from tests.dataplane.test_gateway_auth import error_of


def post(gw: Gateway, content: bytes, ctype: str = "application/json", path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(
        f"{gw.url}{path}",
        content=content,
        headers={"authorization": f"Bearer {ACME_KEY}", "content-type": ctype},
        timeout=30,
    )


def test_malformed_json_is_400(gw: Gateway) -> None:
    r = post(gw, b'{"model": "chat", ')
    assert r.status_code == 400
    assert error_of(r)["code"] == "invalid_json"


def test_a_missing_model_is_400_and_an_unknown_model_is_404(gw: Gateway) -> None:
    r = post(gw, b'{"messages": [{"role": "user", "content": "x"}]}')
    assert r.status_code == 400 and error_of(r)["code"] == "missing_model"
    r = post(gw, b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}')
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


def test_missing_or_empty_messages_is_400(gw: Gateway) -> None:
    assert post(gw, b'{"model": "chat", "messages": []}').status_code == 400
    assert post(gw, b'{"model": "chat"}').status_code == 400


def test_a_wrong_content_type_is_415(gw: Gateway) -> None:
    r = post(gw, b"model=chat", ctype="application/x-www-form-urlencoded")
    assert r.status_code == 415
    assert error_of(r)["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413_with_a_json_error(gw: Gateway) -> None:
    big = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"a" * (5 * 1024 * 1024) + b'"}]}'
    r = post(gw, big)
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"


def test_an_unknown_path_is_404_and_a_wrong_method_is_405(gw: Gateway) -> None:
    r = httpx.get(f"{gw.url}/v2/whatever", headers={"authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = httpx.get(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {ACME_KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert error_of(r)["type"] == "invalid_request_error"


def test_anthropic_messages_needs_max_tokens_and_answers_in_anthropic_shape(gw: Gateway) -> None:
    r = post(gw, b'{"model": "claude", "messages": [{"role": "user", "content": "x"}]}', path="/v1/messages")
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_a_bad_session_id_is_400(gw: Gateway) -> None:
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {ACME_KEY}", "x-session-id": "bad id with spaces"},
    )
    assert r.status_code == 400


def test_a_backend_failing_on_every_attempt_gives_a_5xx_with_a_json_body(gw: Gateway) -> None:
    r = gw.chat("all-fail")
    assert r.status_code == 503
    assert error_of(r)["type"] == "server_error"


def test_a_backend_slower_than_the_timeout_gives_504_with_a_json_body(gw: Gateway) -> None:
    r = gw.chat("slow")
    assert r.status_code == 504
    assert error_of(r)["code"] == "upstream_timeout"
