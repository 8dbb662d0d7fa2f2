"""Quota stores: atomic reserve / settle / release of per-scope counters, in memory or in Redis.

Contract (the arithmetic and the overshoot bound are in ``extproc.quota``)
------------------------------------------------------------------------
* ``reserve(scope, limits, demand, now, ttl_hint)`` atomically checks ``used + demand <= amount``
  for every limit; if all pass it adds the demand to every windowed counter, takes one
  ``concurrent`` slot and returns a ``Reservation``; otherwise it adds nothing and the ``Decision``
  names the refusing limit. Limits on the same (metric, window) are merged, the strictest wins.
* ``settle(reservation, actual, now)`` adjusts each counter by ``actual - reserved`` in the windows
  the reservation was made in and frees its concurrent slot; ``release`` removes the reservation
  entirely. Both are idempotent (tracked by reservation id). Windows that have already been
  dropped are left alone, and no counter goes below zero.
* ``ttl_hint`` is how long a reservation may stay open (pass the request timeout). After it, the
  holder is presumed dead: its concurrent slot frees itself (a crashed replica's in-flight count
  heals) and a late settle/release is a no-op, so the reserved amount simply stays charged.
* ``now`` is epoch seconds from the caller's clock. Replicas sharing a Redis must keep their clocks
  in sync (NTP): skew shifts where a replica sees window boundaries, by the skew.
* Memory stays bounded: counters are dropped when their window ends (Redis: key expiry at the
  window end plus ``slack``), open reservations when their ``ttl_hint`` runs out, and the in-flight
  set of a scope never holds more than its ``concurrent`` amount.
* ``RedisQuotaStore`` raises ``StoreUnavailable`` when Redis errors or does not answer within
  ``timeout``. ``check`` turns that into a decision with a ``FailPolicy``: by default rate limits
  fail open and money budgets fail closed. A reserve that times out *after* Redis ran it leaves a
  reservation nobody settles; it self-heals as described for ``ttl_hint``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from extproc.quota import Decision, Demand, Limit, normalize_limits, reset_after, window_start
from extproc.redis_client import RedisClient, RedisReplyError, Script

__all__ = [
    "FailPolicy",
    "MemoryQuotaStore",
    "QuotaStore",
    "RedisQuotaStore",
    "Reservation",
    "StoreUnavailable",
    "check",
    "finish",
]

T = TypeVar("T")
_CONCURRENT_RETRY = 1.0  # a concurrent slot frees as soon as any request ends: retry soon


async def bounded(awaitable: Awaitable[T], timeout: float, what: str) -> T:
    """One Redis call within ``timeout``; any failure or delay becomes ``StoreUnavailable``."""
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except (TimeoutError, RedisReplyError, OSError) as exc:
        raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


class StoreUnavailable(Exception):
    """The shared store (Redis) failed or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """Everything settle/release need: the counters charged and what was charged to them."""

    id: str
    scope: str
    counters: tuple[tuple[str, int, int], ...]  # (metric, window seconds, window start)
    demand: Demand
    concurrent: bool


class QuotaStore(Protocol):
    async def reserve(
        self, scope: str, limits: Sequence[Limit], demand: Demand, now: float, ttl_hint: float
    ) -> tuple[Decision, Reservation | None]: ...

    async def settle(self, reservation: Reservation, actual: Demand, now: float) -> None: ...

    async def release(self, reservation: Reservation, now: float) -> None: ...

    async def usage(self, scope: str, limits: Sequence[Limit], now: float) -> dict[str, int]: ...


def _want(limit: Limit, demand: Demand) -> int:
    return 1 if limit.metric == "concurrent" else demand.amount(limit.metric)


def _first_failing(lims: Sequence[Limit], used: Sequence[int], wants: Sequence[int]) -> int | None:
    return next((i for i, lim in enumerate(lims) if used[i] + wants[i] > lim.amount), None)


def _decision(
    limits: Sequence[Limit], used: Sequence[int], wants: Sequence[int], fail: int | None, now: float
) -> Decision:
    remaining: dict[str, int] = {}
    caps: dict[str, int] = {}
    resets: dict[str, float] = {}  # windowed limits only: concurrent has no reset time
    for limit, u, w in zip(limits, used, wants, strict=True):
        after = u + w if fail is None else u  # a refused request added nothing
        remaining[limit.name] = max(limit.amount - after, 0)
        caps[limit.name] = limit.amount
        if limit.seconds:
            resets[limit.name] = reset_after(now, limit.seconds)
    if fail is None:
        return Decision(True, None, 0.0, remaining, caps, resets)
    refusing = limits[fail]
    retry = resets.get(refusing.name, _CONCURRENT_RETRY)
    return Decision(False, refusing, retry, remaining, caps, resets)


def fits(limits: Sequence[Limit], used: dict[str, int], demand: Demand, now: float) -> Decision:
    """Whether ``demand`` fits beside ``used`` (``QuotaStore.usage``), reserving nothing: a look
    before costly work, which ``reserve`` still decides (the usage may change in between)."""
    lims = normalize_limits(limits)
    counts = [used.get(lim.name, 0) for lim in lims]
    wants = [_want(lim, demand) for lim in lims]
    return _decision(lims, counts, wants, _first_failing(lims, counts, wants), now)


def _deltas(reservation: Reservation, actual: Demand | None) -> list[int]:
    """Per counter: actual - reserved (release: -reserved)."""
    final = actual if actual is not None else Demand(0, 0, 0, 0)
    return [final.amount(m) - reservation.demand.amount(m) for m, _, _ in reservation.counters]


class MemoryQuotaStore:
    """One replica's quotas in dicts. No method awaits, so each is atomic within the event loop."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, int, int], int] = {}
        self._ends: list[tuple[int, tuple[str, str, int, int]]] = []  # heap: (window end, key)
        self._inflight: dict[str, dict[str, float]] = {}  # scope -> reservation id -> deadline
        self._open: dict[str, float] = {}  # reservation id -> deadline: settle/release once
        self._deadlines: list[tuple[float, str, str]] = []  # heap: (deadline, id, scope)
        self._ids = itertools.count(1)

    def size(self) -> int:
        """Entries held (counters + open reservations): stays bounded as windows pass."""
        return len(self._counters) + len(self._open) + len(self._ends) + len(self._deadlines)

    def _prune(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            self._counters.pop(heapq.heappop(self._ends)[1], None)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid, scope = heapq.heappop(self._deadlines)
            self._close(rid, scope)

    def _close(self, rid: str, scope: str) -> bool:
        if self._open.pop(rid, None) is None:
            return False
        slots = self._inflight.get(scope)
        if slots is not None and slots.pop(rid, None) is not None and not slots:
            del self._inflight[scope]
        return True

    async def reserve(
        self, scope: str, limits: Sequence[Limit], demand: Demand, now: float, ttl_hint: float
    ) -> tuple[Decision, Reservation | None]:
        self._prune(now)
        lims = normalize_limits(limits)
        wants = [_want(lim, demand) for lim in lims]
        used = [self._used(scope, lim, now) for lim in lims]
        fail = _first_failing(lims, used, wants)
        if fail is not None:
            return _decision(lims, used, wants, fail, now), None
        rid = str(next(self._ids))
        counters = []
        concurrent = False
        deadline = now + max(ttl_hint, 1.0)
        for lim, want in zip(lims, wants, strict=True):
            if lim.metric == "concurrent":
                self._inflight.setdefault(scope, {})[rid] = deadline
                concurrent = True
                continue
            start = window_start(now, lim.seconds)
            key = (scope, lim.metric, lim.seconds, start)
            if key not in self._counters:
                heapq.heappush(self._ends, (start + lim.seconds, key))
            self._counters[key] = self._counters.get(key, 0) + want
            counters.append((lim.metric, lim.seconds, start))
        self._open[rid] = deadline
        heapq.heappush(self._deadlines, (deadline, rid, scope))
        reservation = Reservation(rid, scope, tuple(counters), demand, concurrent)
        return _decision(lims, used, wants, None, now), reservation

    def _used(self, scope: str, limit: Limit, now: float) -> int:
        if limit.metric == "concurrent":
            return len(self._inflight.get(scope, ()))
        return self._counters.get(
            (scope, limit.metric, limit.seconds, window_start(now, limit.seconds)), 0
        )

    def _finish(self, reservation: Reservation, actual: Demand | None, now: float) -> None:
        self._prune(now)
        if not self._close(reservation.id, reservation.scope):
            return  # already settled/released, or presumed dead after ttl_hint
        for (metric, seconds, start), delta in zip(
            reservation.counters, _deltas(reservation, actual), strict=True
        ):
            key = (reservation.scope, metric, seconds, start)
            if delta and key in self._counters:  # a dropped window stays dropped
                self._counters[key] = max(self._counters[key] + delta, 0)

    async def settle(self, reservation: Reservation, actual: Demand, now: float) -> None:
        self._finish(reservation, actual, now)

    async def release(self, reservation: Reservation, now: float) -> None:
        self._finish(reservation, None, now)

    async def usage(self, scope: str, limits: Sequence[Limit], now: float) -> dict[str, int]:
        self._prune(now)
        return {lim.name: self._used(scope, lim, now) for lim in normalize_limits(limits)}


# KEYS: counters 1..n, concurrent zset, reservation marker.
# ARGV: n, now_ms, concurrent limit (-1: none), deadline_ms, id, hold_ms, then per counter
#       (amount, want, ttl_ms). Returns {failing index or 0, used-before per limit}.
_RESERVE = Script("""
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local conc = tonumber(ARGV[3])
local used = {}
local fail = 0
for i = 1, n do
  local b = 6 + 3 * (i - 1)
  local u = tonumber(redis.call('GET', KEYS[i]) or '0')
  used[i] = u
  if fail == 0 and u + tonumber(ARGV[b + 2]) > tonumber(ARGV[b + 1]) then fail = i end
end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', now)
  local c = redis.call('ZCARD', KEYS[n + 1])
  used[n + 1] = c
  if fail == 0 and c + 1 > conc then fail = n + 1 end
end
if fail > 0 then return {fail, used} end
for i = 1, n do
  local b = 6 + 3 * (i - 1)
  redis.call('INCRBY', KEYS[i], ARGV[b + 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[b + 3])
end
if conc >= 0 then
  redis.call('ZADD', KEYS[n + 1], ARGV[4], ARGV[5])
  local ttl = tonumber(ARGV[4]) - now
  local pttl = redis.call('PTTL', KEYS[n + 1])
  if pttl < ttl then redis.call('PEXPIRE', KEYS[n + 1], ttl) end
end
redis.call('SET', KEYS[n + 2], '1', 'PX', ARGV[6])
return {0, used}
""")

# KEYS: marker, concurrent zset, counters. ARGV: id, delta per counter. Returns 1 if applied.
_FINISH = Script("""
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 3, #KEYS do
  local d = tonumber(ARGV[i - 1])
  if d ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], d) < 0 then redis.call('SET', KEYS[i], '0', 'KEEPTTL') end
  end
end
return 1
""")


class RedisQuotaStore:
    """Quotas shared by every replica through one Redis; each operation is one atomic script,
    so one round trip (EVALSHA; EVAL once after a Redis restart emptied its script cache).

    Keys share the ``{scope}`` hash tag so one script's keys live in one Redis Cluster slot.
    """

    def __init__(
        self, client: RedisClient, *, timeout: float = 0.25, prefix: str = "crdgol:q:", slack: float = 10.0
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._prefix = prefix
        self._slack_ms = int(slack * 1000)

    def _base(self, scope: str) -> str:
        return f"{self._prefix}{{{scope}}}:"

    def _counter(self, scope: str, metric: str, seconds: int, start: int) -> str:
        return f"{self._base(scope)}{metric}:{seconds}:{start}"

    async def _call(self, awaitable: Awaitable[T]) -> T:
        return await bounded(awaitable, self._timeout, "quota store")

    async def reserve(
        self, scope: str, limits: Sequence[Limit], demand: Demand, now: float, ttl_hint: float
    ) -> tuple[Decision, Reservation | None]:
        lims = normalize_limits(limits)
        windowed = [lim for lim in lims if lim.metric != "concurrent"]
        conc = next((lim for lim in lims if lim.metric == "concurrent"), None)
        # The script reports windowed counters first, then the concurrent count.
        ordered = [*windowed, *([conc] if conc is not None else [])]
        wants = [_want(lim, demand) for lim in ordered]
        now_ms = int(now * 1000)
        hold_ms = int(max(ttl_hint, 1.0) * 1000)
        rid = uuid.uuid4().hex
        keys: list[str] = []
        argv: list[int | str] = [len(windowed), now_ms, conc.amount if conc else -1]
        argv += [now_ms + hold_ms, rid, hold_ms + self._slack_ms]
        counters = []
        for lim, want in zip(windowed, wants, strict=False):
            start = window_start(now, lim.seconds)
            keys.append(self._counter(scope, lim.metric, lim.seconds, start))
            ttl_ms = int((start + lim.seconds - now) * 1000) + self._slack_ms
            argv += [lim.amount, want, ttl_ms]
            counters.append((lim.metric, lim.seconds, start))
        keys += [self._base(scope) + "conc", self._base(scope) + "r:" + rid]
        fail, used_raw = await self._call(self._client.run(_RESERVE, keys, argv))
        used = [int(u) for u in used_raw]
        index = int(fail) - 1 if int(fail) else None
        decision = _decision(ordered, used, wants, index, now)
        if index is not None:
            return decision, None
        return decision, Reservation(rid, scope, tuple(counters), demand, conc is not None)

    async def _apply(self, reservation: Reservation, actual: Demand | None) -> None:
        base = self._base(reservation.scope)
        keys = [base + "r:" + reservation.id, base + "conc"]
        keys += [self._counter(reservation.scope, *c) for c in reservation.counters]
        args: list[int | str] = [reservation.id, *_deltas(reservation, actual)]
        await self._call(self._client.run(_FINISH, keys, args))

    async def settle(self, reservation: Reservation, actual: Demand, now: float) -> None:
        await self._apply(reservation, actual)

    async def release(self, reservation: Reservation, now: float) -> None:
        await self._apply(reservation, None)

    async def usage(self, scope: str, limits: Sequence[Limit], now: float) -> dict[str, int]:
        lims = normalize_limits(limits)
        calls = []
        for lim in lims:  # concurrent calls share the connection: one pipelined round trip
            if lim.metric == "concurrent":
                calls.append(self._client.call("ZCOUNT", self._base(scope) + "conc", f"({int(now * 1000)}", "+inf"))
            else:
                start = window_start(now, lim.seconds)
                calls.append(self._client.call("GET", self._counter(scope, lim.metric, lim.seconds, start)))
        values = await self._call(asyncio.gather(*calls))
        return {lim.name: int(v or 0) for lim, v in zip(lims, values, strict=True)}


@dataclass(frozen=True, slots=True)
class FailPolicy:
    """What to do when the store is unavailable: rate limits fail open, money budgets closed."""

    rate_limits_open: bool = True
    budgets_open: bool = False


async def check(
    store: QuotaStore,
    scope: str,
    limits: Sequence[Limit],
    demand: Demand,
    now: float,
    policy: FailPolicy,
    on_store_error: Callable[[Exception], None],
    *,
    ttl_hint: float = 300.0,
) -> tuple[Decision, Reservation | None]:
    """``store.reserve`` with the fail policy applied when the store is unavailable.

    No limits: allowed without touching the store. Store down: refused (retry after 1 s) naming
    the first limit that fails closed, if any; otherwise allowed with no reservation.
    ``on_store_error`` is called once per failed check.
    """
    if not limits:
        return Decision(True), None
    try:
        return await store.reserve(scope, limits, demand, now, ttl_hint)
    except (StoreUnavailable, TimeoutError) as exc:
        on_store_error(exc)
    for limit in limits:
        fails_open = policy.budgets_open if limit.is_budget else policy.rate_limits_open
        if not fails_open:
            return Decision(False, limit, 1.0, limits={limit.name: limit.amount}), None
    return Decision(True), None


async def finish(
    store: QuotaStore,
    reservation: Reservation | None,
    actual: Demand | None,
    now: float,
    on_store_error: Callable[[Exception], None],
) -> None:
    """Settle with ``actual`` (or release when None); a store error is reported, never raised.

    Safe to call with no reservation (nothing was reserved, or the store was down at check time).
    """
    if reservation is None:
        return
    try:
        if actual is None:
            await store.release(reservation, now)
        else:
            await store.settle(reservation, actual, now)
    except (StoreUnavailable, TimeoutError) as exc:
        on_store_error(exc)
