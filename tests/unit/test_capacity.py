"""Bounded resources on the request path: streams, body bytes, messages, loop lag; nothing leaks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from extproc.capacity import Capacity, CapacitySettings
from extproc.services import Services
from tests.unit.request_path import (
    RecordingStore,
    Run,
    chat,
    downstream,
    drive,
    openai_frames,
    policy_services,
    request_body,
    request_headers,
    response_body,
    response_headers,
)


def services_with(tmp_path: Path, **caps: object) -> Services:
    s = policy_services(tmp_path, RecordingStore())
    s.capacity = Capacity(CapacitySettings(**caps))  # type: ignore[arg-type]
    return s


def overloaded(run: Run) -> None:
    imm = run.immediate
    assert imm is not None and imm.status.code == 503
    headers = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
    assert headers["retry-after"] == "1"
    # 503 bodies are wrapped into the OpenAI error shape by Envoy's local-reply mapper: the
    # message is the text a person reads.
    assert b"capacity" in imm.body or b"overloaded" in imm.body


async def test_a_request_beyond_the_open_stream_cap_is_refused_at_its_first_message(tmp_path: Path) -> None:
    services = services_with(tmp_path, max_streams=2)
    msgs = [request_headers(), request_body(chat("roomy", stream=True)), response_headers(content_type="text/event-stream")]
    held = [asyncio.create_task(drive(downstream(services), msgs, cancel_after=3, services=services)) for _ in range(2)]
    while services.capacity.streams < 2:
        await asyncio.sleep(0)
    refused = await drive(downstream(services), msgs, services=services)
    overloaded(refused)
    assert len(refused.responses) == 1 and services.capacity.shed == 1
    await asyncio.gather(*held)
    assert services.capacity.streams == 0
    assert (await drive(downstream(services), msgs[:2], services=services)).immediate is None


async def test_a_request_body_beyond_the_bytes_in_flight_is_refused_and_nothing_is_reserved(tmp_path: Path) -> None:
    services = services_with(tmp_path, max_body_bytes=4096)
    doc = chat("roomy")
    doc["messages"] = [{"role": "user", "content": "x" * 5000}]
    run = await drive(downstream(services), [request_headers(), request_body(doc)], services=services)
    overloaded(run)
    assert services.capacity.body_bytes == 0 and services.capacity.streams == 0
    assert isinstance(services.quotas, RecordingStore) and not services.quotas.reserved
    # Small bodies still pass: the cap is on what is held at once.
    assert (await drive(downstream(services), [request_headers(), request_body(chat("roomy"))], services=services)).immediate is None


async def test_response_bodies_are_counted_while_processed_and_given_back(tmp_path: Path) -> None:
    services = services_with(tmp_path)
    frames = openai_frames()
    msgs = [request_headers(), request_body(chat("roomy", stream=True)), response_headers(content_type="text/event-stream")]
    msgs += [response_body(f, i == len(frames) - 1) for i, f in enumerate(frames)]
    run = await drive(downstream(services), msgs, services=services)
    assert run.immediate is None and len(run.responses) == len(msgs)
    assert services.capacity.body_bytes == 0


async def test_a_stream_past_the_message_cap_is_cut_and_charged(tmp_path: Path) -> None:
    services = services_with(tmp_path, max_messages=5)
    chunk = response_body(b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n', False)
    msgs = [request_headers(), request_body(chat("roomy", stream=True)), response_headers(content_type="text/event-stream"), chunk, chunk, chunk]
    run = await drive(downstream(services), msgs, services=services)
    assert len(run.responses) == 6 and run.status() == 503
    store = services.quotas
    assert isinstance(store, RecordingStore)
    [rid] = store.reserved
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_new_requests_are_shed_while_the_loop_lags_and_admitted_again_after(tmp_path: Path) -> None:
    services = services_with(tmp_path, shed_lag=0.5)
    services.capacity.lag = 0.6
    overloaded(await drive(downstream(services), [request_headers(), request_body(chat("roomy"))], services=services))
    services.capacity.lag = 0.01
    assert (await drive(downstream(services), [request_headers(), request_body(chat("roomy"))], services=services)).immediate is None


async def test_the_lag_monitor_sees_a_blocked_loop_and_recovers() -> None:
    cap = Capacity(CapacitySettings(lag_interval=0.01))
    watch = asyncio.create_task(cap.watch_lag())
    await asyncio.sleep(0.05)
    import time

    time.sleep(0.3)  # a handler that blocks the loop
    seen = 0.0
    for _ in range(5):  # the overdue timer fires first thing
        await asyncio.sleep(0)
        seen = max(seen, cap.lag)
    assert seen > 0.2
    await asyncio.sleep(0.3)
    assert cap.lag < 0.05
    watch.cancel()


def test_malloc_is_tuned_where_glibc_is_present() -> None:
    cap = Capacity()
    tuned = cap.tune_malloc()
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert tuned
    cap.take_request_body(cap.settings.trim_after_bytes)
    cap.give(cap.settings.trim_after_bytes)  # no running loop: trims at once
    assert cap.body_bytes == 0 and not cap._trim_pending


@pytest.mark.parametrize("size", [0, 10])
async def test_an_empty_or_small_body_holds_only_its_bytes(tmp_path: Path, size: int) -> None:
    services = services_with(tmp_path)
    body = json.dumps(chat("roomy")).encode() + b" " * size
    run = await drive(downstream(services), [request_headers(), request_body(body)], services=services)
    assert run.immediate is None and services.capacity.body_bytes == 0
