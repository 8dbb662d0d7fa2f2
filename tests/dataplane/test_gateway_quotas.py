"""Quotas through real Envoy, in memory (one extproc): the examples/quotas scenario."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crdgol.stack import Stack
from tests.conftest import running_example

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}


@pytest.fixture
def quotas(tmp_path: Path) -> Iterator[Stack]:
    with running_example(tmp_path, "quotas") as stack:
        yield stack


async def burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as c:
        return list(await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=BODY, headers=HEADERS) for _ in range(n))))


def test_eight_concurrent_requests_give_five_answers_and_three_429s(quotas: Stack) -> None:
    results = asyncio.run(burst(quotas.url, 8))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 5 + [429] * 3, codes
    refused = [r for r in results if r.status_code == 429]
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    ok = [r for r in results if r.status_code == 200]
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert int(r.headers["x-ratelimit-remaining-tokens"]) < 20000
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining == [0, 1, 2, 3, 4]


def test_usage_is_settled_with_the_real_token_count(quotas: Stack) -> None:
    first = httpx.post(f"{quotas.url}/v1/chat/completions", json=BODY, headers=HEADERS, timeout=30)
    # Usage is settled off the request path, from Envoy's access log, within its flush interval
    # (20 ms) of the response: README, "Quotas".
    time.sleep(0.2)
    second = httpx.post(f"{quotas.url}/v1/chat/completions", json=BODY, headers=HEADERS, timeout=30)
    assert first.status_code == second.status_code == 200
    used_first = first.json()["usage"]["total_tokens"]
    # Both requests are identical, so both reserved the same estimate (prompt + max_tokens).
    reservation = 20000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert reservation > used_first
    # By the time the second was checked, the first had been settled at its real usage.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 20000 - used_first - reservation
