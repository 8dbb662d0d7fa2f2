"""Bad input, the pure parts: provider errors mapped and sanitized, Envoy's local-reply table,
the request-header limits, and the error shapes both processes share."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.envoy_config import RenderSettings, listener
from controller.local_replies import LOCAL_REPLIES, local_replies
from crdgol.replies import (
    CODEC_HEADER_HEADROOM,
    EXTPROC_REPLY_DETAILS,
    MAX_REQUEST_HEADER_BYTES,
    MAX_REQUEST_HEADERS,
    anthropic_type,
)
from extproc.errors import BadRequest, GatewayError, HeadersTooLarge, RateLimited, Unavailable
from extproc.header_limits import check_request_headers
from extproc.phases import Continue, to_pb
from extproc.translate_errors import (
    MAX_MESSAGE_CHARS,
    client_status,
    credentials,
    map_provider_error,
    provider_error,
    redact,
)

KEY = "sk-proj-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"


class TestProviderErrors:
    @pytest.mark.parametrize("status", [401, 403])
    def test_a_refused_gateway_credential_is_a_502_with_a_fixed_message(self, status: int) -> None:
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}})
        e = map_provider_error(status, body.encode(), [KEY])
        assert (e.status, e.code) == (502, "upstream_auth_failed")
        assert KEY not in e.message and "gateway's credential" in e.message

    @pytest.mark.parametrize(
        ("status", "client"),
        [(400, 400), (404, 502), (408, 504), (409, 400), (413, 413), (422, 400), (429, 429), (500, 502),
         (502, 502), (503, 503), (504, 504), (529, 503)],
    )
    def test_each_provider_status_maps_to_what_it_means_for_the_caller(self, status: int, client: int) -> None:
        assert client_status(status) == client
        assert map_provider_error(status, b"{}").status == client

    def test_a_client_error_keeps_the_providers_explanation_and_code_redacted(self) -> None:
        body = {"error": {"message": f"This model's maximum context length is 8192 tokens (key {KEY})",
                          "type": "invalid_request_error", "code": "context_length_exceeded"}}
        e = map_provider_error(400, orjson.dumps(body), [KEY])
        assert e.code == "context_length_exceeded" and "maximum context length" in e.message
        assert KEY not in e.message and "[redacted]" in e.message

    def test_an_anthropic_shaped_error_is_read_too(self) -> None:
        body = b'{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}'
        status, out = provider_error(400, body, anthropic=True)
        doc = orjson.loads(out)
        assert status == 400 and doc["type"] == "error"
        assert doc["error"]["type"] == "invalid_request_error" and "alternate" in doc["error"]["message"]

    def test_only_the_message_survives_never_the_rest_of_the_body(self) -> None:
        body = {"error": {"message": "bad", "type": "x", "headers": {"authorization": f"Bearer {KEY}"}}, "debug": KEY}
        _, out = provider_error(400, orjson.dumps(body), anthropic=False)
        assert KEY not in out.decode() and set(orjson.loads(out)["error"]) == {"message", "type", "code"}

    def test_a_huge_body_is_not_parsed_and_the_message_is_bounded(self) -> None:
        body = orjson.dumps({"error": {"message": "x " * 100_000}})
        _, out = provider_error(400, body, anthropic=False)
        assert len(orjson.loads(out)["error"]["message"]) <= MAX_MESSAGE_CHARS + 64
        e = map_provider_error(400, orjson.dumps({"error": {"message": "word " * 1000}}))
        assert len(e.message) <= MAX_MESSAGE_CHARS + 64

    def test_the_credentials_of_a_backend_include_the_bare_bearer_token(self) -> None:
        assert credentials([("authorization", f"Bearer {KEY}")]) == [f"Bearer {KEY}", KEY]
        assert credentials([("x-api-key", KEY)]) == [KEY]

    @pytest.mark.parametrize(
        "leak",
        [KEY, f"Bearer {KEY}", "sk-ant-api03-AbCdEf012345", "sk-proj-abc1****wxyz", "key_9f8e7d6c5b4a", "A1" * 20],
    )
    def test_anything_shaped_like_a_key_is_redacted_even_when_unknown(self, leak: str) -> None:
        out = redact(f"Incorrect API key provided: {leak}. See the docs.")
        assert leak not in out and "[redacted]" in out and out.startswith("Incorrect API key provided")

    def test_ordinary_words_survive(self) -> None:
        text = "token_limit_exceeded for model gpt-4o-mini-with-a-rather-long-name-suffix"
        assert redact(text) == text

    @given(st.text(max_size=3000))
    def test_redacted_text_is_one_bounded_line(self, text: str) -> None:
        out = redact(text, [KEY])
        assert "\n" not in out and "\r" not in out and len(out) <= MAX_MESSAGE_CHARS
        assert KEY not in out


class TestLocalReplies:
    def mappers(self) -> list[dict[str, Any]]:
        hcm = listener(RenderSettings(), [])["filter_chains"][0]["filters"][0]["typed_config"]
        mappers = hcm["local_reply_config"]["mappers"]
        assert mappers == local_replies(max_request_bytes=4 * 1024 * 1024, request_headers_timeout_s=10, request_timeout_s=60)["mappers"]
        return list(mappers)

    def test_extprocs_own_answers_pass_through_first_and_unchanged(self) -> None:
        first = self.mappers()[0]
        expr = first["filter"]["extension_filter"]["typed_config"]["expression"]
        assert expr == f"response.code_details == '{EXTPROC_REPLY_DETAILS}'"
        assert set(first) == {"filter"}

    def test_every_rule_has_an_openai_and_an_anthropic_body_with_a_message(self) -> None:
        mappers = self.mappers()[1:]
        assert len(mappers) == 2 * len(LOCAL_REPLIES)
        anthropic, openai = mappers[: len(LOCAL_REPLIES)], mappers[len(LOCAL_REPLIES) :]
        for rule, a, o in zip(LOCAL_REPLIES, anthropic, openai, strict=True):
            body_o = o["body_format_override"]["json_format"]
            body_a = a["body_format_override"]["json_format"]
            assert body_o["error"]["message"] and body_o["error"]["code"] == rule.code
            assert body_a["type"] == "error" and body_a["error"]["type"] == anthropic_type(rule.type, rule.status)
            assert a["filter"]["and_filter"]["filters"][1] == o["filter"] == rule.match
            assert a["body_format_override"]["content_type"] == "application/json"
            assert ("status_code" in o) == rule.rewrite

    def test_the_figures_in_messages_are_the_ones_in_force(self) -> None:
        text = json.dumps(self.mappers())
        assert f"at most {MAX_REQUEST_HEADER_BYTES // 1024} KiB and {MAX_REQUEST_HEADERS} headers" in text
        assert "within 10 s" in text and "within 60 s" in text and "(4 MiB)" in text

    def test_the_listener_bounds_headers_and_slow_clients(self) -> None:
        hcm = listener(RenderSettings(), [])["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["max_request_headers_kb"] == MAX_REQUEST_HEADER_BYTES // 1024 * CODEC_HEADER_HEADROOM
        assert hcm["common_http_protocol_options"]["max_headers_count"] == MAX_REQUEST_HEADERS * CODEC_HEADER_HEADROOM
        assert hcm["request_headers_timeout"] == "10.000s" and hcm["request_timeout"] == "60.000s"
        assert hcm["common_http_protocol_options"]["idle_timeout"] == "300.000s"
        downstream = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
        # Responses go to extproc only when it asks: Envoy's replies to requests it never saw do not wait.
        assert downstream["processing_mode"]["response_header_mode"] == "SKIP"

    def test_extprocs_mode_override_is_the_configured_mode_with_response_headers_on(self) -> None:
        hcm = listener(RenderSettings(), [])["filter_chains"][0]["filters"][0]["typed_config"]
        configured = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]["processing_mode"]
        override = to_pb("request_headers", Continue(process_response=True)).mode_override
        # An override replaces the whole mode: everything but the response headers must stay as configured.
        for name, value in configured.items():
            want = "SEND" if name == "response_header_mode" else value
            field = override.DESCRIPTOR.fields_by_name[name]
            assert field.enum_type.values_by_number[getattr(override, name)].name == want, name


class TestHeaderLimits:
    def test_headers_within_the_limits_pass(self) -> None:
        check_request_headers({":path": "/v1/models", "authorization": "Bearer " + "a" * 8000})

    def test_too_many_bytes_or_too_many_headers_is_a_431(self) -> None:
        with pytest.raises(HeadersTooLarge) as err:
            check_request_headers({"x-big": "a" * MAX_REQUEST_HEADER_BYTES})
        assert err.value.status == 431 and "32 KiB" in err.value.message
        with pytest.raises(HeadersTooLarge):
            check_request_headers({f"x-{i}": "a" for i in range(MAX_REQUEST_HEADERS + 1)})


class TestErrorShapes:
    @pytest.mark.parametrize(
        ("exc", "anthropic_kind"),
        [(BadRequest("b"), "invalid_request_error"), (HeadersTooLarge("h"), "invalid_request_error"),
         (RateLimited("r"), "rate_limit_error"), (Unavailable("u"), "overloaded_error"), (GatewayError("g"), "api_error")],
    )
    def test_each_error_renders_in_both_shapes_with_the_same_code(self, exc: GatewayError, anthropic_kind: str) -> None:
        o = orjson.loads(exc.to_body())["error"]
        a = orjson.loads(exc.to_body(anthropic=True))
        assert o == {"message": exc.message, "type": exc.type, "code": exc.code}
        assert a == {"type": "error", "error": {"type": anthropic_kind, "message": exc.message, "code": exc.code}}

    def test_an_empty_message_is_never_sent(self) -> None:
        assert Unavailable("").message and BadRequest("", code="x").message
