"""Semantic lookups: embeddings of a request's last user message, compared by cosine similarity
with those of answers already stored in the same partition (``extproc.cache_key``).

The index is a brute-force scan in numpy: per partition a matrix of unit-norm float32 rows (a
ring of at most ``max_entries``, the oldest overwritten first), one matrix-vector product per
lookup. Measured against usearch and hnswlib in ``benchmarks/cache_index.py``: at the sizes one
partition holds (a binding's FAQ, up to a few thousand questions) the scan is as fast or faster
and has no build cost or extra dependency; see ``benchmarks/results/cache_index.json``.

Contract of a ``VectorStore``
----------------------------
* ``search(partition, vector, threshold)`` returns the entry key of the most similar live
  vector whose cosine similarity is at least ``threshold``, or None.
* ``add(partition, key, vector, ttl_seconds, max_entries)`` remembers ``vector`` as pointing at
  the cached answer ``key``; a partition keeps at most ``max_entries`` (the oldest go first).
* ``forget(partition, key)`` drops it (its answer expired or was evicted).
* ``MemoryVectorStore`` is this replica's alone. ``RedisVectorStore`` keeps every partition's
  vectors in a Redis stream (capped at ``max_entries``, expiring with the TTL), so all replicas
  share them; each replica keeps its own numpy matrices and, per lookup, reads only the entries
  added since its last look (one round trip). Either way a replica's matrices are bounded by
  ``max_bytes`` (least recently used partitions dropped; a dropped partition is read again from
  Redis when next asked). Redis errors raise ``StoreUnavailable`` (the caller misses).

``Embedder.embed`` calls the embeddings backend of the binding the cache names (OpenAI API,
``POST {endpoint}/v1/embeddings``) with its credential; any failure raises ``EmbeddingFailed``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from extproc.policy import Backend, Binding
from extproc.quota_store import bounded
from extproc.redis_client import RedisClient, Script

__all__ = ["Embedder", "Embedding", "EmbeddingFailed", "MemoryVectorStore", "RedisVectorStore", "VectorIndex", "VectorStore", "unit"]

Vector = npt.NDArray[np.float32]


class EmbeddingFailed(Exception):
    """The embeddings backend could not give a vector (the lookup misses).

    ``status``: the backend's HTTP status when it answered with an error (0: it did not answer
    one). ``sent``: the request may have reached the backend (everything but a failed connect),
    so the caller's quota is charged for it (``extproc.cache_charge``).
    """

    def __init__(self, message: str, *, status: int = 0, sent: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Embedding:
    vector: Vector
    input_tokens: int  # the backend's usage block (0: it reported none)


def unit(values: Any) -> Vector:
    v = np.asarray(values, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(v))
    if not v.size or not math.isfinite(norm) or norm == 0.0:
        raise EmbeddingFailed("the embedding is empty or zero")
    out: Vector = v / norm
    return out


class VectorIndex:
    """One partition: a ring of unit rows, their expiry times and the keys they point at."""

    __slots__ = ("dim", "expires", "keys", "limit", "matrix", "n", "next", "rows")

    def __init__(self, dim: int, limit: int) -> None:
        self.dim, self.limit = dim, max(1, limit)
        cap = min(16, self.limit)
        self.matrix: Vector = np.zeros((cap, dim), dtype=np.float32)
        self.expires = np.full(cap, -np.inf)
        self.keys: list[str] = [""] * cap
        self.rows: dict[str, int] = {}  # key -> its row
        self.n = 0
        self.next = 0  # the oldest row, overwritten once the ring is full

    def add(self, key: str, vector: Vector, expires: float) -> None:
        known = self.rows.get(key)
        if known is not None:
            i = known
        elif self.n < len(self.keys) or self.n < self.limit:
            if self.n == len(self.keys):
                self._grow(min(self.limit, 2 * len(self.keys)))
            i = self.n
            self.n += 1
        else:
            i = self.next
            self.next = (self.next + 1) % self.limit
            self.rows.pop(self.keys[i], None)  # the oldest row's key goes with it
        self.rows[key] = i
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
        i = self.rows.get(key)
        if i is not None:
            self.expires[i] = -np.inf

    def best(self, vector: Vector, threshold: float, now: float) -> str | None:
        if not self.n or vector.shape[0] != self.dim:
            return None
        # float32 @ float32 is one BLAS call; a float64 query would take numpy's slow mixed path.
        scores = self.matrix[: self.n] @ vector.astype(np.float32, copy=False)
        scores[self.expires[: self.n] <= now] = -np.inf
        i = int(np.argmax(scores))
        return self.keys[i] if float(scores[i]) >= threshold else None


class VectorStore(Protocol):
    async def search(self, partition: str, vector: Vector, threshold: float) -> str | None: ...

    async def add(self, partition: str, key: str, vector: Vector, ttl_seconds: int, max_entries: int) -> None: ...

    async def forget(self, partition: str, key: str) -> None: ...


class Partitions:
    """Partitions' indexes, least recently used first out once their matrices pass ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._parts: OrderedDict[str, VectorIndex] = OrderedDict()

    def __len__(self) -> int:
        return len(self._parts)

    def get(self, partition: str) -> VectorIndex | None:
        index = self._parts.get(partition)
        if index is not None:
            self._parts.move_to_end(partition)
        return index

    def add(self, partition: str, key: str, vector: Vector, expires: float, limit: int) -> None:
        index = self._parts.get(partition)
        if index is None or index.dim != vector.shape[0] or index.limit != limit:
            self.drop(partition)
            index = self._parts[partition] = VectorIndex(vector.shape[0], limit)
            self.bytes += index.matrix.nbytes
        self._parts.move_to_end(partition)
        before = index.matrix.nbytes
        index.add(key, vector, expires)
        self.bytes += index.matrix.nbytes - before
        while self.bytes > self.max_bytes and len(self._parts) > 1:
            self.drop(next(iter(self._parts)))

    def drop(self, partition: str) -> None:
        old = self._parts.pop(partition, None)
        if old is not None:
            self.bytes -= old.matrix.nbytes


class MemoryVectorStore:
    def __init__(self, max_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.parts = Partitions(max_bytes)

    def __len__(self) -> int:
        return len(self.parts)

    async def search(self, partition: str, vector: Vector, threshold: float) -> str | None:
        index = self.parts.get(partition)
        return index.best(vector, threshold, self.clock()) if index is not None else None

    async def add(self, partition: str, key: str, vector: Vector, ttl_seconds: int, max_entries: int) -> None:
        self.parts.add(partition, key, vector, self.clock() + ttl_seconds, max_entries)

    async def forget(self, partition: str, key: str) -> None:
        index = self.parts.get(partition)
        if index is not None:
            index.remove(key)


# KEYS: the partition's stream. ARGV: entry key, vector bytes, expiry (epoch s), max entries, ttl.
_ADD = Script("""
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], '*', 'k', ARGV[1], 'v', ARGV[2], 'e', ARGV[3], 'm', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
""")


class RedisVectorStore:
    """Vectors in one Redis stream per partition, shared by replicas. Each replica keeps its own
    matrices and reads only the entries added since it last looked (``XRANGE`` after the last id it
    holds: one round trip, usually empty). The stream is capped at the partition's ``max_entries``
    like the replica's ring, so entries one replica never saw were evicted everywhere anyway.
    ``forget`` is local: another replica that matches an expired answer finds it gone and forgets
    it too."""

    def __init__(
        self, client: RedisClient, *, timeout: float = 0.5, max_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._timeout = timeout
        self.clock = clock
        self.parts = Partitions(max_bytes)
        self._last: dict[str, bytes] = {}  # partition -> the last stream id this replica holds

    @staticmethod
    def _key(partition: str) -> str:
        return "crdgol:cachevec:{" + partition + "}"  # one hash slot per partition (Redis Cluster)

    async def search(self, partition: str, vector: Vector, threshold: float) -> str | None:
        held = self.parts.get(partition)
        last = self._last.get(partition) if held is not None else None
        start = b"(" + last if last else b"-"
        entries = await bounded(self._client.call("XRANGE", self._key(partition), start, "+"), self._timeout, "cache vectors")
        for entry_id, fields in entries or ():
            f = dict(zip(fields[::2], fields[1::2], strict=False))
            try:
                row = np.frombuffer(f[b"v"], dtype=np.float32)
                self.parts.add(partition, f[b"k"].decode(), row, float(f[b"e"]), int(f[b"m"]))
            except (KeyError, ValueError, UnicodeDecodeError):
                continue  # not written by this store
            self._last[partition] = entry_id
        if len(self._last) > 4 * len(self.parts) + 1024:
            self._last = {p: i for p, i in self._last.items() if self.parts.get(p) is not None}
        index = self.parts.get(partition)
        return index.best(vector, threshold, self.clock()) if index is not None else None

    async def add(self, partition: str, key: str, vector: Vector, ttl_seconds: int, max_entries: int) -> None:
        ttl = max(1, ttl_seconds)
        args: list[str | bytes | int | float] = [key, vector.astype(np.float32).tobytes(), self.clock() + ttl, max_entries, ttl]
        await bounded(self._client.run(_ADD, [self._key(partition)], args), self._timeout, "cache vectors")

    async def forget(self, partition: str, key: str) -> None:
        index = self.parts.get(partition)
        if index is not None:
            index.remove(key)


def embedding_backend(binding: Binding) -> Backend:
    """The backend an embeddings binding is called at: its first by priority."""
    return min(binding.backends, key=lambda b: b.priority)


# An embeddings answer for one input is a few tens of KiB of floats; far past that is a hostile or
# broken backend, read no further.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class Embedder:
    """Embeddings over HTTP from extproc itself (one aiohttp session per process)."""

    def __init__(self, timeout: float = 2.0, max_text_chars: int = 32_000, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.timeout = timeout
        self.max_text_chars = max_text_chars
        self.max_answer_bytes = max_answer_bytes
        self._session: aiohttp.ClientSession | None = None

    async def embed(self, backend: Backend, text: str) -> Embedding:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        url = f"{'https' if backend.tls else 'http'}://{backend.host}{backend.path_prefix}/v1/embeddings"
        body = orjson.dumps({"model": backend.model, "input": text[: self.max_text_chars]})
        headers = {"content-type": "application/json", **dict(backend.auth_headers)}
        try:
            async with self._session.post(url, data=body, headers=headers) as rsp:
                if rsp.status != 200:
                    raise EmbeddingFailed(f"the embeddings backend answered {rsp.status}", status=rsp.status)
                raw = await self._bounded_read(rsp)
            doc = orjson.loads(raw)
            usage = doc.get("usage")
            tokens = usage.get("prompt_tokens", 0) if isinstance(usage, dict) else 0
            tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0
            return Embedding(unit(doc["data"][0]["embedding"]), tokens)
        except aiohttp.ClientConnectorError as exc:
            raise EmbeddingFailed(f"embedding failed: {type(exc).__name__}", sent=False) from None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise EmbeddingFailed(f"embedding failed: {type(exc).__name__}") from None

    async def _bounded_read(self, rsp: aiohttp.ClientResponse) -> bytes:
        """The answer's body, refused past ``max_answer_bytes``: the backend is a binding author's,
        and this process is every tenant's."""
        if rsp.content_length is not None and rsp.content_length > self.max_answer_bytes:
            raise EmbeddingFailed(f"the embeddings answer is over {self.max_answer_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in rsp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_answer_bytes:
                raise EmbeddingFailed(f"the embeddings answer is over {self.max_answer_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        """Close the HTTP session (its pooled connections): at shutdown."""
        if self._session is not None:
            await self._session.close()
            self._session = None
