"""The issue's "what it must reach": 30 s of mixed good and bad traffic at 64 connections through
``crdgol up`` (quotas in a real Redis), with extproc killed -9 once and the controller killed -9
once, and the supervisor bringing each back.

Checked from what the clients saw and what the gateway charged:

* every response has an intended status: 200 (or 429 on the deliberately tight binding) for good
  requests, 400/401/404/405 for the bad ones, each with a JSON error body; a 503 with a JSON body
  only while extproc is down; a broken connection only for a request in flight when extproc died;
* no request is served without policy: no bad request is ever answered 200;
* every answered request is charged: the tenant's request counter (read back through the
  ``x-ratelimit-remaining-*`` headers) covers every 200, and at most the good requests that ended
  otherwise; its token counter covers the usage of every 200;
* the gateway answers again within seconds after each kill (not at all interrupted by the
  controller's), and extproc's memory after the burst is within 10% of its warmed-up baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from crdgol.stack import free_port
from tests.redis.conftest import RedisServer
from tests.up_process import Up, start_up, stop_up

DURATION = 30.0
CONNECTIONS = 64
KILL_EXTPROC_AT = 8.0
KILL_CONTROLLER_AT = 18.0
REQUEST_LIMIT = 100_000_000
TOKEN_LIMIT = 1_000_000_000_000
MAX_TOKENS = 64
KEY = "sk-crdgol-quickstart"

BINDINGS = f"""
apiVersion: crdgol.io/v1alpha1
kind: AIModelBinding
metadata: {{name: chaos-chat, namespace: default}}
spec:
  model: chaos-chat
  tenants: [quickstart]
  backends:
    - {{name: primary, provider: openai-compatible, endpoint: "MOCK/v1", model: mock-gpt, credentialsRef: {{name: mock-provider, key: apiKey}}}}
  quotas:
    tenants:
      quickstart:
        requests: [{{amount: {REQUEST_LIMIT}, per: day}}]
        tokens: [{{amount: {TOKEN_LIMIT}, per: day, type: total}}]
        defaultMaxTokens: {MAX_TOKENS}
    failPolicy: {{rateLimits: closed, budgets: closed}}
---
apiVersion: crdgol.io/v1alpha1
kind: AIModelBinding
metadata: {{name: tight-chat, namespace: default}}
spec:
  model: tight-chat
  tenants: [quickstart]
  backends:
    - {{name: primary, provider: openai-compatible, endpoint: "MOCK/v1", model: mock-gpt, credentialsRef: {{name: mock-provider, key: apiKey}}}}
  quotas:
    tenants:
      quickstart:
        requests: [{{amount: 3, per: minute}}]
"""


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    weight: int
    method: str
    body: bytes | None
    key: str
    ok: frozenset[int]  # statuses intended for it while extproc is up
    good: bool = False  # a request the tenant is charged for when answered
    stream: bool = False


def _chat(model: str, stream: bool = False, max_tokens: int | None = None) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "chaos " * 8}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


KINDS = (
    Kind("good", 40, "POST", _chat("chaos-chat"), KEY, frozenset({200}), good=True),
    Kind("good-stream", 15, "POST", _chat("chaos-chat", stream=True), KEY, frozenset({200}), good=True, stream=True),
    Kind("tight", 5, "POST", _chat("tight-chat"), KEY, frozenset({200, 429})),
    Kind("bad-key", 10, "POST", _chat("chaos-chat"), "sk-not-a-key", frozenset({401})),
    Kind("unknown-model", 10, "POST", _chat("no-such-model"), KEY, frozenset({404})),
    Kind("malformed", 10, "POST", b'{"model": "chaos-chat", "messages": [', KEY, frozenset({400})),
    Kind("no-messages", 5, "POST", b'{"model": "chaos-chat"}', KEY, frozenset({400})),
    Kind("wrong-method", 5, "GET", None, KEY, frozenset({405})),
)


@dataclass(slots=True)
class Outcome:
    kind: Kind
    start: float
    end: float
    status: int = 0  # 0: no response (connection broken)
    json_error: bool = False  # a non-200 whose body is {"error": {... "message": non-empty}}
    tokens: int = 0  # usage.total_tokens of a complete 200
    complete: bool = False  # a 200 whose body (or stream, to [DONE]) arrived whole


async def one(session: aiohttp.ClientSession, url: str, kind: Kind) -> Outcome:
    out = Outcome(kind, time.monotonic(), 0.0)
    headers = {"authorization": f"Bearer {kind.key}", "content-type": "application/json"}
    try:
        async with session.request(kind.method, url, data=kind.body, headers=headers) as r:
            out.status = r.status
            raw = await r.read()
        if out.status == 200 and kind.stream:
            events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
            usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
            out.complete = bool(events) and events[-1] == "[DONE]" and len(usage) == 1
            out.tokens = usage[0]["total_tokens"] if usage else 0
        elif out.status == 200:
            doc = json.loads(raw)
            out.complete, out.tokens = True, int(doc.get("usage", {}).get("total_tokens", 0))
        else:
            err = json.loads(raw).get("error") if raw else None
            out.json_error = isinstance(err, dict) and bool(err.get("message"))
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError, KeyError):
        pass
    out.end = time.monotonic()
    return out


async def drive(url: str, until: float, connections: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    population = [k for k in KINDS for _ in range(k.weight)]
    outcomes: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout) as session:

        async def worker() -> None:
            while time.monotonic() < until:
                outcomes.append(await one(session, url, rng.choice(population)))

        await asyncio.gather(*(worker() for _ in range(connections)))
    return outcomes


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def manifests(tmp_path: Path, mock_port: int) -> Path:
    folder = tmp_path / "chaos"
    folder.mkdir()
    secrets = (Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "secrets.yaml").read_text()
    (folder / "secrets.yaml").write_text(secrets)
    (folder / "bindings.yaml").write_text(BINDINGS.replace("MOCK", f"http://127.0.0.1:{mock_port}"))
    return folder


@pytest.fixture
def redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path)
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


async def probe(url: str) -> tuple[int, int]:
    """(requests, tokens) the tenant has been charged on chaos-chat, from the quota headers of one
    more request (which reserves 1 request and its own token estimate: subtracted by the caller)."""
    async with aiohttp.ClientSession() as s, s.post(
        url, data=_chat("chaos-chat", max_tokens=1), headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        return (
            REQUEST_LIMIT - int(r.headers["x-ratelimit-remaining-requests"]),
            TOKEN_LIMIT - int(r.headers["x-ratelimit-remaining-tokens"]),
        )


async def test_mixed_traffic_at_64_connections_survives_killing_extproc_and_the_controller(tmp_path: Path, redis: RedisServer) -> None:
    port, mock_port, metrics_port = free_port(), free_port(), free_port()
    folder = manifests(tmp_path, mock_port)
    up: Up = start_up(folder, port, mock_port, metrics_port, tmp_path / "up.log", "--redis-url", redis.url, model="chaos-chat")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        # Warm up, then take extproc's memory baseline.
        await drive(url, time.monotonic() + 3, 8, seed=1)
        await asyncio.sleep(1)
        first_extproc = up.children()["extproc"]
        baseline = rss_kib(first_extproc)
        before_requests, before_tokens = await probe(url)

        began = time.monotonic()
        traffic = asyncio.create_task(drive(url, began + DURATION, CONNECTIONS, seed=2))
        await asyncio.sleep(KILL_EXTPROC_AT)
        killed_extproc = time.monotonic()
        os.kill(first_extproc, signal.SIGKILL)
        await asyncio.sleep(KILL_CONTROLLER_AT - KILL_EXTPROC_AT)
        killed_controller = time.monotonic()
        os.kill(up.children()["controller"], signal.SIGKILL)
        outcomes = await traffic

        await asyncio.sleep(3)  # let the burst's leftovers go
        extproc = up.children()["extproc"]
        after = rss_kib(extproc)
        after_requests, after_tokens = await probe(url)
    finally:
        code = stop_up(up)
    assert code == 0
    said = up.said()
    assert "extproc exited with signal 9; restarting it" in said and "controller exited with signal 9; restarting it" in said
    assert extproc != first_extproc

    by_kind = Counter((o.kind.name, o.status) for o in outcomes)
    summary = ", ".join(f"{k}:{s}={n}" for (k, s), n in sorted(by_kind.items()))
    assert len(outcomes) > 1000, summary

    # When was extproc back? The end of the first complete good 200 that started after the kill.
    recovered = min(o.end for o in outcomes if o.kind.good and o.complete and o.start > killed_extproc)
    assert recovered - killed_extproc < 10, f"extproc took {recovered - killed_extproc:.1f}s to come back"

    def extproc_down(o: Outcome) -> bool:
        return o.start < recovered + 0.5 and o.end > killed_extproc

    wrong = []
    for o in outcomes:
        if o.status == 0:
            # Broken only if extproc died under it.
            if not (o.start <= killed_extproc <= o.end):
                wrong.append(("broken", o.kind.name, round(o.start - began, 2)))
        elif o.status == 503:
            if not (extproc_down(o) and o.json_error):
                wrong.append((503, o.kind.name, round(o.start - began, 2), o.json_error))
        elif o.status not in o.kind.ok:
            wrong.append((o.status, o.kind.name, round(o.start - began, 2)))
        elif o.status != 200 and not o.json_error:
            wrong.append((o.status, o.kind.name, "no JSON error body"))
        elif o.status == 200 and not o.complete and not (o.start <= killed_extproc <= o.end):
            wrong.append((200, o.kind.name, "incomplete", round(o.start - began, 2)))
    assert not wrong, f"{wrong[:20]} ({len(wrong)} in all; {summary})"

    # The controller's death interrupted nothing: good requests kept being answered right after.
    assert any(o.kind.good and o.complete and killed_controller < o.start < killed_controller + 2 for o in outcomes)

    # No request without policy: the bad ones were never served.
    assert not [o for o in outcomes if not o.kind.good and o.kind.name != "tight" and o.status == 200]

    # Every answered request charged, and nothing charged that was never sent on.
    answered = [o for o in outcomes if o.kind.good and o.status == 200 and o.complete]
    others = [o for o in outcomes if o.kind.good and not (o.status == 200 and o.complete)]
    charged = after_requests - before_requests - 1  # the second probe reserved one
    assert len(answered) <= charged <= len(answered) + len(others), (charged, len(answered), len(others))
    usage = sum(o.tokens for o in answered)
    assert all(o.tokens > 0 for o in answered)
    charged_tokens = after_tokens - before_tokens  # includes the second probe's small estimate
    per_request_bound = len(_chat("chaos-chat", stream=True)) // 4 + MAX_TOKENS + 50
    assert usage <= charged_tokens <= usage + (len(others) + 1) * per_request_bound, (charged_tokens, usage, len(others))

    print(
        f"\nchaos: {len(outcomes)} requests in {DURATION:.0f}s at c{CONNECTIONS}; {summary}; extproc back after "
        f"{recovered - killed_extproc:.2f}s; charged {charged} requests for {len(answered)} answered ({len(others)} good not answered), "
        f"{charged_tokens} tokens for {usage} used; extproc RSS {baseline} KiB warmed, {after} KiB after the burst"
    )
    # Memory: the burst's extproc is back near the warmed-up baseline.
    assert after <= baseline * 1.10, f"extproc RSS {after} KiB after the burst vs {baseline} KiB baseline"
