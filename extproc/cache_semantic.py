"""Semantic lookups: embeddings of a request's last user message, compared by cosine similarity
with those of answers already stored in the same partition (``extproc.cache_key``).

The index is a brute-force scan in numpy: per partition a matrix of unit-norm float32 rows (a
ring of at most ``max_entries``, the oldest overwritten first), one matrix-vector product per
lookup. Measured against usearch and hnswlib in ``benchmarks/cache_index.py``: at the sizes one
partition holds (a binding's FAQ, up to a few thousand questions) the scan is as fast or faster
and has no build cost or extra dependency; see ``benchmarks/results/cache.md``.

Contract of a ``VectorStore``
----------------------------
* ``search(partition, vector, threshold)`` returns the entry key of the most similar live
  vector whose cosine similarity is at least ``threshold``, or None.
* ``add(partition, key, vector, ttl_seconds, max_entries)`` remembers ``vector`` as pointing at
  the cached answer ``key``; a partition keeps at most ``max_entries`` (the oldest go first).
* ``forget(partition, key)`` drops it (its answer expired or was evicted).
* ``MemoryVectorStore`` is this replica's alone, bounded to ``max_partitions`` partitions (least
  recently used dropped). ``RedisVectorStore`` keeps every partition's vectors in Redis (a hash of
  key -> float32 bytes, a sorted set for age, a version token), so all replicas share them; each
  replica rebuilds its own numpy matrix of a partition when the version it holds is stale, which
  one round trip tells (the vectors come back only when they changed). Redis errors raise
  ``StoreUnavailable`` (the caller misses).

``Embedder.embed`` calls the embeddings backend of the binding the cache names (OpenAI API,
``POST {endpoint}/v1/embeddings``) with its credential; any failure raises ``EmbeddingFailed``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from extproc.policy import Backend, Binding
from extproc.quota_store import bounded
from extproc.redis_client import RedisClient, Script

__all__ = ["Embedder", "EmbeddingFailed", "MemoryVectorStore", "RedisVectorStore", "VectorIndex", "VectorStore", "unit"]

Vector = npt.NDArray[np.float32]


class EmbeddingFailed(Exception):
    """The embeddings backend could not give a vector (the lookup misses)."""


def unit(values: Any) -> Vector:
    v = np.asarray(values, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(v))
    if not v.size or not math.isfinite(norm) or norm == 0.0:
        raise EmbeddingFailed("the embedding is empty or zero")
    out: Vector = v / norm
    return out


class VectorIndex:
    """One partition: a ring of unit rows, their expiry times and the keys they point at."""

    __slots__ = ("dim", "expires", "keys", "limit", "matrix", "n", "next")

    def __init__(self, dim: int, limit: int) -> None:
        self.dim, self.limit = dim, max(1, limit)
        cap = min(16, self.limit)
        self.matrix: Vector = np.zeros((cap, dim), dtype=np.float32)
        self.expires = np.full(cap, -np.inf)
        self.keys: list[str] = [""] * cap
        self.n = 0
        self.next = 0  # the oldest row, overwritten once the ring is full

    def add(self, key: str, vector: Vector, expires: float) -> None:
        if key in self.keys[: self.n]:
            i = self.keys.index(key)
        elif self.n < len(self.keys) or self.n < self.limit:
            if self.n == len(self.keys):
                self._grow(min(self.limit, 2 * len(self.keys)))
            i = self.n
            self.n += 1
        else:
            i = self.next
            self.next = (self.next + 1) % self.limit
        self.matrix[i] = vector
        self.expires[i] = expires
        self.keys[i] = key

    def _grow(self, cap: int) -> None:
        matrix = np.zeros((cap, self.dim), dtype=np.float32)
        matrix[: self.n] = self.matrix[: self.n]
        expires = np.full(cap, -np.inf)
        expires[: self.n] = self.expires[: self.n]
        self.matrix, self.expires = matrix, expires
        self.keys += [""] * (cap - len(self.keys))

    def remove(self, key: str) -> None:
        for i in range(self.n):
            if self.keys[i] == key:
                self.expires[i] = -np.inf

    def best(self, vector: Vector, threshold: float, now: float) -> str | None:
        if not self.n or vector.shape[0] != self.dim:
            return None
        scores = self.matrix[: self.n] @ vector
        scores[self.expires[: self.n] <= now] = -np.inf
        i = int(np.argmax(scores))
        return self.keys[i] if float(scores[i]) >= threshold else None


class VectorStore(Protocol):
    async def search(self, partition: str, vector: Vector, threshold: float) -> str | None: ...

    async def add(self, partition: str, key: str, vector: Vector, ttl_seconds: int, max_entries: int) -> None: ...

    async def forget(self, partition: str, key: str) -> None: ...


class MemoryVectorStore:
    def __init__(self, max_partitions: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_partitions = max_partitions
        self.clock = clock
        self._parts: OrderedDict[str, VectorIndex] = OrderedDict()

    def __len__(self) -> int:
        return len(self._parts)

    async def search(self, partition: str, vector: Vector, threshold: float) -> str | None:
        index = self._parts.get(partition)
        if index is None:
            return None
        self._parts.move_to_end(partition)
        return index.best(vector, threshold, self.clock())

    async def add(self, partition: str, key: str, vector: Vector, ttl_seconds: int, max_entries: int) -> None:
        index = self._parts.get(partition)
        if index is None or index.dim != vector.shape[0] or index.limit != max_entries:
            index = VectorIndex(vector.shape[0], max_entries)
            self._parts[partition] = index
            while len(self._parts) > self.max_partitions:
                self._parts.popitem(last=False)
        self._parts.move_to_end(partition)
        index.add(key, vector, self.clock() + ttl_seconds)

    async def forget(self, partition: str, key: str) -> None:
        index = self._parts.get(partition)
        if index is not None:
            index.remove(key)


# KEYS: vectors (hash), ages (zset), version. ARGV: the version the caller holds.
_FETCH = Script("""
local v = redis.call('GET', KEYS[3]) or ''
if v == ARGV[1] then return {v} end
return {v, redis.call('HGETALL', KEYS[1])}
""")
# KEYS as above. ARGV: entry key, vector bytes, now (ms), max entries, ttl seconds, new version.
_ADD = Script("""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do redis.call('HDEL', KEYS[1], old[i]) end
end
redis.call('SET', KEYS[3], ARGV[6])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
return 1
""")
# KEYS as above. ARGV: entry key, new version.
_FORGET = Script("""
if redis.call('HDEL', KEYS[1], ARGV[1]) > 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('SET', KEYS[3], ARGV[2], 'KEEPTTL')
end
return 1
""")


class RedisVectorStore:
    """Vectors in Redis, shared by replicas; each replica's matrices rebuilt from them on change."""

    def __init__(self, client: RedisClient, *, timeout: float = 0.5, max_local: int = 1_000, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._timeout = timeout
        self._max_local = max_local
        self.clock = clock
        self._local: OrderedDict[str, tuple[bytes, VectorIndex | None]] = OrderedDict()

    @staticmethod
    def _keys(partition: str) -> list[str | bytes | int | float]:
        base = "crdgol:cachevec:{" + partition + "}"  # one hash slot per partition (Redis Cluster)
        return [base + ":h", base + ":z", base + ":v"]

    async def search(self, partition: str, vector: Vector, threshold: float) -> str | None:
        held = self._local.get(partition)
        reply = await bounded(
            self._client.run(_FETCH, self._keys(partition), [held[0] if held else b""]), self._timeout, "cache vectors"
        )
        if len(reply) > 1:
            held = (reply[0] or b"", self._rebuild(reply[1]))
            self._local[partition] = held
            while len(self._local) > self._max_local:
                self._local.popitem(last=False)
        if held is None or held[1] is None:
            return None
        self._local.move_to_end(partition)
        return held[1].best(vector, threshold, float("-inf"))  # Redis expires entries itself

    @staticmethod
    def _rebuild(flat: list[bytes]) -> VectorIndex | None:
        rows = [(flat[i].decode(), np.frombuffer(flat[i + 1], dtype=np.float32)) for i in range(0, len(flat) - 1, 2)]
        rows = [(k, v) for k, v in rows if v.size]
        if not rows:
            return None
        dim = rows[0][1].shape[0]
        rows = [(k, v) for k, v in rows if v.shape[0] == dim]
        index = VectorIndex(dim, len(rows))
        for k, v in rows:
            index.add(k, v, float("inf"))
        return index

    async def add(self, partition: str, key: str, vector: Vector, ttl_seconds: int, max_entries: int) -> None:
        args: list[str | bytes | int | float] = [
            key, vector.astype(np.float32).tobytes(), int(self.clock() * 1000), max_entries, max(1, ttl_seconds), uuid.uuid4().hex
        ]
        await bounded(self._client.run(_ADD, self._keys(partition), args), self._timeout, "cache vectors")

    async def forget(self, partition: str, key: str) -> None:
        await bounded(self._client.run(_FORGET, self._keys(partition), [key, uuid.uuid4().hex]), self._timeout, "cache vectors")


def embedding_backend(binding: Binding) -> Backend:
    """The backend an embeddings binding is called at: its first by priority."""
    return min(binding.backends, key=lambda b: b.priority)


class Embedder:
    """Embeddings over HTTP from extproc itself (one aiohttp session per process)."""

    def __init__(self, timeout: float = 2.0, max_text_chars: int = 32_000) -> None:
        self.timeout = timeout
        self.max_text_chars = max_text_chars
        self._session: aiohttp.ClientSession | None = None

    async def embed(self, backend: Backend, text: str) -> Vector:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        url = f"{'https' if backend.tls else 'http'}://{backend.host}{backend.path_prefix}/v1/embeddings"
        body = orjson.dumps({"model": backend.model, "input": text[: self.max_text_chars]})
        headers = {"content-type": "application/json", **dict(backend.auth_headers)}
        try:
            async with self._session.post(url, data=body, headers=headers) as rsp:
                raw = await rsp.read()
                if rsp.status != 200:
                    raise EmbeddingFailed(f"the embeddings backend answered {rsp.status}")
            doc = orjson.loads(raw)
            return unit(doc["data"][0]["embedding"])
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise EmbeddingFailed(f"embedding failed: {type(exc).__name__}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
