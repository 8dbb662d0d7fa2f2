"""The lean Redis client against a real redis-server: replies reach the right caller, scripts
survive a flushed script cache, dropped connections heal, AUTH/SELECT/URLs, and no secret leaks."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from crdgol.stack import free_port
from extproc.redis_client import RedisAddress, RedisClient, RedisReplyError, Script
from tests.redis.conftest import RedisServer


async def test_concurrent_calls_each_get_their_own_reply(store_client: RedisClient) -> None:
    # 500 calls in flight on one connection: every caller must see the reply to its own command.
    keys = [f"k{i}" for i in range(500)]
    await asyncio.gather(*(store_client.call("SET", k, f"v{i}") for i, k in enumerate(keys)))
    values = await asyncio.gather(*(store_client.call("GET", k) for k in keys))
    assert values == [f"v{i}".encode() for i in range(500)]
    assert await store_client.call("GET", "missing") is None


async def test_an_error_reply_raises_and_the_connection_stays_usable(store_client: RedisClient) -> None:
    await store_client.call("SET", "s", "text")
    with pytest.raises(RedisReplyError, match="not an integer"):
        await store_client.call("INCR", "s")
    assert await store_client.call("INCRBY", "n", 5) == 5


async def test_a_caller_that_gives_up_does_not_shift_the_replies(store_client: RedisClient) -> None:
    # A call abandoned mid-flight (its caller timed out) keeps its place in the reply order.
    slow = asyncio.ensure_future(store_client.call("DEBUG", "SLEEP", "0.2"))
    await asyncio.sleep(0.05)
    slow.cancel()
    assert await store_client.call("ECHO", "after") == b"after"


async def test_scripts_reload_after_the_script_cache_is_flushed(
    store_client: RedisClient, redis_client: aioredis.Redis
) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await store_client.run(script, ["c"], [2]) == 2
    await redis_client.script_flush()  # what a restarted Redis looks like
    assert await store_client.run(script, ["c"], [3]) == 5


async def test_a_dropped_connection_is_replaced_on_the_next_call(
    store_client: RedisClient, redis_client: aioredis.Redis
) -> None:
    await store_client.call("SET", "x", "1")
    await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await asyncio.sleep(0.05)  # the client sees the connection close
    assert await store_client.call("GET", "x") == b"1"


def test_urls() -> None:
    a = RedisAddress.parse("rediss://app:s3cr%40t@redis.example:6380/2")
    assert (a.host, a.port, a.db, a.username, a.password, a.tls) == ("redis.example", 6380, 2, "app", "s3cr@t", True)
    assert RedisAddress.parse("redis://10.0.0.1") == RedisAddress(host="10.0.0.1")
    u = RedisAddress.parse("unix:///run/redis.sock?db=3")
    assert (u.unix_path, u.db) == ("/run/redis.sock", 3)
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.parse("http://redis:6379")
    client = RedisClient(a)
    assert "s3cr" not in repr(client) and "s3cr" not in repr(a)


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A redis-server that needs a password and listens on a Unix socket too."""
    port, sock = free_port(), str(tmp_path / "redis.sock")
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", "pa ss", "--unixsocket", sock, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port, sock
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture
async def clients() -> AsyncIterator[list[RedisClient]]:
    made: list[RedisClient] = []
    yield made
    for c in made:
        await c.aclose()


async def test_password_and_database_and_unix_socket(
    locked_server: tuple[int, str], clients: list[RedisClient]
) -> None:
    port, sock = locked_server
    good = RedisClient.from_url(f"redis://:pa%20ss@127.0.0.1:{port}/3")
    over_unix = RedisClient.from_url(f"unix://:pa%20ss@{sock}?db=3")
    wrong = RedisClient.from_url(f"redis://:nope@127.0.0.1:{port}/0")
    clients += [good, over_unix, wrong]
    await good.call("SET", "where", "db3")
    assert await over_unix.call("GET", "where") == b"db3"  # same database, other transport
    with pytest.raises(ConnectionError) as refused:
        await wrong.call("GET", "where")
    assert "nope" not in str(refused.value)


async def test_an_unreachable_server_fails_fast(clients: list[RedisClient]) -> None:
    client = RedisClient.from_url(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5)
    clients.append(client)
    started = time.monotonic()
    with pytest.raises(OSError):
        await client.call("PING")
    assert time.monotonic() - started < 1.0


async def test_a_frozen_server_does_not_pile_up_calls(own_redis: RedisServer, clients: list[RedisClient]) -> None:
    client = RedisClient.from_url(own_redis.url, stale_after=1.0, connect_timeout=0.3)
    clients.append(client)
    assert await client.call("PING") == b"PONG"
    assert own_redis.proc is not None
    os.killpg(own_redis.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            with pytest.raises((TimeoutError, OSError)):
                async with asyncio.timeout(0.2):
                    await client.call("PING")
        stuck = client._conn
        assert stuck is not None and len(stuck.waiting) == 3
        await asyncio.sleep(0.7)
        # The oldest call is now stale: the next call drops that connection (and the calls
        # queued on it) instead of queueing behind them.
        with pytest.raises((TimeoutError, OSError)):
            async with asyncio.timeout(0.5):
                await client.call("PING")
        assert not stuck.waiting and client._conn is not stuck
    finally:
        os.killpg(own_redis.proc.pid, signal.SIGCONT)
    for _ in range(20):
        try:
            assert await client.call("PING") == b"PONG"
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the client did not recover after the server thawed")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()
