"""Every bad input gets an answer: the right status and JSON in the client API's shape, through real Envoy.

Envoy's own protocol errors (HTTP/1.0, oversized or too many headers, NUL bytes, Content-Length
with Transfer-Encoding, HTTP/2 oversized headers), WebSocket upgrades, slow clients, providers'
errors (mapped, never echoing a credential) and absurdly nested JSON.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ACME_KEY, PROVIDER_KEY, Gateway

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def raw_exchange(gw: Gateway, request: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are and read one answer (to its content-length, or until Envoy closes)."""
    with socket.create_connection(("127.0.0.1", gw.stack.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        assert data, "no response at all"
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", "-1"))
        while (length < 0 or len(body) < length) and (chunk := s.recv(65536)):
            body += chunk
    return int(lines[0].split()[1]), headers, body


def openai_error(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers.get("content-type", "").startswith("application/json"), headers
    err = json.loads(body)["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"], err
    return dict(err)


def anthropic_error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert body["type"] == "error" and body["error"]["message"], body
    return dict(body["error"])


GET = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /v1/models HTTP/1.0\r\n\r\n", 505, "http_version_not_supported"),
        (GET + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n", 431, "request_headers_too_large"),
        (GET + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431, "request_headers_too_large"),
        (GET + b"".join(b"X-H%d: a\r\n" % i for i in range(150)) + b"\r\n", 431, "request_headers_too_large"),
        (GET + b"".join(b"X-H%d: a\r\n" % i for i in range(400)) + b"\r\n", 431, "request_headers_too_large"),
        (GET + b"Authorization: Bearer " + b"a" * 65_536 + b"\r\n\r\n", 431, "request_headers_too_large"),
        (GET + b"X-A: a\x00b\r\n\r\n", 400, "bad_request"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"HELLO\r\n\r\n", 400, "bad_request"),
    ],
    ids=["http1.0", "headers-40k", "headers-200k", "150-headers", "400-headers", "jwt-64k", "nul", "cl-and-te", "garbage"],
)
def test_an_http1_protocol_error_gets_a_json_answer(gw: Gateway, request_bytes: bytes, status: int, code: str) -> None:
    got, headers, body = raw_exchange(gw, request_bytes)
    assert got == status, body
    assert openai_error(headers, body)["code"] == code


def test_http2_oversized_or_too_many_headers_get_a_431_in_the_clients_shape(gw: Gateway) -> None:
    with httpx.Client(http1=False, http2=True, base_url=gw.url, timeout=30) as c:
        ok = c.get("/v1/models", headers={"authorization": f"Bearer {ACME_KEY}"})
        assert ok.status_code == 200 and ok.http_version == "HTTP/2"
        big = c.get("/v1/models", headers={"x-big": "a" * 40_000})
        assert big.status_code == 431 and big.json()["error"]["code"] == "request_headers_too_large"
        many = c.post("/v1/messages", json=MESSAGES, headers={f"x-h{i}": "a" for i in range(150)})
        assert many.status_code == 431 and anthropic_error(many)["type"] == "invalid_request_error"
        # The connection survives a refused stream.
        assert c.get("/v1/models", headers={"authorization": f"Bearer {ACME_KEY}"}).status_code == 200


UPGRADE = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_a_websocket_upgrade_is_a_clear_400_in_the_clients_shape(gw: Gateway) -> None:
    r = httpx.get(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {ACME_KEY}", **UPGRADE})
    assert r.status_code == 400 and r.json()["error"]["code"] == "upgrade_not_supported"
    assert "WebSocket" in r.json()["error"]["message"]
    r = httpx.get(f"{gw.url}/v1/messages", headers={"authorization": f"Bearer {ACME_KEY}", **UPGRADE})
    assert r.status_code == 400 and anthropic_error(r)["code"] == "upgrade_not_supported"


def test_envoys_own_replies_on_v1_messages_are_anthropic_shaped(gw: Gateway) -> None:
    big = {**MESSAGES, "messages": [{"role": "user", "content": "a" * (5 * 1024 * 1024)}]}
    r = httpx.post(f"{gw.url}/v1/messages", json=big, headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=30)
    assert r.status_code == 413 and anthropic_error(r)["type"] == "request_too_large"


def call(gw: Gateway, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {ACME_KEY}", **headers}
    return httpx.post(f"{gw.url}{path}", json=body, headers=h, timeout=30)


def assert_no_credential(r: httpx.Response) -> None:
    seen = r.text + json.dumps(dict(r.headers))
    assert PROVIDER_KEY not in seen and PROVIDER_KEY[3:] not in seen, seen


def test_a_provider_refusing_the_gateways_credential_is_a_502_that_never_shows_it(gw: Gateway) -> None:
    echo = {"x-mock-fail-status": "401", "x-mock-echo-credential": "1"}
    r = call(gw, "/v1/chat/completions", CHAT, **echo)
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "upstream_auth_failed" and "gateway's credential" in err["message"]
    assert_no_credential(r)
    r = call(gw, "/v1/messages", MESSAGES, **{**echo, "x-mock-fail-status": "403"})
    assert r.status_code == 502 and anthropic_error(r)["code"] == "upstream_auth_failed"
    assert_no_credential(r)


def test_a_providers_own_explanation_of_a_bad_request_reaches_the_caller_redacted(gw: Gateway) -> None:
    r = call(gw, "/v1/chat/completions", CHAT, **{"x-mock-fail-status": "422", "x-mock-echo-credential": "1"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "injected failure 422" in err["message"]
    assert "[redacted]" in err["message"]
    assert_no_credential(r)


@pytest.mark.parametrize(
    ("provider_status", "status", "code"),
    [(404, 502, "upstream_not_found"), (500, 502, "upstream_error"), (503, 503, "upstream_unavailable"), (429, 429, "upstream_rate_limited")],
)
def test_provider_errors_are_mapped_to_what_they_mean_for_the_caller(gw: Gateway, provider_status: int, status: int, code: str) -> None:
    r = call(gw, "/v1/chat/completions", CHAT, **{"x-mock-fail-status": str(provider_status)})
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert "injected" not in r.text  # a fixed message: provider internals stay out


def test_a_deeply_nested_field_is_a_400_not_a_500(gw: Gateway) -> None:
    depth = 600  # orjson reads it, cannot write it back
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * depth + b"]" * depth + b"}"
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", content=body, headers={"authorization": f"Bearer {ACME_KEY}", "content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_client_too_slow_to_send_its_headers_gets_a_408(gw: Gateway) -> None:
    started = time.monotonic()
    status, headers, body = raw_exchange(gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
    assert status == 408 and openai_error(headers, body)["code"] == "request_timeout"
    assert 9 <= time.monotonic() - started < 20  # request_headers_timeout is 10 s


def test_a_fallback_backends_error_is_translated_mapped_and_redacted_too(gw: Gateway) -> None:
    # fallback-dead: the first backend refuses connections, the Anthropic-speaking rescue answers
    # through the upstream filter (translated to OpenAI) and quotes the credential it was sent.
    body = {**CHAT, "model": "fallback-dead"}
    r = call(gw, "/v1/chat/completions", body, **{"x-mock-fail-status": "422", "x-mock-echo-credential": "1"})
    assert r.status_code == 400, r.text
    assert "injected failure 422" in r.json()["error"]["message"]
    assert_no_credential(r)
    r = call(gw, "/v1/chat/completions", body, **{"x-mock-fail-status": "401", "x-mock-echo-credential": "1"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    assert_no_credential(r)
