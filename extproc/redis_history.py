"""A ``HistoryStore`` in Redis: sessions survive restarts and are shared by every replica.

Contract: the ``HistoryStore`` protocol of ``extproc.history``, with the same bounds as
``MemoryHistoryStore``. Each session is a Redis list of orjson-encoded turns, oldest first, under
the ``history_key`` string (scoped by tenant and caller, so keys never collide across them).

* ``append`` is one atomic Lua script (one round trip): RPUSH the turns, LTRIM to the ``max_turns``
  most recent, EXPIRE ``ttl_seconds``. Appending nothing only refreshes the TTL of an existing
  session.
* ``load`` is LRANGE of the ``max_turns`` most recent turns; a missing or expired session is empty.
* ``max_turns <= 0`` means ``max_turns_cap`` and larger values are capped by it; ``ttl_seconds <= 0``
  means ``default_ttl_seconds``: every session is bounded in length and lifetime.
* Redis errors and calls slower than ``timeout`` raise ``StoreUnavailable``. Entries that do not
  decode (written by something else) are skipped rather than failing the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TypeVar

import orjson

from extproc.history import Turn
from extproc.quota_store import bounded
from extproc.redis_client import RedisClient, Script

__all__ = ["RedisHistoryStore"]

T = TypeVar("T")

# KEYS: the session. ARGV: keep (the most recent turns kept), ttl seconds, the turns to append.
# No reader sees a half-append: a script runs alone.
_APPEND = Script("""
if #ARGV > 2 then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
""")


class RedisHistoryStore:
    def __init__(
        self,
        client: RedisClient,
        *,
        timeout: float = 0.5,
        max_turns_cap: int = 1_000,
        default_ttl_seconds: int = 86_400,
    ) -> None:
        if max_turns_cap < 1:
            raise ValueError("max_turns_cap must be at least 1")
        self._client = client
        self._timeout = timeout
        self._max_turns_cap = max_turns_cap
        self._default_ttl = max(1, default_ttl_seconds)

    def _limit(self, max_turns: int) -> int:
        return self._max_turns_cap if max_turns <= 0 else min(max_turns, self._max_turns_cap)

    async def _call(self, awaitable: Awaitable[T]) -> T:
        return await bounded(awaitable, self._timeout, "history store")

    async def load(self, key: str, max_turns: int) -> list[Turn]:
        raw = await self._call(self._client.call("LRANGE", key, -self._limit(max_turns), -1))
        turns = []
        for item in raw:
            try:
                data = orjson.loads(item)
                turns.append(Turn(str(data["role"]), str(data["content"])))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
        return turns

    async def append(
        self, key: str, turns: Sequence[Turn], max_turns: int, ttl_seconds: int, max_chars: int = 0
    ) -> None:
        # max_chars is not applied here: Redis memory is bounded by max_turns and the TTL, and the
        # budget still applies when the turns are injected.
        # Like the memory store: nothing to add creates no session (EXPIRE on a missing key is a
        # no-op), but refreshes a live one.
        ttl = ttl_seconds if ttl_seconds > 0 else self._default_ttl
        encoded = [orjson.dumps({"role": t.role, "content": t.content}) for t in turns]
        await self._call(self._client.run(_APPEND, [key], [self._limit(max_turns), ttl, *encoded]))
