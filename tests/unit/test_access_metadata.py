"""What extproc hands Envoy's access log, fed through the real request path without Envoy.

The metadata travels in ``ProcessingResponse.dynamic_metadata`` under ``crdgol.access_log``'s
namespace: once when extproc refuses a request, once when a response ends; never a credential
or a word of the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from crdgol.access_log import EXTPROC_FIELDS, NAMESPACE
from crdgol.request_path import ROUTE_NAMESPACE
from extproc.services import Services
from tests.unit.request_path import (
    KEY,
    Run,
    chat,
    downstream,
    drive,
    openai_completion,
    openai_frames,
    policy_services,
    request_body,
    request_headers,
    response_body,
    response_headers,
)


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return policy_services(tmp_path)


def sent(run: Run) -> list[tuple[int, dict[str, Any]]]:
    """(message index, metadata) for every answer that carried access-log metadata."""
    out = []
    for i, r in enumerate(run.responses):
        if r.HasField("dynamic_metadata"):
            doc = json_format.MessageToDict(r.dynamic_metadata)
            assert set(doc) <= {NAMESPACE, ROUTE_NAMESPACE}  # (the body reply names the route too)
            if NAMESPACE in doc:
                out.append((i, doc[NAMESPACE]))
    return out


async def test_a_finished_request_sends_its_record_once_with_the_last_answer(services: Services) -> None:
    run = await drive(
        downstream(services),
        [request_headers(), request_body(chat()), response_headers(), response_body(openai_completion(prompt=7, completion=11))],
        services=services,
    )
    [(i, meta)] = sent(run)
    assert i == len(run.responses) - 1
    assert set(meta) <= set(EXTPROC_FIELDS)
    assert meta["tenant"] == "ns/acme" and meta["binding"] == "ns/metered" and meta["model_requested"] == "metered"
    assert meta["backend"] == "crdgol-be.ns.metered.a" and meta["provider"] == "openai" and meta["model_served"] == "up-gpt"
    assert (meta["input_tokens"], meta["output_tokens"]) == (7, 11)
    assert meta["cost"] == pytest.approx((7 * 1 + 11 * 2) / 1_000_000)  # 1.00 and 2.00 per million
    assert meta["policy_version"] == services.current.version


async def test_a_refusal_sends_what_extproc_knew_and_the_reason(services: Services) -> None:
    run = await drive(downstream(services), [request_headers(key="sk-not-a-key"), request_body(chat())], services=services)
    [(_, meta)] = sent(run)
    assert meta["error"] == "invalid_api_key" and "tenant" not in meta
    run = await drive(downstream(services), [request_headers(), request_body(chat("nope"))], services=services)
    [(_, meta)] = sent(run)
    assert (meta["error"], meta["model_requested"]) == ("model_not_found", "nope")


async def test_a_stream_records_time_to_first_token_and_never_leaks_the_prompt_or_key(services: Services) -> None:
    frames = openai_frames(prompt=5, completion=9)
    doc = chat(stream=True)
    doc["messages"][0]["content"] = "secret prompt words"
    messages = [request_headers(), request_body(doc), response_headers(content_type="text/event-stream")]
    messages += [response_body(f, end_of_stream=False) for f in frames[:-1]] + [response_body(frames[-1])]
    run = await drive(downstream(services), messages, services=services)
    [(_, meta)] = sent(run)
    assert (meta["input_tokens"], meta["output_tokens"]) == (5, 9)
    text = str(meta) + services.metrics.render().decode()
    assert "secret prompt" not in text and KEY not in text and "sk-provider" not in text
    rendered = services.metrics.render().decode()
    assert 'gen_ai_server_time_to_first_token_seconds_count{backend="crdgol-be.ns.metered.a",binding="ns/metered"' in rendered
    assert 'gen_ai_server_time_per_output_token_seconds_count{backend="crdgol-be.ns.metered.a"' in rendered
    assert 'crdgol_spend_total{backend="crdgol-be.ns.metered.a",binding="ns/metered",tenant="ns/acme"}' in rendered
