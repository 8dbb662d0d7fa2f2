"""The response cache in a real Redis: the stores themselves, a dead Redis as a miss, and two
extproc replicas behind real Envoy answering from one shared cache (exact and semantic)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from crdgol.stack import Stack, StackSettings, free_port
from extproc.cache import ResponseCache
from extproc.cache_key import Directives, make_key
from extproc.cache_semantic import RedisVectorStore, unit
from extproc.cache_store import RedisCacheStore
from extproc.policy import Api, Policy
from extproc.quota_store import StoreUnavailable
from extproc.redis_client import RedisClient
from tests.redis.conftest import RedisServer
from tests.unit.test_cache import binding

KEY = "sk-cache-redis"


# --- the stores ------------------------------------------------------------------------------------


async def test_answers_expire_in_redis(store_client: RedisClient, redis_client: aioredis.Redis) -> None:
    store = RedisCacheStore(store_client)
    await store.put("k1", b"answer", 30)
    assert await store.get("k1") == b"answer"
    assert 0 < await redis_client.ttl("crdgol:cache:k1") <= 30
    await store.delete("k1")
    assert await store.get("k1") is None


async def test_vectors_are_shared_bounded_and_forgotten(store_client: RedisClient, redis_server: RedisServer) -> None:
    one = RedisVectorStore(store_client)
    other_client = RedisClient.from_url(redis_server.url)
    two = RedisVectorStore(other_client)  # another replica: its own matrices, the same Redis
    try:
        for i in range(5):
            await one.add("p", f"k{i}", unit([1.0, float(i)]), 60, max_entries=3)
        assert await two.search("p", unit([1.0, 4.0]), 0.999) == "k4"
        assert await two.search("p", unit([1.0, 0.0]), 0.999) is None  # k0 was pushed out
        await one.add("p", "k9", unit([1.0, 9.0]), 60, max_entries=3)
        assert await two.search("p", unit([1.0, 9.0]), 0.999) == "k9"  # only what is new is read
        assert two.parts.get("p") is not None and two.parts.get("p").n == 3  # type: ignore[union-attr]
        await two.forget("p", "k9")  # its answer expired: this replica stops matching it
        assert await two.search("p", unit([1.0, 9.0]), 0.9999) is None
        assert await one.search("p", unit([1.0, 9.0]), 0.999) == "k9"
        assert await two.search("q", unit([1.0, 4.0]), 0.0) is None  # another partition
    finally:
        await other_client.aclose()


async def test_a_dead_redis_is_a_miss_never_an_error() -> None:
    client = RedisClient.from_url(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2)
    try:
        store = RedisCacheStore(client, timeout=0.3)
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        cache = ResponseCache.in_redis(client, 0.3)
        b = binding()
        doc = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        call = cache.open(Policy.empty(), b, Api.OPENAI, "ns/acme", doc, {}, stream=False, include_usage=False)
        assert call is not None and call.key == make_key(b, Api.OPENAI, "ns/acme", doc) and call.wish == Directives()
        assert await call.lookup() is None
        assert cache.metrics is not None and cache.metrics.errors.labels("read")._value.get() == 1
    finally:
        await client.aclose()


# --- two replicas, one cache -----------------------------------------------------------------------


def doc(name: str, mock: str, cache: dict[str, object] | None = None) -> dict[str, object]:
    spec: dict[str, object] = {
        "model": name,
        "backends": [{"name": "mock", "provider": "openai-compatible", "endpoint": mock, "model": "mock-gpt"}],
    }
    if cache is not None:
        spec["cache"] = cache
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("cache-redis")
    stack = Stack(StackSettings(manifests=folder, quiet=True, redis_url=redis_server.url, extproc_replicas=2))
    mock = stack.mock_url
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "k", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "t1"}},
            "stringData": {"key": KEY},
        },
        doc("cached", mock, {"ttl": "5m"}),
        doc("embed", mock),
        doc("semantic", mock, {"mode": "semantic", "semantic": {"embeddingBinding": "embed", "threshold": 0.5}}),
    ]
    (folder / "all.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def ask(stack: Stack, model: str, text: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)


def hits_per_replica(stack: Stack, binding_key: str) -> list[float]:
    out = []
    for port in stack.metrics_ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        out.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("crdgol_cache_lookups_total{") and f'binding="{binding_key}"' in line and 'result="hit"' in line
            )
        )
    return out


def test_an_answer_one_replica_stored_is_served_by_both(replicas: Stack) -> None:
    q = f"shared question {uuid.uuid4().hex}"
    first = ask(replicas, "cached", q)
    assert first.headers["x-crdgol-cache"] == "miss"
    for _ in range(10):  # Envoy spreads these over both replicas
        r = ask(replicas, "cached", q)
        assert r.headers["x-crdgol-cache"] == "hit"
        assert r.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert all(n > 0 for n in hits_per_replica(replicas, "default/cached")), hits_per_replica(replicas, "default/cached")


def test_a_similar_question_is_answered_by_either_replica(replicas: Stack) -> None:
    base = f"semantic question {uuid.uuid4().hex}"
    variants = [f"{base} {i}" for i in range(200)]
    r = httpx.post(f"{replicas.mock_url}/v1/embeddings", json={"model": "m", "input": [base, *variants]}, timeout=10)
    vecs = np.array([d["embedding"] for d in r.json()["data"]])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = vecs[1:] @ vecs[0]
    near = [v for v, c in zip(variants, cos, strict=True) if c >= 0.55][:6]
    assert len(near) >= 4, "the mock's embeddings gave too few similar variants"
    assert ask(replicas, "semantic", base).headers["x-crdgol-cache"] == "miss"
    for text in near:
        assert ask(replicas, "semantic", text).headers["x-crdgol-cache"] == "hit"
    assert all(n > 0 for n in hits_per_replica(replicas, "default/semantic")), hits_per_replica(replicas, "default/semantic")
