"""The Redis stores against a real redis-server: the shared admission contract, replicas sharing
limits, key expiry, outages, and the Redis history store."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.history import Turn, history_key
from extproc.quota import Demand, Limit, Window
from extproc.quota_store import RedisQuotaStore, StoreUnavailable
from extproc.redis_client import RedisClient
from extproc.redis_history import RedisHistoryStore
from tests.redis.conftest import RedisServer
from tests.unit.test_quota_store import T0, AdmissionContract, tokens


class TestRedisQuotaStore(AdmissionContract):
    @pytest.fixture
    def store(self, store_client: RedisClient) -> RedisQuotaStore:
        return RedisQuotaStore(store_client, timeout=5.0)

    async def test_three_replicas_share_one_limit(self, redis_server: RedisServer) -> None:
        clients = [RedisClient.from_url(redis_server.url) for _ in range(3)]
        try:
            await clients[0].call("FLUSHDB")
            replicas = [RedisQuotaStore(c, timeout=5.0) for c in clients]
            limit = [Limit("requests", 20, Window.MINUTE)]
            results = await asyncio.gather(
                *(replicas[i % 3].reserve("acme", limit, Demand(), T0, 30) for i in range(50))
            )
            assert sum(d.allowed for d, _ in results) == 20
            assert await replicas[1].usage("acme", limit, T0) == {"requests/minute": 20}
        finally:
            for c in clients:
                await c.aclose()

    async def test_three_replicas_share_a_concurrency_limit(
        self, redis_server: RedisServer
    ) -> None:
        clients = [RedisClient.from_url(redis_server.url) for _ in range(3)]
        try:
            await clients[0].call("FLUSHDB")
            replicas = [RedisQuotaStore(c, timeout=5.0) for c in clients]
            limit = [Limit("concurrent", 7)]
            results = await asyncio.gather(
                *(replicas[i % 3].reserve("acme", limit, Demand(), T0, 30) for i in range(30))
            )
            held = [r for _, r in results if r is not None]
            assert len(held) == 7
            for i, r in enumerate(held):  # any replica may settle what another reserved
                await replicas[(i + 1) % 3].settle(r, Demand(), T0 + 1)
            assert await replicas[0].usage("acme", limit, T0 + 1) == {"concurrent": 0}
        finally:
            for c in clients:
                await c.aclose()

    async def test_every_key_expires(
        self, store: RedisQuotaStore, redis_client: aioredis.Redis
    ) -> None:
        limits = [
            Limit("requests", 100, Window.SECOND),
            Limit("total_tokens", 10**6, Window.DAY),
            Limit("cost_micros", 10**9, period_seconds=30 * 86_400),
            Limit("concurrent", 10),
        ]
        reservations = []
        for i in range(20):
            _, r = await store.reserve(f"s{i % 3}", limits, tokens(5, 5), T0 + i, 30)
            assert r is not None
            reservations.append(r)
        for i, r in enumerate(reservations):
            if i % 3 == 0:
                await store.settle(r, tokens(9, 9), T0 + 20)
            elif i % 3 == 1:
                await store.release(r, T0 + 20)  # the rest stay open: markers must expire too
        keys = [k async for k in redis_client.scan_iter(count=1000)]
        assert keys
        for key in keys:
            ttl = await redis_client.pttl(key)
            assert 0 < ttl <= (30 * 86_400 + 10) * 1000, (key, ttl)

    async def test_counters_expire_at_the_window_end_plus_slack(
        self, store_client: RedisClient, redis_client: aioredis.Redis
    ) -> None:
        store = RedisQuotaStore(store_client, slack=2.0)
        now = time.time()
        await store.reserve("s", [Limit("requests", 5, Window.MINUTE)], Demand(), now, 30)
        [key] = [k async for k in redis_client.scan_iter(match="*requests*")]
        expected = (60 - now % 60 + 2) * 1000
        assert abs(await redis_client.pttl(key) - expected) < 1000


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server this test may kill, freeze and restart without disturbing the others."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
async def own_client(own_server: RedisServer) -> AsyncIterator[RedisClient]:
    client = RedisClient.from_url(own_server.url)
    try:
        yield client
    finally:
        await client.aclose()


class TestOutages:
    TIMEOUT = 0.3
    LIMITS = [Limit("requests", 100, Window.MINUTE), Limit("concurrent", 5)]

    async def assert_unavailable_quickly(self, store: RedisQuotaStore) -> None:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.reserve("s", self.LIMITS, Demand(), T0, 30)
        assert time.monotonic() - started < self.TIMEOUT + 0.5

    async def test_killed_redis_surfaces_quickly_and_heals_after_restart(
        self, own_server: RedisServer, own_client: RedisClient
    ) -> None:
        store = RedisQuotaStore(own_client, timeout=self.TIMEOUT)
        history = RedisHistoryStore(own_client, timeout=self.TIMEOUT)
        assert (await store.reserve("s", self.LIMITS, Demand(), T0, 30))[0].allowed
        own_server.stop()
        await self.assert_unavailable_quickly(store)
        with pytest.raises(StoreUnavailable):
            await history.load("k", 10)
        own_server.start()  # same port, empty data, empty script cache
        for _ in range(20):  # the first call may still meet a dead pooled connection
            try:
                decision, r = await store.reserve("s", self.LIMITS, Demand(), T0, 30)
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the store did not recover after Redis restarted")
        assert decision.allowed and r is not None
        await store.settle(r, Demand(), T0)
        assert await store.usage("s", self.LIMITS, T0) == {"requests/minute": 1, "concurrent": 0}
        assert await history.load("k", 10) == []

    async def test_frozen_redis_times_out(
        self, own_server: RedisServer, own_client: RedisClient
    ) -> None:
        store = RedisQuotaStore(own_client, timeout=self.TIMEOUT)
        assert (await store.reserve("s", self.LIMITS, Demand(), T0, 30))[0].allowed
        assert own_server.proc is not None
        os.killpg(own_server.proc.pid, signal.SIGSTOP)  # alive but not answering
        try:
            await self.assert_unavailable_quickly(store)
        finally:
            os.killpg(own_server.proc.pid, signal.SIGCONT)
        decision, _ = await store.reserve("s", self.LIMITS, Demand(), T0, 30)
        assert decision.allowed


def pair(i: int) -> list[Turn]:
    return [Turn("user", f"q{i}"), Turn("assistant", f'a{i} ünïcødé "quoted"')]


class TestRedisHistoryStore:
    @pytest.fixture
    def history(self, store_client: RedisClient) -> RedisHistoryStore:
        return RedisHistoryStore(store_client, max_turns_cap=5, default_ttl_seconds=777)

    async def test_round_trip(self, history: RedisHistoryStore) -> None:
        key = history_key("acme", "team-a/chat", "key:0123", "s1")
        assert await history.load(key, 10) == []
        await history.append(key, pair(1), 10, 60)
        await history.append(key, pair(2), 10, 60)
        assert await history.load(key, 10) == pair(1) + pair(2)
        assert await history.load(key, 3) == pair(1)[1:] + pair(2)

    async def test_trim_keeps_exactly_the_most_recent(
        self, history: RedisHistoryStore, redis_client: aioredis.Redis
    ) -> None:
        key = history_key("acme", "b", "key:0123", "s")
        for i in range(4):
            await history.append(key, pair(i), 4, 60)
        assert await redis_client.llen(key) == 4
        assert await history.load(key, 4) == pair(2) + pair(3)
        await history.append(key, [Turn("user", "odd")], 3, 60)
        assert await history.load(key, 10) == [*pair(3), Turn("user", "odd")]

    async def test_the_store_cap_bounds_sessions(
        self, history: RedisHistoryStore, redis_client: aioredis.Redis
    ) -> None:
        key = history_key("acme", "b", "key:0123", "s")
        for i in range(4):
            await history.append(key, pair(i), 0, 60)  # 0: the store's cap (5)
        assert await redis_client.llen(key) == 5
        await history.append(key, pair(9), 100, 60)  # above the cap: capped
        assert await redis_client.llen(key) == 5
        assert len(await history.load(key, 0)) == 5

    async def test_ttl(self, history: RedisHistoryStore, redis_client: aioredis.Redis) -> None:
        key = history_key("acme", "b", "key:0123", "s")
        await history.append(key, pair(1), 10, 60)
        assert 0 < await redis_client.ttl(key) <= 60
        await history.append(key, pair(2), 10, 0)  # 0: the default TTL
        assert 700 < await redis_client.ttl(key) <= 777
        await history.append(key, [], 10, 30)  # nothing to add still refreshes a live session
        assert 0 < await redis_client.ttl(key) <= 30
        missing = history_key("acme", "b", "key:0123", "none")
        await history.append(missing, [], 10, 30)  # ...and creates no session
        assert await redis_client.exists(missing) == 0

    async def test_tenants_and_callers_are_scoped_by_key(self, history: RedisHistoryStore) -> None:
        acme = history_key("acme", "b", "key:0123", "same-session")
        globex = history_key("globex", "b", "key:0123", "same-session")
        colleague = history_key("acme", "b", "jwt:4567", "same-session")
        await history.append(acme, pair(1), 10, 60)
        await history.append(globex, pair(2), 10, 60)
        assert await history.load(acme, 10) == pair(1)
        assert await history.load(globex, 10) == pair(2)
        assert await history.load(colleague, 10) == []

    async def test_foreign_entries_are_skipped(
        self, history: RedisHistoryStore, redis_client: aioredis.Redis
    ) -> None:
        key = history_key("acme", "b", "key:0123", "s")
        await redis_client.rpush(key, b"not json", b'{"role": "user"}')
        await history.append(key, pair(1), 10, 60)
        assert await history.load(key, 10) == pair(1)
