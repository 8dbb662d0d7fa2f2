"""Usage off the request path: a response extproc does not read is settled from its log entry.

The request runs through the harness with the access-log path on (as the rendered Envoy config
has it); the entry Envoy would log is then built from what extproc told Envoy (its dynamic
metadata) plus what the native usage filters and Envoy's response flags would say.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from google.protobuf import struct_pb2

from crdgol.usage_log import LAST_EVENT, SETTLE_NAMESPACE, USAGE_NAMESPACE
from extproc.gateway import Downstream
from extproc.quota import Demand, Price
from extproc.services import Services
from extproc.usage_log import settle_entry
from tests.unit.request_path import (
    RecordingStore,
    Run,
    chat,
    drive,
    openai_frames,
    policy_services,
    quiesce,
    request_body,
    request_headers,
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


async def deferred(services: Services, doc: dict[str, object], content_type: str = "application/json", **headers: str) -> Run:
    msgs = [request_headers(**headers), request_body(doc), response_headers(content_type=content_type)]
    return await drive(Downstream(services, usage_log=True), msgs, services=services)


def entry(run: Run, usage: dict[str, float | str] | None, status: int = 200, **flags: bool) -> al.HTTPAccessLogEntry:
    """The access-log entry Envoy writes for the request ``run`` drove."""
    e = al.HTTPAccessLogEntry()
    e.response.response_code.value = status
    for name, on in flags.items():
        setattr(e.common_properties.response_flags, name, on)
    md = e.common_properties.metadata.filter_metadata
    settle = run.responses[2].dynamic_metadata.fields.get(SETTLE_NAMESPACE)
    if settle is not None:
        md[SETTLE_NAMESPACE].CopyFrom(settle.struct_value)
    if usage is not None:
        s = struct_pb2.Struct()
        s.update(usage)
        md[USAGE_NAMESPACE].CopyFrom(s)
    return e


async def test_a_plain_answer_is_not_read_and_is_settled_exactly_from_its_log_entry(services: Services, store: RecordingStore) -> None:
    run = await deferred(services, chat())
    reply = run.responses[2]
    assert not reply.HasField("mode_override")  # no body asked for: the answer passes by
    [rid] = store.reserved
    assert store.outcome(rid) == []  # not settled until the entry arrives
    assert settle_entry(services, entry(run, {"input_tokens": 7.0, "output_tokens": 11.0}))
    await quiesce(services)
    assert store.outcome(rid) == [Demand.used(7, 11, PRICE)]


async def test_a_logged_answer_the_client_abandoned_is_charged_at_least_its_reservation(services: Services, store: RecordingStore) -> None:
    run = await deferred(services, chat(stream=True, stream_options={"include_usage": True}), "text/event-stream")
    settle_entry(services, entry(run, {"input_tokens": 7.0}, downstream_connection_termination=True))
    await quiesce(services)
    [rid] = store.reserved
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_a_logged_answer_without_usage_or_reset_upstream_is_charged_its_reservation(services: Services, store: RecordingStore) -> None:
    for usage, flags in ((None, {}), ({"input_tokens": 7.0, "output_tokens": 3.0}, {"upstream_remote_reset": True})):
        store.finished.clear()
        store.reserved.clear()
        run = await deferred(services, chat())
        settle_entry(services, entry(run, usage, **flags))
        await quiesce(services)
        [rid] = store.reserved
        assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_an_anthropic_stream_logged_before_message_stop_is_not_final(services: Services, store: RecordingStore) -> None:
    run = await deferred(services, chat(stream=True), "text/event-stream", path="/v1/messages", **{"anthropic-version": "2023-06-01"})
    settle_entry(services, entry(run, {"input_tokens": 7.0, "output_tokens": 1.0, LAST_EVENT: "content_block_delta"}))
    await quiesce(services)
    [rid] = store.reserved
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_a_request_extproc_read_itself_is_not_settled_twice_from_its_log_entry(services: Services, store: RecordingStore) -> None:
    # A stream the client did not ask usage for: its usage chunk is stripped, so it is read.
    frames = b"".join(openai_frames(5, 6))
    msgs = [request_headers(), request_body(chat(stream=True)), response_headers(content_type="text/event-stream"), response_body(frames)]
    run = await drive(Downstream(services, usage_log=True), msgs, services=services)
    assert run.responses[2].HasField("mode_override")
    assert not settle_entry(services, entry(run, {"input_tokens": 5.0, "output_tokens": 6.0}))
    await quiesce(services)
    [rid] = store.reserved
    assert store.outcome(rid) == [Demand.used(5, 6, PRICE)]


async def test_usage_is_counted_in_metrics_from_the_log_entry(services: Services) -> None:
    run = await deferred(services, chat())
    settle_entry(services, entry(run, {"input_tokens": 7.0, "output_tokens": 11.0}))
    text = services.metrics.render().decode()
    assert 'crdgol_tokens_total{backend="crdgol-be.ns.metered.a",binding="ns/metered"' in text
    assert any(line.endswith(" 11.0") for line in text.splitlines() if line.startswith("crdgol_tokens_total{") and 'type="output"' in line)


def test_an_entry_without_crdgol_metadata_is_ignored(services: Services, store: RecordingStore) -> None:
    assert not settle_entry(services, al.HTTPAccessLogEntry())
    assert not store.finished
