"""Where cached answers live: in this process (bounded by bytes, least recently used first out) or
in Redis (shared by every replica).

Contract of a ``CacheStore``
---------------------------
* ``get(key)`` returns the stored value, or None when there is none or it expired.
* ``put(key, value, ttl_seconds)`` stores ``value`` for ``ttl_seconds``, replacing any old one.
* ``delete(key)`` forgets it.
* ``RedisCacheStore`` raises ``StoreUnavailable`` when Redis errors or does not answer within
  ``timeout``; the caller treats that as a miss (a cache's fail policy is always "miss") and goes
  on to the provider. Its keys are ``crdgol:cache:<key>`` with Redis's own expiry; Redis's
  ``maxmemory`` policy bounds it (``allkeys-lru`` is the one to set for a cache).
* ``MemoryCacheStore`` holds at most ``max_bytes`` of values (an entry larger than that is not
  stored) and at most ``max_entries`` entries; the least recently used go first. Expired entries
  are dropped when read and when space is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from extproc.quota_store import bounded
from extproc.redis_client import RedisClient

__all__ = ["CacheStore", "MemoryCacheStore", "RedisCacheStore"]

T = TypeVar("T")
KEY_PREFIX = "crdgol:cache:"


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None: ...

    async def delete(self, key: str) -> None: ...


class MemoryCacheStore:
    """One replica's answers, LRU within a byte budget. No method awaits: each is atomic."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires, value)

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return hit[1]

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        if len(value) > self.max_bytes:
            return
        self._drop(key)
        self._make_room(len(value))
        self._entries[key] = (self.clock() + ttl_seconds, value)
        self.bytes += len(value)

    async def delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[1])

    def _make_room(self, size: int) -> None:
        if self.bytes + size <= self.max_bytes and len(self._entries) < self.max_entries:
            return
        now = self.clock()
        for key in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            self._drop(key)
        while self._entries and (self.bytes + size > self.max_bytes or len(self._entries) >= self.max_entries):
            key = next(iter(self._entries))  # the least recently used
            self._drop(key)


class RedisCacheStore:
    def __init__(self, client: RedisClient, *, timeout: float = 0.5) -> None:
        self._client = client
        self._timeout = timeout

    async def _call(self, awaitable: Awaitable[T]) -> T:
        return await bounded(awaitable, self._timeout, "cache store")

    async def get(self, key: str) -> bytes | None:
        value = await self._call(self._client.call("GET", KEY_PREFIX + key))
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes, ttl_seconds: int) -> None:
        await self._call(self._client.call("SET", KEY_PREFIX + key, value, "EX", max(1, ttl_seconds)))

    async def delete(self, key: str) -> None:
        await self._call(self._client.call("DEL", KEY_PREFIX + key))
