"""The charge rule through real Envoy: an answered request is charged, whatever happens to it.

Each binding here has its own small request quota per hour, so what a test's requests were
charged shows in the limit it runs into and in the ``x-ratelimit-*`` headers. The mock upstream's
``x-mock-fault`` header breaks an answer after it has begun (``mockllm.faults``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from crdgol.stack import Stack, StackSettings

KEY = "sk-charging-test"
TOKENS = 1_000_000


def _binding(name: str, requests_per_hour: int) -> dict[str, object]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": "charging"},
        "spec": {
            "model": name,
            "tenants": ["payer"],
            "backends": [
                {
                    "name": "mock",
                    "provider": "openai-compatible",
                    "endpoint": "http://127.0.0.1:{MOCK}/v1",
                    "model": "mock-gpt",
                    "credentialsRef": {"name": "provider", "key": "apiKey"},
                }
            ],
            "quotas": {
                "tenants": {
                    "payer": {
                        "requests": [{"amount": requests_per_hour, "per": "hour"}],
                        "tokens": [{"amount": TOKENS, "per": "hour", "type": "total"}],
                        "defaultMaxTokens": 64,
                    }
                }
            },
        },
    }


SECRETS = f"""
apiVersion: v1
kind: Secret
metadata: {{name: payer-key, namespace: charging, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: payer}}}}
stringData: {{key: {KEY}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: provider, namespace: charging}}
stringData: {{apiKey: sk-mock}}
"""

BINDINGS = {"aborted": 5, "reset": 3, "invalid": 3, "no-usage": 3, "early": 3, "streamed-no-usage": 3, "unreachable": 3, "timeout": 3}


def _variant(name: str, doc: dict[str, object]) -> dict[str, object]:
    """The bindings whose backend never answers: a closed port, or a 1 s timeout."""
    spec = doc["spec"]
    assert isinstance(spec, dict)
    if name == "unreachable":
        spec["backends"][0]["endpoint"] = "http://127.0.0.1:9/v1"
    if name == "timeout":
        spec["timeouts"] = {"request": "1s", "perTry": "1s"}
        spec["retry"] = {"attempts": 0}
    return doc


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("charging")
    stack = Stack(StackSettings(manifests=folder, quiet=True))
    (folder / "secrets.yaml").write_text(SECRETS)
    docs = [json.dumps(_variant(n, _binding(n, k))).replace("{MOCK}", str(stack.mock_port)) for n, k in BINDINGS.items()]
    (folder / "bindings.yaml").write_text("\n---\n".join(docs))
    # Quota windows are hourly and epoch-aligned: keep this module's requests in one window.
    to_boundary = 3600 - time.time() % 3600
    if to_boundary < 60:
        time.sleep(to_boundary + 1)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def body(model: str, stream: bool = False) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 40}


def post(gw: Stack, model: str, stream: bool = False, **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body(model, stream), headers={"authorization": f"Bearer {KEY}", **headers}, timeout=30)


def reservation_of(first: httpx.Response) -> int:
    """Tokens one of a test's (identical) requests reserves: what the first one took."""
    return TOKENS - int(first.headers["x-ratelimit-remaining-tokens"])


def test_streams_the_client_abandons_mid_answer_are_charged(gw: Stack) -> None:
    httpx.post(f"{gw.mock_url}/_mock/config", json={"chunk_delay_ms": 150}, timeout=5)
    codes: list[int] = []
    try:
        with httpx.Client(timeout=30) as c:
            for _ in range(12):
                with c.stream("POST", f"{gw.url}/v1/chat/completions", json=body("aborted", True), headers={"authorization": f"Bearer {KEY}"}) as r:
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        lines = r.iter_lines()
                        assert next(lines).startswith("data: ")
                # Leaving the block closes the connection mid-stream: the client hung up.
    finally:
        httpx.post(f"{gw.mock_url}/_mock/config", json={"chunk_delay_ms": 0}, timeout=5)
    # 5 per hour: five answered (and abandoned), then refused. Before the rule, all 12 went through.
    assert codes == [200] * 5 + [429] * 7, codes


def _charged_at_reservation(gw: Stack, model: str, n: int, stream: bool, fault: str) -> None:
    first = None
    for _ in range(n):
        try:
            r = post(gw, model, stream, **{"x-mock-fault": fault})
            status = r.status_code
        except httpx.RemoteProtocolError:
            status = 200  # the answer began, then the upstream reset: the client saw a broken stream
            r = None
        assert status == 200, (fault, status)
        if first is None:
            assert r is not None, "the first answer's headers carry the reservation"
            first = r
    assert first is not None
    refused = post(gw, model, stream)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    # Every one of the n answers was charged exactly its reservation: no usage was ever seen.
    assert TOKENS - int(refused.headers["x-ratelimit-remaining-tokens"]) == n * reservation_of(first)


def test_an_upstream_reset_mid_stream_is_charged_its_reservation(gw: Stack) -> None:
    # httpx reads the whole (broken) body in post(): the reset surfaces as RemoteProtocolError
    # only after the headers, so the first request's headers are read with a streaming call.
    with httpx.Client(timeout=30) as c, c.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body("reset", True), headers={"authorization": f"Bearer {KEY}", "x-mock-fault": "reset-mid-stream"}
    ) as first:
        assert first.status_code == 200
        reserved = reservation_of(first)
        with pytest.raises(httpx.HTTPError):
            first.read()
    for _ in range(2):
        with pytest.raises(httpx.HTTPError):
            post(gw, "reset", True, **{"x-mock-fault": "reset-mid-stream"})
    refused = post(gw, "reset", True)
    assert refused.status_code == 429
    assert TOKENS - int(refused.headers["x-ratelimit-remaining-tokens"]) == 3 * reserved


def test_a_200_that_is_not_json_is_charged_its_reservation(gw: Stack) -> None:
    _charged_at_reservation(gw, "invalid", 3, stream=False, fault="invalid-json")


def test_an_answer_without_a_usage_block_is_charged_its_reservation(gw: Stack) -> None:
    _charged_at_reservation(gw, "no-usage", 3, stream=False, fault="no-usage")


def test_a_stream_without_a_usage_chunk_is_charged_its_reservation(gw: Stack) -> None:
    _charged_at_reservation(gw, "streamed-no-usage", 3, stream=True, fault="no-usage")


def test_a_client_gone_before_the_first_byte_of_a_slow_answer_is_charged_its_reservation(gw: Stack) -> None:
    # The mock takes 2 s to answer; the client gives up after 0.4 s. The provider had the request
    # (and would bill it); Envoy resets it upstream, so no usage ever comes back. Before: released,
    # a free request each time.
    for _ in range(2):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=body("early"),
                headers={"authorization": f"Bearer {KEY}", "x-mock-latency-ms": "2000"},
                timeout=0.4,
            )
    time.sleep(0.3)  # the charges run as the streams close
    r = post(gw, "early")  # the same body: the same reservation
    assert r.status_code == 200, r.text
    # 3 per hour: the two abandoned requests and this one.
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Each abandoned request was charged this request's reservation (its prompt estimate and max_tokens).
    taken = TOKENS - int(r.headers["x-ratelimit-remaining-tokens"])
    assert taken % 3 == 0 and taken // 3 >= 40, taken
    assert post(gw, "early").status_code == 429


def test_a_request_no_provider_received_is_released(gw: Stack) -> None:
    # Connection refused: Envoy answers 503 itself, and that reply passes extproc, which releases.
    for _ in range(5):  # more than the 3 per hour
        r = post(gw, "unreachable")
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
        assert r.headers["x-ratelimit-remaining-requests"] == "2"


def test_envoys_upstream_timeout_is_charged_its_reservation(gw: Stack) -> None:
    # The provider had the request and was still working on it after the binding's 1 s.
    for _ in range(3):
        r = post(gw, "timeout", **{"x-mock-latency-ms": "3000"})
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
    assert post(gw, "timeout").status_code == 429
