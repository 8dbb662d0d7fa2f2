"""Quotas and history shared across three extproc replicas through one real Redis, via real Envoy."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from crdgol.stack import Stack, StackSettings
from tests.redis.conftest import RedisServer

KEY = "sk-redis-tenant"


def binding(name: str, quota: dict[str, object], mock: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": name,
            "backends": [
                {
                    "name": "mock",
                    "provider": "openai-compatible",
                    "endpoint": mock,
                    "model": "mock-gpt",
                    "pricing": {"inputPerMillion": "1000.00", "outputPerMillion": "1000.00"},
                }
            ],
            "quotas": {"default": quota, "failPolicy": {"rateLimits": "open", "budgets": "closed"}},
            **spec,
        },
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("redis-manifests")
    stack = Stack(StackSettings(manifests=folder, quiet=True, redis_url=redis_server.url, extproc_replicas=3))
    mock = stack.mock_url
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "k", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "t1"}},
            "stringData": {"key": KEY},
        },
        binding("limit20", {"requests": [{"amount": 20, "per": "minute"}]}, mock),
        binding("persecond", {"requests": [{"amount": 2, "per": "second"}]}, mock),
        binding("one-at-a-time", {"concurrent": 1}, mock),
        binding("tokens", {"tokens": [{"amount": 100000, "per": "hour"}], "defaultMaxTokens": 10}, mock),
        binding("budget", {"budget": {"amount": "1000.00", "per": "day"}}, mock),
        binding(
            "history",
            {"requests": [{"amount": 1000, "per": "minute"}]},
            mock,
            context={"history": {"enabled": True, "maxTurns": 10}},
        ),
    ]
    (folder / "all.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def chat(url: str, model: str, text: str = "hi", **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)


async def burst(url: str, model: str, n: int) -> list[int]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        rs = await asyncio.gather(
            *(c.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}) for _ in range(n))
        )
    return [r.status_code for r in rs]


def test_fifty_concurrent_clients_across_three_replicas_get_exactly_the_limit(shared: Stack) -> None:
    # Windows are aligned to the clock minute: a burst that straddles one would rightly get a
    # fresh window. On a loaded machine the burst takes seconds, so start it early in a minute.
    into = time.time() % 60
    if into > 40:
        time.sleep(60 - into + 0.1)
    codes = asyncio.run(burst(shared.url, "limit20", 50))
    assert codes.count(200) == 20, codes
    assert codes.count(429) == 30, codes


def test_requests_spread_over_the_replicas(shared: Stack) -> None:
    for _ in range(12):
        assert chat(shared.url, "history").status_code == 200
    served = []
    for port in shared.metrics_ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        served.append(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("crdgol_requests_total{")))
    assert sum(1 for n in served if n > 0) >= 2, served


def test_a_window_resets_at_its_boundary(shared: Stack) -> None:
    # Start just after a second boundary so the three requests share one window.
    time.sleep(1 - (time.time() % 1) + 0.05)
    codes = [chat(shared.url, "persecond").status_code for _ in range(3)]
    assert codes == [200, 200, 429], codes
    time.sleep(1.05)
    assert chat(shared.url, "persecond").status_code == 200


def test_history_continues_on_any_replica(shared: Stack) -> None:
    session = f"s-{uuid.uuid4().hex}"
    headers = {"authorization": f"Bearer {KEY}", "x-session-id": session}
    for i in range(6):  # Envoy spreads these over the three replicas
        r = httpx.post(
            f"{shared.url}/v1/chat/completions",
            json={"model": "history", "messages": [{"role": "user", "content": f"turn {i}"}]},
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 200
        assert f"messages={1 + 2 * i}" in r.json()["choices"][0]["message"]["content"]


def test_streaming_usage_is_charged_exactly_once(shared: Stack) -> None:
    def probe() -> tuple[int, int]:
        r = chat(shared.url, "tokens", max_tokens=1)
        assert r.status_code == 200
        return int(r.headers["x-ratelimit-remaining-tokens"]), int(r.json()["usage"]["total_tokens"])

    def stream(include_usage: bool) -> str:
        body: dict[str, object] = {"model": "tokens", "stream": True, "max_tokens": 5, "messages": [{"role": "user", "content": "stream"}]}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        r = httpx.post(f"{shared.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200 and "[DONE]" in r.text
        return r.text

    first, probe_used = probe()
    stream(include_usage=False)  # usage forced upstream, stripped for the client, still charged
    text = stream(include_usage=True)
    usage = next(json.loads(line[6:])["usage"] for line in text.splitlines() if line.startswith("data: {") and '"usage":{' in line)
    time.sleep(0.3)  # settling runs right after each stream ends
    second, _ = probe()
    # Both probes reserve the same estimate, so the difference is exactly what was charged in
    # between: the first probe's real usage and each stream's usage, once.
    assert first - second == probe_used + 2 * usage["total_tokens"]


def test_a_cancelled_stream_frees_its_concurrent_slot_at_once(shared: Stack) -> None:
    httpx.post(f"{shared.mock_url}/_mock/config", json={"chunk_delay_ms": 300})
    body = {"model": "one-at-a-time", "stream": True, "messages": [{"role": "user", "content": "a long story please"}]}
    try:
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{shared.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held: dropping the iterator would close the response
            next(lines)
            # While it streams, the only slot is taken.
            assert chat(shared.url, "one-at-a-time").status_code == 429
        # The client hung up mid-stream: the answer is charged (README, the charge rule) and the
        # slot comes back without waiting for any timeout.
        deadline = time.monotonic() + 3
        while (code := chat(shared.url, "one-at-a-time").status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code == 200
    finally:
        httpx.post(f"{shared.mock_url}/_mock/config", json={"chunk_delay_ms": 0})


def test_redis_down_applies_the_fail_policy_and_recovers(shared: Stack, redis_server: RedisServer) -> None:
    import threading

    assert chat(shared.url, "budget").status_code == 200
    # Background load on a rate-limited binding for the whole outage: never a 5xx, never a hang.
    stop, seen = threading.Event(), []

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                r = c.post(f"{shared.url}/v1/chat/completions", json={"model": "history", "messages": [{"role": "user", "content": "x"}]}, headers={"authorization": f"Bearer {KEY}"})
                seen.append(r.status_code)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.3)
    redis_server.stop()
    try:
        # Rate limits fail open, and so does session history: requests still flow, without history.
        r = httpx.post(
            f"{shared.url}/v1/chat/completions",
            json={"model": "history", "messages": [{"role": "user", "content": "still here?"}]},
            headers={"authorization": f"Bearer {KEY}", "x-session-id": "during-outage"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        # Money budgets fail closed: refused with a clear error, never overspent.
        r = chat(shared.url, "budget")
        assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
        errors = sum(
            float(line.rsplit(" ", 1)[1])
            for port in shared.metrics_ports
            for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
            if line.startswith("crdgol_quota_store_errors_total ")
        )
        assert errors >= 2
        time.sleep(0.5)
    finally:
        redis_server.start()
    # Back without a restart of anything else.
    deadline = time.monotonic() + 5
    while (code := chat(shared.url, "budget").status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    loader.join(15)
    assert code == 200
    assert len(seen) > 10 and set(seen) == {200}, sorted(set(seen))
