"""The phase machinery: replies become the ProcessingResponses Envoy expects."""

from __future__ import annotations

from extproc.errors import BadRequest, Unavailable
from extproc.phases import BUFFERED, PASS, Continue, Handler, Respond, to_pb


def test_a_pass_through_reply_is_an_empty_response_of_the_same_phase() -> None:
    assert to_pb("request_body", PASS).HasField("request_body")
    assert not to_pb("request_body", PASS).request_body.HasField("response")


def test_a_continue_carries_header_and_body_mutations_and_the_route_cache_clear() -> None:
    pb = to_pb("request_body", Continue(set_headers={"x-a": "1"}, remove_headers=["x-b"], body=b"{}", clear_route_cache=True))
    common = pb.request_body.response
    assert common.clear_route_cache and common.body_mutation.body == b"{}"
    assert [(h.header.key, h.header.raw_value) for h in common.header_mutation.set_headers] == [("x-a", b"1")]
    assert list(common.header_mutation.remove_headers) == ["x-b"]


def test_a_body_mode_is_asked_for_only_on_the_response_headers_reply() -> None:
    pb = to_pb("response_headers", Continue(response_body_mode=BUFFERED))
    assert pb.HasField("mode_override") and pb.mode_override.response_body_mode == BUFFERED


def test_a_4xx_refusal_is_openai_json_and_a_5xx_is_left_for_envoy_to_wrap() -> None:
    h = Handler()
    bad = h.error_reply(BadRequest("nope"))
    assert bad.status == 400 and bad.body.startswith(b'{"error"') and bad.headers["content-type"] == "application/json"
    down = h.error_reply(Unavailable("extproc has no policy yet"))
    # Envoy's local_reply_config rewrites 5xx local replies into the OpenAI shape: send the bare
    # message so the client sees it wrapped once, not a JSON string inside JSON.
    assert down.status == 503 and down.body == b"extproc has no policy yet"
    pb = to_pb("request_headers", Respond(down.status, down.body, down.headers))
    assert pb.immediate_response.status.code == 503
