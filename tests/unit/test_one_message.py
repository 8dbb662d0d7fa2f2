"""The one-message request path, without Envoy: the body is the first and only message.

Envoy sends the body with the header values extproc reads as request attributes; extproc's one
answer names the route in dynamic metadata (the plain one, or the binding's response route when
the response needs extproc), admits the request and leaves the rest to Envoy and the access log.
A response that does come back (the response route, a provider's error) arrives on the response
filter's own stream, rebuilt from the forwarded metadata (``extproc.response_side``). The
data-plane tier proves the same through the real binary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2

from crdgol.request_path import (
    CLUSTER_ATTRIBUTE,
    NO_OP_HEADER,
    RESPONSE_SUFFIX,
    ROUTE_KEY,
    ROUTE_NAMESPACE,
    SESSION_SUFFIX,
    STATE_NAMESPACE,
    STATUS_ATTRIBUTE,
    attributes,
    header_attribute,
)
from crdgol.usage_log import SETTLE_NAMESPACE, USAGE_NAMESPACE
from extproc.gateway import Downstream
from extproc.history import history_key
from extproc.quota import Demand, Price
from extproc.response_side import ResponseStream
from extproc.services import Services
from extproc.usage_log import settle_entry
from tests.unit.request_path import (
    KEY,
    RecordingStore,
    Run,
    chat,
    drive,
    openai_completion,
    policy_services,
    quiesce,
    response_body,
    response_headers,
)

PRICE = Price(1_000_000, 2_000_000)


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def services(tmp_path: Path, store: RecordingStore) -> Services:
    return policy_services(tmp_path, store)


def body_first(
    doc: Any, path: str = "/v1/chat/completions", key: str | None = KEY, count: int = 6, header_bytes: int = 300, **headers: str
) -> ep.ProcessingRequest:
    """The request body as Envoy sends it on a model path: with the attributes, no headers before."""
    values = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    if key is not None:
        values["authorization"] = f"Bearer {key}"
    attrs = struct_pb2.Struct()
    wanted = set(attributes())
    attrs.update({header_attribute(k): v for k, v in values.items() if header_attribute(k) in wanted})
    raw = json.dumps(doc).encode()
    attrs.update({"request.path": path, "request.method": "POST", "request.id": "rid-1", "size(request.headers)": float(count)})
    attrs.update({"request.size": float(len(raw)), "request.total_size": float(len(raw) + header_bytes)})
    req = ep.ProcessingRequest(request_body=ep.HttpBody(body=json.dumps(doc).encode(), end_of_stream=True))
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


def metadata(run: Run, namespace: str) -> dict[str, Any]:
    fields = run.responses[0].dynamic_metadata.fields
    return dict(fields[namespace].struct_value) if namespace in fields else {}


async def one(services: Services, doc: Any, **kw: Any) -> Run:
    return await drive(Downstream(services, usage_log=True), [body_first(doc, **kw)], services=services)


def response_stream_start(run: Run, *messages: ep.ProcessingRequest) -> list[ep.ProcessingRequest]:
    """The response filter's messages, the first carrying the metadata the body reply set."""
    first = ep.ProcessingRequest()
    first.CopyFrom(messages[0])
    for ns in (SETTLE_NAMESPACE, STATE_NAMESPACE):
        first.metadata_context.filter_metadata[ns].CopyFrom(run.responses[0].dynamic_metadata.fields[ns].struct_value)
    return [first, *messages[1:]]


def log_entry(run: Run, usage: dict[str, float] | None, status: int = 200, *, upstream: bool = True, cluster: str = "") -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    e.response.response_code.value = status
    if upstream:
        e.common_properties.time_to_first_upstream_rx_byte.nanos = 2_000_000
    e.common_properties.upstream_cluster = cluster
    md = e.common_properties.metadata.filter_metadata
    md[SETTLE_NAMESPACE].CopyFrom(run.responses[0].dynamic_metadata.fields[SETTLE_NAMESPACE].struct_value)
    if usage is not None:
        s = struct_pb2.Struct()
        s.update(usage)
        md[USAGE_NAMESPACE].CopyFrom(s)
    return e


async def test_a_plain_call_is_one_message_and_routed_by_metadata(services: Services, store: RecordingStore) -> None:
    run = await one(services, chat())
    [reply] = run.responses
    common = reply.request_body.response
    assert json.loads(common.body_mutation.body)["model"] == "up-gpt"
    # Envoy cannot take header changes here: nothing but the no-op that makes it re-route.
    assert not common.header_mutation.set_headers and list(common.header_mutation.remove_headers) == [NO_OP_HEADER]
    assert common.clear_route_cache
    binding = services.current.models["metered"][0]
    route = metadata(run, ROUTE_NAMESPACE)
    assert route[ROUTE_KEY] == binding.route and route["client_api"] == route["body_api"] == "openai"
    assert route["x-ratelimit-remaining-requests"] == "4"  # the route sets the rate-limit headers from these
    [rid] = store.reserved
    assert metadata(run, SETTLE_NAMESPACE)["tenant"] == "ns/acme" and store.outcome(rid) == []  # held until settled


async def test_a_refusal_is_answered_from_the_one_message(services: Services, store: RecordingStore) -> None:
    run = await one(services, chat(), key="sk-wrong")
    assert run.status() == 401 and not store.reserved
    run = await one(services, chat(), content_type="text/plain")
    assert run.status() == 415
    # Envoy counts and measures all the headers, though it sends only a few of them.
    for kw in ({"count": 150}, {"header_bytes": 40_000}):
        run = await one(services, chat(), **kw)
        assert run.status() == 431 and run.error()["error"]["code"] == "request_headers_too_large"
    assert not store.reserved


@pytest.mark.parametrize(
    ("doc", "kw", "need"),
    [
        (chat(stream=True), {}, "usage chunk stripped"),
        ({"model": "metered", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}, {"path": "/v1/messages"}, "translation"),
    ],
)
async def test_a_call_whose_response_needs_extproc_takes_the_response_route(services: Services, doc: Any, kw: dict[str, str], need: str) -> None:
    run = await one(services, doc, **kw)
    route = metadata(run, ROUTE_NAMESPACE)
    assert route[ROUTE_KEY].endswith(RESPONSE_SUFFIX), need
    # ... but a stream whose client asked for usage, or a call without a session, does not.
    plain = await one(services, chat(stream=True, stream_options={"include_usage": True}))
    assert not metadata(plain, ROUTE_NAMESPACE)[ROUTE_KEY].endswith(RESPONSE_SUFFIX)


async def test_the_first_stream_ending_does_not_release_what_envoy_now_accounts(services: Services, store: RecordingStore) -> None:
    await one(services, chat())
    await quiesce(services)
    [rid] = store.reserved
    assert store.outcome(rid) == []


async def test_the_access_log_settles_by_the_charge_rule_from_a_body_time_record(services: Services, store: RecordingStore) -> None:
    cluster = services.current.models["metered"][0].backends[0].cluster
    cases = [
        ({"input_tokens": 7.0, "output_tokens": 11.0}, 200, True, lambda d: d == Demand.used(7, 11, PRICE)),
        (None, 503, False, lambda d: d is None),  # Envoy's own reply, no provider reached: released
        (None, 0, False, lambda d: d is not None and d.input_tokens > 0),  # the client left first: its reservation
        (None, 429, True, lambda d: d is not None and d.requests == 1 and d.input_tokens == 0),  # a provider's error
    ]
    for usage, status, upstream, charged in cases:
        store.reserved.clear()
        store.finished.clear()
        run = await one(services, chat())
        assert settle_entry(services, log_entry(run, usage, status, upstream=upstream, cluster=cluster))
        await quiesce(services)
        [rid] = store.reserved
        [demand] = store.outcome(rid)
        assert charged(demand), (status, demand)
    text = services.metrics.render().decode()
    assert 'backend="crdgol-be.ns.metered.a"' in text and 'gen_ai_response_model="up-gpt"' in text


async def test_a_provider_error_is_mapped_on_the_response_stream_and_not_settled_twice(services: Services, store: RecordingStore) -> None:
    run = await one(services, chat())
    error = json.dumps({"error": {"message": "bad key sk-provider", "type": "invalid_request_error"}}).encode()
    msgs = response_stream_start(run, response_headers(401), response_body(error))
    resp = await drive(ResponseStream(services), msgs, services=services)
    assert resp.set_headers(0)[":status"] == "502"
    assert b"sk-provider" not in (resp.body(1) or b"")
    assert dict(resp.responses[0].dynamic_metadata.fields[SETTLE_NAMESPACE].struct_value) == {"handled": "1"}
    [rid] = store.reserved
    assert len(store.outcome(rid)) == 1
    handled = log_entry(run, None, 502)
    handled.common_properties.metadata.filter_metadata[SETTLE_NAMESPACE].update({"handled": "1"})
    assert not settle_entry(services, handled)


def session_response(status: int, cluster: str, raw: bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    """A session call's first response body message: its headers skipped, status and answering
    cluster as response attributes."""
    req = response_body(raw, end_of_stream)
    attrs = struct_pb2.Struct()
    attrs.update({STATUS_ATTRIBUTE: float(status), CLUSTER_ATTRIBUTE: cluster})
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


async def test_a_session_call_reads_its_answer_on_its_own_stream_and_remembers_it(services: Services, store: RecordingStore) -> None:
    binding = services.current.models["history"][0]
    cluster = binding.backends[0].cluster
    answer = openai_completion(text="noted")
    # The answer comes in two chunks (STREAMED): each passes as it comes, read whole at the end.
    msgs = [body_first(chat("history"), x_session_id="s1"), session_response(200, cluster, answer[:20], False), response_body(answer[20:])]
    run = await drive(Downstream(services, usage_log=True), msgs, services=services)
    route = dict(run.responses[0].dynamic_metadata.fields[ROUTE_NAMESPACE].struct_value)
    assert route[ROUTE_KEY] == binding.route + SESSION_SUFFIX
    # The response filter sees only its errors: the user's text does not ride along in metadata.
    state = dict(run.responses[0].dynamic_metadata.fields[STATE_NAMESPACE].struct_value)
    assert "user_text" not in state and "session" not in state and state["started"] > 0
    assert run.body(1) is None and run.body(2) is None  # nothing held back or changed
    # This stream accounts for the answer: the access log is told so with its first chunk.
    assert dict(run.responses[1].dynamic_metadata.fields[SETTLE_NAMESPACE].struct_value) == {"handled": "1"}
    [rid] = store.reserved
    assert store.outcome(rid) == [Demand.used(7, 11, PRICE)]
    principal = services.authenticator().authenticate(KEY).principal
    key = history_key("ns/acme", binding.key, principal, "s1")
    assert [t.content for t in await services.history.load(key, 4)] == ["hello", "noted"]
    # A failed answer (mapped on the response filter's stream, settled there) joins nothing and
    # is not accounted here; nor is a stream cut before its end settled twice.
    store.reserved.clear()
    error = b'{"error": {"message": "overloaded"}}'
    run = await drive(Downstream(services, usage_log=True), [body_first(chat("history"), x_session_id="s1"), session_response(502, cluster, error)], services=services)
    [rid] = store.reserved
    assert store.outcome(rid) == [] and SETTLE_NAMESPACE not in run.responses[1].dynamic_metadata.fields
    assert [t.content for t in await services.history.load(key, 4)] == ["hello", "noted"]


async def test_a_response_stream_without_request_state_passes_through(services: Services) -> None:
    resp = await drive(ResponseStream(services), [response_headers(401)], services=services)
    assert resp.responses[0].HasField("response_headers") and not resp.responses[0].response_headers.HasField("response")
