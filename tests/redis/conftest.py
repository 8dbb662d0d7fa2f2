"""A real redis-server on a free loopback port, started once per session (.ci/run installs it)."""

from __future__ import annotations

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
from extproc.redis_client import RedisClient


class RedisServer:
    """One redis-server process; ``stop``/``start`` keep the port so clients can reconnect."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                out = subprocess.run(
                    ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, timeout=2
                ).stdout
            except (subprocess.TimeoutExpired, FileNotFoundError):
                out = b""
            if out.strip() == b"PONG":
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server is not installed: `apt-get install redis-server` (.ci/run does this)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A fresh client (per test: clients bind to the test's event loop) on an empty database."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store_client(redis_client: aioredis.Redis, redis_server: RedisServer) -> AsyncIterator[RedisClient]:
    """The stores' own client (the one extproc uses), on the database ``redis_client`` emptied."""
    client = RedisClient.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()
