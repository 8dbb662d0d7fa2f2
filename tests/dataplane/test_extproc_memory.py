"""Bounded resources through real Envoy: a burst of maximum-size requests, then back to baseline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from tests.conftest import running_example

HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}
BIG = 3_600_000  # just under the gateway's 4 MiB request limit


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def big_body(i: int) -> dict[str, object]:
    return {"model": "quickstart-chat", "messages": [{"role": "user", "content": f"{i} " + "a" * BIG}]}


async def burst(url: str, clients: int, rounds: int) -> list[int]:
    async with httpx.AsyncClient(timeout=60) as c:

        async def one(i: int) -> list[int]:
            codes = []
            for r in range(rounds):
                resp = await c.post(f"{url}/v1/chat/completions", json=big_body(i * rounds + r), headers=HEADERS)
                codes.append(resp.status_code)
            return codes

        return [code for codes in await asyncio.gather(*(one(i) for i in range(clients))) for code in codes]


def test_a_burst_of_maximum_size_requests_keeps_extproc_memory_bounded_and_gives_it_back(tmp_path: Path) -> None:
    with running_example(tmp_path, "quickstart") as stack:
        pid = stack.procs["extproc"].pid
        small = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]}
        # Warm: every code path has run once, a maximum-size request included (first-use
        # allocations, such as gRPC's buffers growing to the largest message, are not a leak).
        for i in range(20):
            body = big_body(-1 - i) if i < 2 else small
            assert httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30).status_code == 200
        time.sleep(1)
        baseline = rss_mib(pid)

        peak = baseline
        done = False

        async def run() -> list[int]:
            nonlocal peak, done

            async def sample() -> None:
                nonlocal peak
                while not done:
                    peak = max(peak, rss_mib(pid))
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            try:
                return await burst(stack.url, clients=12, rounds=3)
            finally:
                done = True
                await sampler

        codes = asyncio.run(run())
        # Every request is answered: served, or shed with a clear 503 when extproc is full.
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 12, codes
        # Bounded: 12 bodies of 3.6 MB in flight must not cost more than a few copies of each.
        assert peak - baseline < 300, (baseline, peak)
        deadline = time.monotonic() + 10
        while (now := rss_mib(pid)) > baseline * 1.10 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert now <= baseline * 1.10, (baseline, peak, now)
