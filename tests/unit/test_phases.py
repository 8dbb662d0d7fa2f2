"""The phase machinery: replies become the ProcessingResponses Envoy expects."""

from __future__ import annotations

import orjson

from crdgol.replies import EXTPROC_REPLY_DETAILS
from extproc.errors import BadRequest, Unavailable
from extproc.phases import BUFFERED, PASS, Continue, Handler, ProcessingMode, to_pb


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


def test_every_refusal_is_openai_json_marked_for_envoy_to_pass_through() -> None:
    h = Handler()
    for exc in (BadRequest("nope"), Unavailable("extproc has no policy yet")):
        r = h.error_reply(exc)
        assert r.status == exc.status and r.headers["content-type"] == "application/json"
        assert orjson.loads(r.body)["error"]["message"] == exc.message
        pb = to_pb("request_headers", r)
        assert pb.immediate_response.status.code == exc.status
        # Envoy's local-reply mappers leave answers with these details alone (already shaped).
        assert pb.immediate_response.details == EXTPROC_REPLY_DETAILS


def test_a_request_extproc_lets_through_asks_for_its_response_and_keeps_its_body_buffered() -> None:
    pb = to_pb("request_headers", Continue(process_response=True))
    mode = pb.mode_override
    assert mode.response_header_mode == ProcessingMode.SEND and mode.request_body_mode == BUFFERED
    assert not to_pb("request_headers", Continue()).HasField("mode_override")
