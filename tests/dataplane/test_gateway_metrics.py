"""Usage is exported as Prometheus metrics with the GenAI names, never with credentials."""

from __future__ import annotations

import re
import time

from tests.conftest import ACME_KEY, PROVIDER_KEY, Gateway

USAGE = re.compile(r'^gen_ai_client_token_usage_count\{[^}]*binding="team-a/chat"[^}]*gen_ai_token_type="input"[^}]*tenant="team-a/acme"\} (\S+)$', re.M)


def total(pattern: re.Pattern[str], text: str) -> float:
    return sum(float(v) for v in pattern.findall(text))


def test_token_usage_and_duration_are_exported_per_tenant_binding_and_backend(gw: Gateway) -> None:
    before = total(USAGE, gw.metrics())
    assert gw.chat("chat", "count my tokens").status_code == 200
    # Usage is counted off the request path, from Envoy's access log (flushed every 20 ms).
    deadline = time.monotonic() + 2
    while total(USAGE, text := gw.metrics()) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # and only once: nothing more arrives
    text = gw.metrics()
    assert total(USAGE, text) == before + 1  # this request, once
    assert re.search(r'gen_ai_server_request_duration_seconds_bucket\{[^}]*http_response_status_code="200"', text)
    assert re.search(r"^crdgol_policy_version [1-9][0-9.e+]*$", text, re.M)
    assert ACME_KEY not in text and PROVIDER_KEY not in text


def test_refusals_are_counted_by_reason(gw: Gateway) -> None:
    refused = re.compile(r'^crdgol_rejections_total\{reason="invalid_api_key"\} (\S+)$', re.M)
    before = total(refused, gw.metrics())
    assert gw.chat("chat", key="sk-bad-key-xyz").status_code == 401
    assert total(refused, gw.metrics()) == before + 1
