"""Usage is exported as Prometheus metrics with the GenAI names, never with credentials."""

from __future__ import annotations

import re

from tests.conftest import ACME_KEY, PROVIDER_KEY, Gateway

USAGE = re.compile(r'^gen_ai_client_token_usage_count\{[^}]*binding="team-a/chat"[^}]*gen_ai_token_type="input"[^}]*tenant="team-a/acme"\} (\S+)$', re.M)


def total(pattern: re.Pattern[str], text: str) -> float:
    return sum(float(v) for v in pattern.findall(text))


def test_token_usage_and_duration_are_exported_per_tenant_binding_and_backend(gw: Gateway) -> None:
    before = total(USAGE, gw.metrics())
    assert gw.chat("chat", "count my tokens").status_code == 200
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


def response_models(text: str, request_model: str) -> set[str]:
    """The gen_ai_response_model values recorded for requests that asked for ``request_model``."""
    pattern = re.compile(
        r'^gen_ai_server_request_duration_seconds_count\{[^}]*gen_ai_request_model="'
        + re.escape(request_model)
        + r'"[^}]*gen_ai_response_model="([^"]*)"[^}]*http_response_status_code="200"',
        re.M,
    )
    return set(pattern.findall(text))


def test_the_response_model_is_the_backends_not_the_alias_the_client_called(gw: Gateway) -> None:
    # Same API (the body passes untouched), translated here (Anthropic backend, OpenAI client,
    # streamed and not), and translated by a fallback attempt's filter (which writes the alias).
    assert gw.chat("chat").status_code == 200
    assert gw.chat("claude").status_code == 200
    assert gw.chat("claude", stream=True).status_code == 200
    assert gw.chat("fallback-dead").status_code == 200
    text = gw.metrics()
    assert response_models(text, "chat") == {"mock-gpt"}
    assert response_models(text, "claude") == {"mock-claude"}
    assert response_models(text, "fallback-dead") == {"rescue-claude"}
