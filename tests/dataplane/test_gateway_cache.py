"""Response caching through real Envoy, extproc and the mock upstream, read by the official SDKs.

Each test asks something no other test asks (a fresh marker in the prompt), and counts what
reached the provider from the mock's request log: a hit is an answer the provider never saw.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import pytest

from crdgol.stack import Stack, StackSettings, free_port
from tests.conftest import MockProcess

NS = "shop"
ACME = "sk-cache-acme"
GLOBEX = "sk-cache-globex"
CACHE_HEADER = "x-crdgol-cache"
THRESHOLD = 0.5
EMBED_REQUESTS = 3


def key_secret(name: str, tenant: str, key: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": tenant}},
        "stringData": {"key": key},
    }


def binding(name: str, endpoint: str, provider: str = "openai-compatible", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": name,
            "backends": [
                {
                    "name": "mock",
                    "provider": provider,
                    "endpoint": endpoint,
                    "model": "mock-claude" if provider == "anthropic" else "mock-gpt",
                    "pricing": {"inputPerMillion": "2.00", "outputPerMillion": "8.00"},
                }
            ],
            **spec,
        },
    }


def manifests(mock: str, slow: str) -> list[dict[str, Any]]:
    exact = {"ttl": "1h"}
    return [
        key_secret("acme", "acme", ACME),
        key_secret("globex", "globex", GLOBEX),
        binding("cached", mock, cache=exact, context={"systemPrompt": "You serve ${tenant}."}),
        binding("cached-claude", mock, "anthropic", cache=exact),
        binding("shared", mock, cache={"scope": "shared"}),
        binding("sessions", mock, cache=exact, context={"history": {"enabled": True}}),
        binding("short", mock, cache={"ttl": "1s"}),
        binding("metered", mock, cache=exact, quotas={"default": {"requests": [{"amount": 3, "per": "minute"}]}}),
        binding("tiny", mock, cache={"maxEntryBytes": 64}),
        binding("slow", slow, cache=exact),
        binding("embed", mock),
        binding("semantic", mock, cache={"mode": "semantic", "semantic": {"embeddingBinding": "embed", "threshold": THRESHOLD}}),
        # Each tenant may make EMBED_REQUESTS embeddings calls an hour on embed-metered, whoever makes them.
        binding("embed-metered", mock, quotas={"default": {"requests": [{"amount": EMBED_REQUESTS, "per": "hour"}]}}),
        binding("semantic-metered", mock, cache={"mode": "semantic", "semantic": {"embeddingBinding": "embed-metered", "threshold": 0.9999}}),
        pair("cached-pair", mock, cache=exact),
    ]


def pair(name: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    """A binding of two equal backends: no first backend is fixed, so each attempt goes through the
    upstream filter (the fallback path) rather than the direct one."""
    doc = binding(name, endpoint, **spec)
    doc["spec"]["backends"].append({**doc["spec"]["backends"][0], "name": "mock-2"})
    return doc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("cache-manifests")
    slow = MockProcess("--name", "slow", "--chunk-delay-ms", "400")
    stack = Stack(StackSettings(manifests=folder, quiet=True, metrics_port=free_port()))
    (folder / "all.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in manifests(stack.mock_url, slow.url)))
    try:
        stack.start()
        assert not stack.problems, stack.problems
        yield stack
    finally:
        stack.stop()
        slow.stop()


def marker() -> str:
    return f"question {uuid.uuid4().hex[:12]}"


def upstream_calls(mock_url: str, text: str) -> int:
    """Chat or messages requests the provider received whose body holds ``text``."""
    log = httpx.get(f"{mock_url}/_mock/requests", timeout=10).json()
    return sum(1 for r in log if r["path"] != "/v1/embeddings" and text in json.dumps(r.get("body")))


def post(stack: Stack, model: str, text: str, key: str = ACME, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    h = {"authorization": f"Bearer {key}", **(headers or {})}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=h, timeout=30)


def oa(stack: Stack, key: str = ACME) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def metric(stack: Stack, name: str, port: int | None = None, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port or stack.metrics_port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- miss, then hit, with the official SDKs ------------------------------------------------------


def test_an_openai_answer_is_served_again_from_the_cache_without_the_provider(stack: Stack) -> None:
    q = marker()
    client = oa(stack)
    first = client.chat.completions.with_raw_response.create(model="cached", messages=[{"role": "user", "content": q}])
    second = client.chat.completions.with_raw_response.create(model="cached", messages=[{"role": "user", "content": q}])
    assert first.headers[CACHE_HEADER] == "miss" and second.headers[CACHE_HEADER] == "hit"
    a, b = first.parse(), second.parse()
    assert a.choices[0].message.content == b.choices[0].message.content and f"last={q}" in (b.choices[0].message.content or "")
    assert b.usage is not None and b.usage.total_tokens == a.usage.total_tokens  # type: ignore[union-attr]
    assert upstream_calls(stack.mock_url, q) == 1


def test_an_openai_stream_is_stored_and_replayed_as_a_stream_the_sdk_reads(stack: Stack) -> None:
    q = marker()
    client = oa(stack)

    def streamed() -> tuple[str, str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model="cached", messages=[{"role": "user", "content": q}], stream=True, stream_options={"include_usage": True}
        )
        text, usage = "", None
        for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        return raw.headers[CACHE_HEADER], text, usage

    (s1, t1, u1), (s2, t2, u2) = streamed(), streamed()
    assert (s1, s2) == ("miss", "hit")
    assert t1 == t2 and f"last={q}" in t2
    assert u1 is not None and u2 is not None and u2.completion_tokens == u1.completion_tokens
    # The entry the stream left answers a non-streamed request too.
    whole = client.chat.completions.with_raw_response.create(model="cached", messages=[{"role": "user", "content": q}])
    assert whole.headers[CACHE_HEADER] == "hit" and whole.parse().choices[0].message.content == t1
    assert upstream_calls(stack.mock_url, q) == 1


def test_an_anthropic_answer_is_cached_and_streamed_back_to_the_sdk(stack: Stack) -> None:
    q = marker()
    client = anthropic.Anthropic(base_url=stack.url, api_key=ACME, max_retries=0)
    first = client.messages.with_raw_response.create(model="cached-claude", max_tokens=64, messages=[{"role": "user", "content": q}])
    second = client.messages.with_raw_response.create(model="cached-claude", max_tokens=64, messages=[{"role": "user", "content": q}])
    assert (first.headers[CACHE_HEADER], second.headers[CACHE_HEADER]) == ("miss", "hit")
    text = first.parse().content[0].text  # type: ignore[union-attr]
    assert second.parse().content[0].text == text and f"last={q}" in text  # type: ignore[union-attr]
    with client.messages.stream(model="cached-claude", max_tokens=64, messages=[{"role": "user", "content": q}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.usage.output_tokens == first.parse().usage.output_tokens
    assert upstream_calls(stack.mock_url, q) == 1
    # A stream first, on a fresh question: stored whole, served again as a stream.
    q2 = marker()
    for expected in ("miss", "hit"):
        with client.messages.with_streaming_response.create(
            model="cached-claude", max_tokens=64, messages=[{"role": "user", "content": q2}], stream=True
        ) as raw:
            assert raw.headers[CACHE_HEADER] == expected
            events = list(raw.parse())
        assert events[-1].type == "message_stop"
        assert f"last={q2}" in "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")  # type: ignore[union-attr]
    assert upstream_calls(stack.mock_url, q2) == 1


# --- isolation -------------------------------------------------------------------------------------


def test_one_tenants_answer_is_never_served_to_another_unless_the_binding_shares(stack: Stack) -> None:
    q = marker()
    assert post(stack, "cached", q, ACME).headers[CACHE_HEADER] == "miss"
    other = post(stack, "cached", q, GLOBEX)
    assert other.headers[CACHE_HEADER] == "miss"
    assert "You serve shop/globex" in other.json()["choices"][0]["message"]["content"]
    assert upstream_calls(stack.mock_url, q) == 2
    q2 = marker()
    assert post(stack, "shared", q2, ACME).headers[CACHE_HEADER] == "miss"
    assert post(stack, "shared", q2, GLOBEX).headers[CACHE_HEADER] == "hit"


def test_sessions_with_different_histories_never_share_an_answer(stack: Stack) -> None:
    q = marker()
    s1, s2 = f"s1-{uuid.uuid4().hex}", f"s2-{uuid.uuid4().hex}"
    assert post(stack, "sessions", "I am in session one", headers={"x-session-id": s1}).status_code == 200
    assert post(stack, "sessions", "I am somewhere else", headers={"x-session-id": s2}).status_code == 200
    in_one = post(stack, "sessions", q, headers={"x-session-id": s1})
    in_two = post(stack, "sessions", q, headers={"x-session-id": s2})
    assert (in_one.headers[CACHE_HEADER], in_two.headers[CACHE_HEADER]) == ("miss", "miss")
    assert upstream_calls(stack.mock_url, q) == 2
    # Without a session the history is empty: again another conversation.
    assert post(stack, "sessions", q).headers[CACHE_HEADER] == "miss"
    # Two fresh sessions with the same first question do share it, and the hit joins the history.
    s3, s4, first = f"s3-{uuid.uuid4().hex}", f"s4-{uuid.uuid4().hex}", marker()
    assert post(stack, "sessions", first, headers={"x-session-id": s3}).headers[CACHE_HEADER] == "miss"
    assert post(stack, "sessions", first, headers={"x-session-id": s4}).headers[CACHE_HEADER] == "hit"
    follow = post(stack, "sessions", marker(), headers={"x-session-id": s4})
    assert "messages=3" in follow.json()["choices"][0]["message"]["content"]  # the hit's turn, then this one


# --- what the caller asks --------------------------------------------------------------------------


def test_bypass_no_cache_and_no_store(stack: Stack) -> None:
    q = marker()
    assert post(stack, "cached", q).headers[CACHE_HEADER] == "miss"
    bypass = post(stack, "cached", q, headers={CACHE_HEADER: "bypass"})
    assert bypass.headers[CACHE_HEADER] == "bypass"
    refresh = post(stack, "cached", q, headers={"cache-control": "no-cache"})
    assert refresh.headers[CACHE_HEADER] == "bypass"
    assert upstream_calls(stack.mock_url, q) == 3
    assert post(stack, "cached", q).headers[CACHE_HEADER] == "hit"

    private = marker()
    assert post(stack, "cached", private, headers={"cache-control": "no-store"}).headers[CACHE_HEADER] == "miss"
    assert post(stack, "cached", private).headers[CACHE_HEADER] == "miss"  # the first was not kept
    assert upstream_calls(stack.mock_url, private) == 2


def test_an_entry_expires_after_its_ttl(stack: Stack) -> None:
    q = marker()
    assert post(stack, "short", q).headers[CACHE_HEADER] == "miss"
    assert post(stack, "short", q).headers[CACHE_HEADER] == "hit"
    time.sleep(1.3)
    assert post(stack, "short", q).headers[CACHE_HEADER] == "miss"


# --- what is never stored --------------------------------------------------------------------------


def test_a_provider_error_is_not_stored(stack: Stack) -> None:
    q = marker()
    failed = post(stack, "cached", q, headers={"x-mock-fail-status": "503"})
    assert failed.status_code in (502, 503) and "error" in failed.json()
    assert post(stack, "cached", q).headers[CACHE_HEADER] == "miss"
    assert post(stack, "cached", q).headers[CACHE_HEADER] == "hit"


def test_a_stream_the_provider_cut_is_not_stored(stack: Stack) -> None:
    q = marker()
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", timeout=30,
        json={"model": "cached", "stream": True, "messages": [{"role": "user", "content": q}]},
        headers={"authorization": f"Bearer {ACME}", "x-mock-fault": "reset-mid-stream"},
    ) as r, pytest.raises(httpx.HTTPError):
        r.read()
    again = post(stack, "cached", q, stream=True)
    assert again.headers[CACHE_HEADER] == "miss" and b"[DONE]" in again.content


def test_a_stream_the_client_abandoned_is_not_stored(stack: Stack) -> None:
    q = marker()
    with httpx.stream(
        "POST", f"{stack.url}/v1/chat/completions", timeout=30,
        json={"model": "slow", "stream": True, "messages": [{"role": "user", "content": q}]},
        headers={"authorization": f"Bearer {ACME}"},
    ) as r:
        next(r.iter_bytes())  # the first chunk, then hang up
    time.sleep(0.5)
    started = time.monotonic()
    again = post(stack, "slow", q, stream=True)
    assert again.headers[CACHE_HEADER] == "miss" and b"[DONE]" in again.content
    assert time.monotonic() - started > 0.4  # paced by the provider, not played from memory
    assert post(stack, "slow", q, stream=True).headers[CACHE_HEADER] == "hit"


def test_an_answer_larger_than_the_bound_is_not_stored(stack: Stack) -> None:
    q = marker()
    assert post(stack, "tiny", q).headers[CACHE_HEADER] == "miss"
    assert post(stack, "tiny", q).headers[CACHE_HEADER] == "miss"
    assert metric(stack, "crdgol_cache_not_stored_total", binding=f"{NS}/tiny", reason="too_large") >= 2


# --- charging and counting -----------------------------------------------------------------------


def test_a_hit_charges_a_request_and_no_tokens_and_is_counted(stack: Stack) -> None:
    q = marker()
    b = f"{NS}/metered"
    tokens_before = metric(stack, "crdgol_tokens_total", binding=b)
    first = post(stack, "metered", q)
    tokens_after_miss = metric(stack, "crdgol_tokens_total", binding=b)
    assert tokens_after_miss > tokens_before
    hit = post(stack, "metered", q)
    assert hit.headers[CACHE_HEADER] == "hit"
    assert int(hit.headers["x-ratelimit-remaining-requests"]) == int(first.headers["x-ratelimit-remaining-requests"]) - 1
    assert metric(stack, "crdgol_tokens_total", binding=b) == tokens_after_miss
    usage = first.json()["usage"]
    assert metric(stack, "crdgol_cache_tokens_saved_total", binding=b, type="output") >= usage["completion_tokens"]
    assert metric(stack, "crdgol_cache_money_saved_total", binding=b) > 0
    assert metric(stack, "crdgol_cache_lookups_total", binding=b, result="hit") >= 1
    assert metric(stack, "crdgol_cache_lookups_total", binding=b, result="miss") >= 1
    post(stack, "metered", q)  # the third request of the minute, a hit
    refused = post(stack, "metered", q)
    assert refused.status_code == 429  # hits spend the request quota


# --- semantic --------------------------------------------------------------------------------------


def embeddings(stack: Stack, texts: list[str]) -> np.ndarray:
    r = httpx.post(f"{stack.mock_url}/v1/embeddings", json={"model": "mock-gpt", "input": texts}, timeout=10)
    vecs = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float64)
    out: np.ndarray = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    return out


def test_a_similar_question_above_the_threshold_is_answered_and_one_below_is_not(stack: Stack) -> None:
    base = marker()
    variants = [f"{base} variant {i}" for i in range(200)]
    vecs = embeddings(stack, [base, *variants])
    cos = vecs[1:] @ vecs[0]
    near = variants[int(np.argmax(np.where(cos >= THRESHOLD + 0.05, cos, -2)))]
    far = variants[int(np.argmax(np.where(cos < THRESHOLD - 0.05, cos, -2)))]
    assert float(vecs[1 + variants.index(near)] @ vecs[0]) >= THRESHOLD  # the mock gave us both kinds
    assert float(vecs[1 + variants.index(far)] @ vecs[0]) < THRESHOLD

    stored = post(stack, "semantic", base)
    assert stored.headers[CACHE_HEADER] == "miss"
    similar = post(stack, "semantic", near)
    assert similar.headers[CACHE_HEADER] == "hit"
    assert similar.json()["choices"][0]["message"]["content"] == stored.json()["choices"][0]["message"]["content"]
    assert post(stack, "semantic", far).headers[CACHE_HEADER] == "miss"
    # Another tenant asks the very same question: its partition is its own.
    assert post(stack, "semantic", near, GLOBEX).headers[CACHE_HEADER] == "miss"
    assert upstream_calls(stack.mock_url, base) == 3  # base, far, and globex's near (each holds base)
    assert metric(stack, "crdgol_cache_semantic_search_seconds_count") >= 4


def test_a_semantic_cache_naming_no_embeddings_binding_is_refused_with_a_status(tmp_path: Path) -> None:
    from controller.manifests import load_folder
    from controller.render import RenderSettings, render

    bad = binding("lost", "http://127.0.0.1:9/v1", cache={"mode": "semantic", "semantic": {"embeddingBinding": "nowhere"}})
    (tmp_path / "b.yaml").write_text(json.dumps(bad))
    m = load_folder(tmp_path)
    result = render(m.bindings, m.secrets, RenderSettings())
    problem = result.problems[f"{NS}/lost"]
    assert problem.reason == "InvalidCache" and "nowhere" in problem.message


# --- identical misses at the same time (single flight) --------------------------------------------


def wait_until_the_provider_has(stack: Stack, text: str, calls: int = 1) -> None:
    deadline = time.monotonic() + 10
    while upstream_calls(stack.mock_url, text) < calls:
        assert time.monotonic() < deadline, "the first request never reached the provider"
        time.sleep(0.02)


def test_identical_misses_at_the_same_time_reach_the_provider_once(stack: Stack) -> None:
    q = marker()
    b = f"{NS}/cached"
    served_before = metric(stack, "crdgol_cache_coalesced_total", binding=b, outcome="served")
    slow = {"x-mock-latency-ms": "800"}  # the first one's answer takes that long to come back
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(post, stack, "cached", q, ACME, slow)
        wait_until_the_provider_has(stack, q)
        started = time.monotonic()
        others = [pool.submit(post, stack, "cached", q, ACME, slow) for _ in range(5)]
        results = [first.result(), *(o.result() for o in others)]
        waited = time.monotonic() - started
    # Served as soon as the first one's answer was stored, not when the 5 s wait ran out.
    assert waited < 4.0
    assert [r.status_code for r in results] == [200] * 6
    assert [r.headers[CACHE_HEADER] for r in results] == ["miss"] + ["hit"] * 5
    assert len({r.json()["choices"][0]["message"]["content"] for r in results}) == 1
    assert upstream_calls(stack.mock_url, q) == 1
    assert metric(stack, "crdgol_cache_coalesced_total", binding=b, outcome="served") - served_before >= 1
    # Another tenant asking the same at the same time waits for nobody: its answer is its own.
    q2 = marker()
    with ThreadPoolExecutor(2) as pool:
        mine = pool.submit(post, stack, "cached", q2, ACME, slow)
        wait_until_the_provider_has(stack, q2)
        theirs = pool.submit(post, stack, "cached", q2, GLOBEX)
        assert theirs.result().headers[CACHE_HEADER] == "miss" and mine.result().headers[CACHE_HEADER] == "miss"
    assert "You serve shop/globex" in theirs.result().json()["choices"][0]["message"]["content"]
    assert upstream_calls(stack.mock_url, q2) == 2


def stream_text(r: httpx.Response) -> str:
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


def test_a_request_waiting_for_one_in_flight_gets_its_answer_streamed_or_not_as_it_asked(stack: Stack) -> None:
    slow = {"x-mock-latency-ms": "800"}
    q = marker()  # a stream leads, a whole answer follows
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(post, stack, "cached", q, ACME, slow, stream=True)
        wait_until_the_provider_has(stack, q)
        follower = pool.submit(post, stack, "cached", q)
        streamed, whole = leader.result(), follower.result()
    assert streamed.headers[CACHE_HEADER] == "miss" and streamed.text.rstrip().endswith("data: [DONE]")
    assert whole.headers[CACHE_HEADER] == "hit" and whole.headers["content-type"].startswith("application/json")
    assert whole.json()["choices"][0]["message"]["content"] == stream_text(streamed)
    assert upstream_calls(stack.mock_url, q) == 1

    q2 = marker()  # a whole answer leads, a stream follows
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(post, stack, "cached", q2, ACME, slow)
        wait_until_the_provider_has(stack, q2)
        follower = pool.submit(post, stack, "cached", q2, stream=True)
        whole, streamed = leader.result(), follower.result()
    assert whole.headers[CACHE_HEADER] == "miss"
    assert streamed.headers[CACHE_HEADER] == "hit" and streamed.headers["content-type"].startswith("text/event-stream")
    assert stream_text(streamed) == whole.json()["choices"][0]["message"]["content"]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert upstream_calls(stack.mock_url, q2) == 1


def test_requests_waiting_for_one_that_fails_go_to_the_provider_themselves(stack: Stack) -> None:
    q = marker()
    b = f"{NS}/cached"
    upstream_before = metric(stack, "crdgol_cache_coalesced_total", binding=b, outcome="upstream")
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(post, stack, "cached", q, ACME, {"x-mock-latency-ms": "600", "x-mock-fail-status": "503"})
        wait_until_the_provider_has(stack, q)
        follower = pool.submit(post, stack, "cached", q)
        failed, answered = leader.result(), follower.result()
    assert failed.status_code in (502, 503)
    assert answered.status_code == 200 and answered.headers[CACHE_HEADER] == "miss"
    assert f"last={q}" in answered.json()["choices"][0]["message"]["content"]
    assert upstream_calls(stack.mock_url, q) == 2
    assert metric(stack, "crdgol_cache_coalesced_total", binding=b, outcome="upstream") - upstream_before >= 1
    assert post(stack, "cached", q).headers[CACHE_HEADER] == "hit"  # the follower's answer was stored


# --- what reaches the provider ----------------------------------------------------------------------


def test_no_gateway_header_a_caller_sends_reaches_the_provider(stack: Stack) -> None:
    sent = {CACHE_HEADER: "bypass", "x-crdgol-route": "elsewhere", "x-crdgol-backend": "b", "x-crdgol-whatever": "1"}
    for model in ("cached", "cached-pair"):  # the direct first backend, and an attempt's own filter
        q = marker()
        r = post(stack, model, q, headers=sent)
        assert r.status_code == 200 and r.headers[CACHE_HEADER] == "bypass"
        log = httpx.get(f"{stack.mock_url}/_mock/requests", timeout=10).json()
        seen = [e["headers"] for e in log if q in json.dumps(e.get("body"))]
        assert len(seen) == 1
        assert [h for h in seen[0] if h.startswith("x-crdgol-")] == [], model


# --- the embeddings call of a semantic lookup -----------------------------------------------------


def embeddings_calls(mock_url: str) -> int:
    return sum(1 for r in httpx.get(f"{mock_url}/_mock/requests", timeout=10).json() if r["path"] == "/v1/embeddings")


def embed_directly(stack: Stack, key: str) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/embeddings", json={"model": "embed-metered", "input": "hello"}, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def test_a_semantic_lookups_embeddings_call_is_charged_to_the_callers_tenant(stack: Stack) -> None:
    # The quota is per hour: keep the whole test inside one window.
    into_hour = time.time() % 3600
    if into_hour > 3600 - 30:
        time.sleep(3600 - into_hour + 1)
    embed = f"{NS}/embed-metered"
    tokens_before = metric(stack, "crdgol_tokens_total", binding=embed, tenant=f"{NS}/acme")
    for _ in range(EMBED_REQUESTS - 1):  # each a semantic miss: one embeddings call, reused to store
        assert post(stack, "semantic-metered", marker()).headers[CACHE_HEADER] == "miss"
    assert metric(stack, "crdgol_tokens_total", binding=embed, tenant=f"{NS}/acme") > tokens_before
    # The caller's own call is its last of the hour: the lookups spent the others.
    mine = embed_directly(stack, ACME)
    assert mine.status_code == 200 and mine.headers["x-ratelimit-remaining-requests"] == "0"
    theirs = embed_directly(stack, GLOBEX)  # another tenant's quota is its own
    assert theirs.status_code == 200 and int(theirs.headers["x-ratelimit-remaining-requests"]) == EMBED_REQUESTS - 1
    # Out of embeddings quota, the caller still gets answers; it just gets no semantic lookup.
    calls = embeddings_calls(stack.mock_url)
    refused = metric(stack, "crdgol_cache_errors_total", stage="embedding_quota")
    late = post(stack, "semantic-metered", marker())
    assert late.status_code == 200 and late.headers[CACHE_HEADER] == "miss"
    assert embeddings_calls(stack.mock_url) == calls
    assert metric(stack, "crdgol_cache_errors_total", stage="embedding_quota") > refused
    assert embed_directly(stack, ACME).status_code == 429


# --- what a cached call costs extproc (the one-message path) ---------------------------------------


def ext_proc_cost(stack: Stack, text: str, headers: dict[str, str] | None = None) -> tuple[httpx.Response, dict[str, int]]:
    """One call and the ext_proc messages and streams Envoy spent on it (its own statistics)."""

    def stats() -> dict[str, int]:
        raw = httpx.get(f"http://127.0.0.1:{stack.admin_port}/stats?filter=ext_proc", timeout=5).text
        out: dict[str, int] = {}
        for line in raw.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit() and (name.endswith("stream_msgs_sent") or name.endswith("streams_started")):
                kind = "response" if ".ext_proc.response." in name else "request"
                key = f"{kind}.{name.rsplit('.', 1)[1]}"
                out[key] = out.get(key, 0) + int(value)
        return out

    before = stats()
    r = post(stack, "cached", text, headers=headers)
    time.sleep(0.1)  # Envoy counts a stream's last message after the client has its answer
    after = stats()
    return r, {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def test_a_hit_costs_one_message_and_only_a_miss_to_store_opens_the_response_side(stack: Stack) -> None:
    q = marker()
    miss, used = ext_proc_cost(stack, q)
    assert miss.headers[CACHE_HEADER] == "miss" and used["request.stream_msgs_sent"] == 1
    assert used["response.streams_started"] == 1  # its answer is read, to be stored
    hit, used = ext_proc_cost(stack, q)
    assert hit.headers[CACHE_HEADER] == "hit" and hit.json() == miss.json()
    assert used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}  # answered from the body message
    # Nothing to store: the response passes Envoy alone, and the header still says what happened.
    bypass, used = ext_proc_cost(stack, q, {CACHE_HEADER: "bypass"})
    assert bypass.headers[CACHE_HEADER] == "bypass" and bypass.status_code == 200
    assert used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}
    private, used = ext_proc_cost(stack, marker(), {"cache-control": "no-store"})
    assert private.headers[CACHE_HEADER] == "miss" and private.status_code == 200
    assert used == {"request.stream_msgs_sent": 1, "request.streams_started": 1}
