"""The request path without Envoy: ProcessingRequests through the real strategies, every close path.

The charge rule under test (README, "Quotas"): a request a provider started answering is charged
(its real usage, or at least its reservation when the answer was cut short or carried no usage; one
request and no tokens for a provider's error); only a request that never reached a provider is
released. Each reservation is finished exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.quota import Demand, Price, cost_micros
from extproc.services import Services
from extproc.upstream import Attempt
from tests.unit.request_path import (
    COLLEAGUE_KEY,
    KEY,
    RecordingStore,
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

PRICE = Price(1_000_000, 2_000_000)


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def services(tmp_path: Path, store: RecordingStore) -> Services:
    return policy_services(tmp_path, store)


def only_reservation(store: RecordingStore) -> str:
    assert len(store.reserved) == 1, store.reserved
    return next(iter(store.reserved))


async def admitted(services: Services, doc: dict[str, object] | None = None, **headers: str) -> Run:
    """A request through the request phases only (Envoy then forwards it upstream)."""
    return await drive(downstream(services), [request_headers(**headers), request_body(doc or chat())], services=services)


# --- auth, selection, admission ---------------------------------------------------------------


async def test_a_request_without_a_key_is_refused_with_openai_json_and_reserves_nothing(services: Services, store: RecordingStore) -> None:
    run = await drive(downstream(services), [request_headers(key=None), request_body(chat())], services=services)
    assert run.status() == 401 and run.error()["error"]["type"] == "authentication_error"
    assert len(run.responses) == 1 and not store.reserved


async def test_an_unknown_model_is_a_404_and_reserves_nothing(services: Services, store: RecordingStore) -> None:
    run = await admitted(services, chat("nope"))
    assert run.status() == 404 and run.error()["error"]["code"] == "model_not_found"
    assert not store.reserved


async def test_an_admitted_request_is_routed_to_its_backend_with_the_provider_credential(services: Services) -> None:
    run = await admitted(services)
    assert run.immediate is None and len(run.responses) == 2
    assert "authorization" not in run.set_headers(0)
    h = run.set_headers(1)
    assert h["x-crdgol-route"].startswith("ns.metered")
    assert h[":path"] == "/v1/chat/completions" and h["authorization"] == "Bearer sk-provider"
    body = run.body(1)
    assert body is not None and json.loads(body)["model"] == "up-gpt"
    assert h["content-length"] == str(len(body))


async def test_the_sixth_request_in_a_minute_is_refused_with_retry_after(services: Services, store: RecordingStore) -> None:
    for _ in range(5):
        run = await drive(
            downstream(services),
            [request_headers(), request_body(chat()), response_headers(), response_body(openai_completion())],
            services=services,
        )
        assert run.immediate is None
    refused = await admitted(services)
    assert refused.status() == 429 and refused.error()["error"]["code"] == "rate_limit_exceeded"
    assert int(dict((h.header.key, h.header.raw_value.decode()) for h in refused.immediate.headers.set_headers)["retry-after"]) >= 1  # type: ignore[union-attr]
    assert len(store.reserved) == 5


async def test_a_translated_request_and_answer_cross_apis_and_settle_the_anthropic_usage(services: Services, store: RecordingStore) -> None:
    answer = json.dumps(
        {
            "id": "m1", "type": "message", "role": "assistant", "model": "up-claude",
            "content": [{"type": "text", "text": "bonjour"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 9, "output_tokens": 4},
        }
    ).encode()
    run = await drive(
        downstream(services),
        [request_headers(), request_body(chat("claude")), response_headers(), response_body(answer)],
        services=services,
    )
    sent = run.body(1)
    assert sent is not None and json.loads(sent)["model"] == "up-claude" and run.set_headers(1)[":path"] == "/v1/messages"
    out = run.body(3)
    assert out is not None
    doc = json.loads(out)
    assert doc["choices"][0]["message"]["content"] == "bonjour" and doc["usage"]["total_tokens"] == 13
    assert store.outcome(only_reservation(store)) == [Demand.used(9, 4, PRICE)]


# --- settle and release: every close path -------------------------------------------------------


async def test_a_complete_answer_is_charged_its_real_usage_once(services: Services, store: RecordingStore) -> None:
    await drive(
        downstream(services),
        [request_headers(), request_body(chat()), response_headers(), response_body(openai_completion(7, 11))],
        services=services,
    )
    assert store.outcome(only_reservation(store)) == [Demand.used(7, 11, PRICE)]


async def test_a_client_gone_before_any_response_byte_is_charged_its_reservation(services: Services, store: RecordingStore) -> None:
    # extproc sent the request on; the client hung up while the provider worked on it (Envoy
    # resets the upstream request: no usage ever comes back). Before: released, a free request.
    run = await drive(downstream(services), [request_headers(), request_body(chat()), response_headers()], cancel_after=2, services=services)
    assert run.cancelled
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_a_stream_that_ends_before_the_request_left_extproc_reserves_nothing(services: Services, store: RecordingStore) -> None:
    run = await drive(downstream(services), [request_headers(), request_body(chat())], cancel_after=1, services=services)
    assert run.cancelled and not store.reserved


async def test_envoys_upstream_timeout_is_charged_its_reservation(services: Services, store: RecordingStore) -> None:
    # Envoy's own 504: the provider had the request and did not answer in time (it may still be
    # generating, and bill it). A long non-streamed answer must not time out for free.
    await drive(
        downstream(services),
        [request_headers(), request_body(chat()), response_headers(504, upstream=False), response_body(b"upstream request timeout")],
        services=services,
    )
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_envoys_own_reply_never_reached_a_provider_and_is_released(services: Services, store: RecordingStore) -> None:
    # Connect failure / no healthy upstream / upstream timeout: Envoy's local 503/504 has no
    # upstream timing header.
    await drive(
        downstream(services),
        [request_headers(), request_body(chat()), response_headers(503, upstream=False), response_body(b"no healthy upstream")],
        services=services,
    )
    assert store.outcome(only_reservation(store)) == [None]


async def test_a_provider_error_charges_the_request_and_no_tokens(services: Services, store: RecordingStore) -> None:
    await drive(
        downstream(services),
        [request_headers(), request_body(chat()), response_headers(500), response_body(b'{"error": {"message": "boom"}}')],
        services=services,
    )
    assert store.outcome(only_reservation(store)) == [Demand(requests=1)]


async def test_a_stream_cut_after_the_first_byte_is_charged_at_least_its_reservation(services: Services, store: RecordingStore) -> None:
    frames = openai_frames()
    msgs = [request_headers(), request_body(chat(stream=True)), response_headers(content_type="text/event-stream"), response_body(frames[0], False)]
    run = await drive(downstream(services), msgs, cancel_after=4, services=services)
    assert run.cancelled
    rid = only_reservation(store)
    [charged] = store.outcome(rid)
    assert charged is not None and charged == store.reserved[rid].demand and charged.requests == 1


async def test_a_client_gone_between_response_headers_and_body_is_charged(services: Services, store: RecordingStore) -> None:
    # Also Envoy's message timeout or an upstream reset right after the headers: same close.
    msgs = [request_headers(), request_body(chat()), response_headers(), response_body(b"{")]
    await drive(downstream(services), msgs, cancel_after=3, services=services)
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_a_stream_that_ends_without_its_usage_chunk_is_charged_its_reservation(services: Services, store: RecordingStore) -> None:
    frames = openai_frames()
    body = frames[0] + frames[1] + frames[3]  # no usage chunk: the upstream dropped it
    msgs = [request_headers(), request_body(chat(stream=True)), response_headers(content_type="text/event-stream"), response_body(body)]
    await drive(downstream(services), msgs, services=services)
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_a_complete_stream_is_charged_its_usage_and_the_forced_usage_is_stripped(services: Services, store: RecordingStore) -> None:
    body = b"".join(openai_frames(5, 6))
    msgs = [request_headers(), request_body(chat(stream=True)), response_headers(content_type="text/event-stream"), response_body(body)]
    run = await drive(downstream(services), msgs, services=services)
    sent = run.body(1)
    assert sent is not None and json.loads(sent)["stream_options"] == {"include_usage": True}
    out = run.body(3)
    assert out is not None and b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")
    assert store.outcome(only_reservation(store)) == [Demand.used(5, 6, PRICE)]


async def test_a_200_with_invalid_json_is_charged_its_reservation(services: Services, store: RecordingStore) -> None:
    msgs = [request_headers(), request_body(chat()), response_headers(), response_body(b"<html>oops")]
    await drive(downstream(services), msgs, services=services)
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_usage_above_the_reservation_is_charged_in_full_when_the_answer_is_cut(services: Services, store: RecordingStore) -> None:
    # A stream cut after a usage chunk bigger than the reservation (no max_tokens honoured
    # upstream): what was seen wins where it is larger.
    big = openai_frames(7, 5000)
    msgs = [request_headers(), request_body(chat(stream=True)), response_headers(content_type="text/event-stream"), response_body(big[2], False)]
    await drive(downstream(services), msgs, cancel_after=4, services=services)
    rid = only_reservation(store)
    reserved = store.reserved[rid].demand
    [charged] = store.outcome(rid)
    assert charged is not None
    assert charged.output_tokens == 5000 and charged.input_tokens == reserved.input_tokens
    assert charged.cost_micros >= cost_micros(PRICE, reserved.input_tokens, 5000)


async def test_a_response_with_no_body_from_a_provider_is_charged_its_reservation(services: Services, store: RecordingStore) -> None:
    msgs = [request_headers(), request_body(chat()), response_headers(end_of_stream=True)]
    await drive(downstream(services), msgs, services=services)
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


async def test_a_cut_answer_frees_its_concurrent_slot(services: Services, store: RecordingStore) -> None:
    streams = [request_headers(), request_body(chat(stream=True)), response_headers(content_type="text/event-stream"), response_body(b"data: {}\n\n", False)]
    for _ in range(3):  # the concurrent limit is 3
        await drive(downstream(services), streams, cancel_after=4, services=services)
    assert (await admitted(services)).immediate is None


# --- a fallback attempt (upstream filter) --------------------------------------------------------


async def test_a_fallback_attempt_translates_to_its_backend_and_tags_the_answer(services: Services) -> None:
    attempt = Attempt(services, "crdgol-be.ns.fallback.second")
    run = await drive(
        attempt,
        [
            request_headers(key=None, **{"x-crdgol-client-api": "openai", "x-crdgol-body-api": "openai", "authorization": f"Bearer {KEY}"}),
            request_body(chat("fallback")),
            response_headers(),
        ],
    )
    h = run.set_headers(0)
    assert h[":path"] == "/v1/messages" and h["x-api-key"] == "sk-provider"
    sent = run.body(1)
    assert sent is not None and json.loads(sent)["model"] == "up-claude"
    assert run.set_headers(2)["x-crdgol-backend"] == "crdgol-be.ns.fallback.second"


async def test_a_fallback_answer_tagged_by_its_attempt_is_charged_at_that_backends_price(services: Services, store: RecordingStore) -> None:
    msgs = [
        request_headers(),
        request_body(chat("fallback")),
        response_headers(upstream=False, **{"x-crdgol-backend": "crdgol-be.ns.fallback.second"}),
        response_body(openai_completion(3, 4)),
    ]
    run = await drive(downstream(services), msgs, services=services)
    assert "x-crdgol-backend" in [h for h in run.responses[2].response_headers.response.header_mutation.remove_headers]
    assert store.outcome(only_reservation(store)) == [Demand.used(3, 4, PRICE)]


async def test_a_translated_answer_without_usage_is_not_charged_the_translators_zeros(services: Services, store: RecordingStore) -> None:
    # The translator writes a usage block of zeros when the backend sent none: not a provider's.
    msgs = [request_headers(), request_body(chat("claude")), response_headers(), response_body(b'{"type": "message", "content": []}')]
    await drive(downstream(services), msgs, services=services)
    rid = only_reservation(store)
    assert store.outcome(rid) == [store.reserved[rid].demand]


# --- what a provider's answer cannot do -----------------------------------------------------------


def tokens_by_backend(services: Services) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(services.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "crdgol_tokens_total":
                out[sample.labels["backend"]] = out.get(sample.labels["backend"], 0.0) + sample.value
    return out


async def test_a_backend_tag_that_is_not_one_of_the_bindings_backends_is_not_billed(services: Services, store: RecordingStore) -> None:
    # Envoy strips a provider's x-crdgol-* headers (tests/dataplane/test_gateway_upstream_trust.py);
    # should one get through, extproc still bills only a backend of the binding that was called.
    msgs = [request_headers(), request_body(chat()), response_headers(**{"x-crdgol-backend": "crdgol-be.ns.claude.c"}), response_body(openai_completion(3, 4))]
    await drive(downstream(services), msgs, services=services)
    assert tokens_by_backend(services) == {"crdgol-be.ns.metered.a": 7.0}
    assert store.outcome(only_reservation(store)) == [Demand.used(3, 4, PRICE)]


async def test_crdgol_headers_in_an_answer_never_reach_the_client(services: Services) -> None:
    forged = {"x-crdgol-route": "ns.other", "x-crdgol-client-api": "anthropic", "x-crdgol-anything": "1"}
    run = await drive(downstream(services), [request_headers(), request_body(chat()), response_headers(**forged), response_body(openai_completion())], services=services)
    removed = set(run.responses[2].response_headers.response.header_mutation.remove_headers)
    assert set(forged) <= removed


# --- session history belongs to one caller --------------------------------------------------------


async def _history_turn(services: Services, key: str, question: str, answer: str) -> bytes:
    """One chat on the history binding in session "s1"; returns the body sent to the provider."""
    run = await drive(
        downstream(services),
        [request_headers(key=key, **{"x-session-id": "s1"}), request_body(chat("history", messages=[{"role": "user", "content": question}])),
         response_headers(), response_body(openai_completion(text=answer))],
        services=services,
    )
    sent = run.body(1)
    assert sent is not None
    return sent


async def test_another_caller_of_the_same_tenant_cannot_read_a_session_by_its_id(services: Services) -> None:
    await _history_turn(services, KEY, "my PIN is 4921", "noted")
    # Same tenant, same x-session-id, another key: a session of its own, empty.
    assert b"4921" not in await _history_turn(services, COLLEAGUE_KEY, "what is my PIN?", "no idea")
    # The session's owner still has it (and never sees the colleague's turn).
    mine = await _history_turn(services, KEY, "what is my PIN?", "4921")
    assert b"4921" in mine and b"no idea" not in mine


async def test_a_model_named_again_in_another_case_is_refused_before_anything_is_reserved(services: Services, store: RecordingStore) -> None:
    # An upstream matching keys in any case (Go's encoding/json) would read "Model", not the
    # "model" the gateway routed and priced.
    run = await drive(downstream(services), [request_headers(), request_body(chat(Model="gpt-4o-expensive"))], services=services)
    assert run.status() == 400 and "'Model'" in run.error()["error"]["message"]
    assert not store.reserved
