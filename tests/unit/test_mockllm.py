"""Tests for the bundled mock LLM upstream: the official SDKs must parse what it sends."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from mockllm.server import MockSettings, build_app, main, serve

Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Factory: start a mock on a free loopback port and return its base URL."""
    runners: list[web.AppRunner] = []

    async def _start(**kwargs: Any) -> str:
        runner = web.AppRunner(build_app(MockSettings(**kwargs)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def base(start: Start) -> str:
    return await start(name="alpha")


def oai(base: str, key: str = "sk-test") -> openai.AsyncOpenAI:
    # No retries: failures must surface immediately and keep the suite fast.
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def ant(base: str, key: str = "sk-ant-test") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0)


CHAT = [
    {"role": "system", "content": "be terse"},
    {"role": "developer", "content": [{"type": "text", "text": "inject ctx"}]},
    {"role": "user", "content": "hello there"},
]
EXPECTED_REPLY = "[alpha] model=gpt-4o messages=3 system=be terse | inject ctx last=hello there"


# ------------------------------------------------------------------------ OpenAI


async def test_openai_chat_completion(base: str) -> None:
    async with oai(base) as client:
        resp = await client.chat.completions.create(model="gpt-4o", messages=CHAT)  # type: ignore[arg-type]
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-4o"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == EXPECTED_REPLY
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    chars = len("be terse") + len("inject ctx") + len("hello there")
    assert resp.usage.prompt_tokens == math.ceil(chars / 4)
    assert resp.usage.completion_tokens == len(EXPECTED_REPLY.split())
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


async def test_openai_chat_stream_with_usage(base: str) -> None:
    async with oai(base) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=CHAT,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(content) >= 3
    assert "".join(content) == EXPECTED_REPLY
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(finals) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(EXPECTED_REPLY.split())
    assert all(c.usage is None for c in chunks[:-1])


async def test_openai_chat_stream_without_usage(base: str) -> None:
    async with oai(base) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "[alpha] model=gpt-4o messages=1 system=- last=hi"


async def test_openai_raw_stream_wire_format(base: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{base}/v1/chat/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    frames = resp.text.split("\n\n")
    assert frames[-1] == ""
    assert frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames[:-1])
    assert '"usage"' not in resp.text


async def test_openai_embeddings(base: str) -> None:
    async with oai(base) as client:
        one = await client.embeddings.create(model="text-embedding-3-small", input="abc")
        many = await client.embeddings.create(
            model="text-embedding-3-small", input=["abc", "def"], encoding_format="float"
        )
        b64 = await client.embeddings.create(
            model="text-embedding-3-small", input="abc", encoding_format="base64"
        )
    assert one.object == "list"
    assert one.model == "text-embedding-3-small"
    vec = one.data[0].embedding
    assert len(vec) == 8
    # The SDK asks for base64 by default and decodes float32, hence the tolerance.
    assert math.isclose(sum(v * v for v in vec), 1.0, rel_tol=1e-6)
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == pytest.approx(vec, rel=1e-6)  # deterministic
    assert many.data[1].embedding != pytest.approx(vec, rel=1e-6)
    assert many.usage.prompt_tokens == many.usage.total_tokens == math.ceil(6 / 4)
    raw = b64.data[0].embedding
    decoded = raw if isinstance(raw, list) else list(struct.unpack("<8f", base64.b64decode(raw)))
    assert decoded == pytest.approx(vec, rel=1e-6)


async def test_openai_models(base: str) -> None:
    async with oai(base) as client:
        ids = [m.id async for m in client.models.list()]
        model = (await client.models.list()).data[0]
    assert "gpt-4o" in ids and len(ids) >= 3
    assert model.object == "model" and model.owned_by == "mock"


async def test_require_key(start: Start) -> None:
    base = await start(require_key="sk-good")
    async with oai(base, key="sk-bad") as client:
        with pytest.raises(openai.AuthenticationError) as exc:
            await client.models.list()
    assert exc.value.status_code == 401
    assert exc.value.code == "invalid_api_key"
    async with oai(base, key="sk-good") as client:
        assert len((await client.models.list()).data) >= 3
    async with ant(base, key="sk-bad") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    async with ant(base, key="sk-good") as client:
        msg = await client.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert msg.content[0].type == "text"


async def test_openai_errors_shape(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        bad = await client.post("/v1/chat/completions", content=b"{not json")
        missing = await client.post("/v1/chat/completions", json={"model": "m"})
        failed = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            headers={"x-mock-fail-status": "503"},
        )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert missing.status_code == 400
    assert failed.status_code == 503
    assert failed.headers["x-mock-failed"] == "1"
    assert failed.json()["error"]["type"] == "server_error"


async def test_openai_rate_limit(start: Start) -> None:
    base = await start(fail_status=429)
    async with oai(base) as client:
        with pytest.raises(openai.RateLimitError) as exc:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    assert exc.value.code == "rate_limit_exceeded"


# --------------------------------------------------------------------- Anthropic


ANT_MESSAGES: list[Any] = [
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "ok"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "q"}],
    },
]
ANT_REPLY = "[alpha] model=claude-x messages=3 system=sys one | sys two last=second q"


async def test_anthropic_message(base: str) -> None:
    async with ant(base) as client:
        msg = await client.messages.create(
            model="claude-x",
            max_tokens=100,
            system=[{"type": "text", "text": "sys one"}, {"type": "text", "text": "sys two"}],
            messages=ANT_MESSAGES,
        )
    assert msg.id.startswith("msg_")
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "claude-x"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == ANT_REPLY
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    chars = len("sys one") + len("sys two") + len("first") + len("ok") + len("second q")
    assert msg.usage.input_tokens == math.ceil(chars / 4)
    assert msg.usage.output_tokens == len(ANT_REPLY.split())


async def test_anthropic_stream(base: str) -> None:
    async with (
        ant(base) as client,
        client.messages.stream(
            model="claude-x", max_tokens=100, system="sys", messages=ANT_MESSAGES
        ) as stream,
    ):
        events = [e.type async for e in stream]
        final = await stream.get_final_message()
    reply = "[alpha] model=claude-x messages=3 system=sys last=second q"
    assert final.content[0].type == "text"
    assert final.content[0].text == reply
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == math.ceil(len("sysfirstoksecond q") / 4)
    assert final.usage.output_tokens == len(reply.split())
    assert events[0] == "message_start"
    assert events[-1] == "message_stop"
    assert events.count("content_block_delta") >= 3


async def test_anthropic_raw_stream_events(base: str) -> None:
    body = {
        "model": "c",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    async with httpx.AsyncClient() as client:
        resp = await client.post(
            f"{base}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
        )
    kinds = [line[7:] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_anthropic_errors(start: Start, base: str) -> None:
    async with httpx.AsyncClient() as client:
        no_version = await client.post(
            f"{base}/v1/messages", json={"model": "c", "messages": [{"role": "user"}]}
        )
    assert no_version.status_code == 400
    assert no_version.json()["type"] == "error"
    assert no_version.json()["error"]["type"] == "invalid_request_error"

    limited = await start(fail_status=429, fail_rate=1.0)
    async with ant(limited) as client:
        with pytest.raises(anthropic.RateLimitError) as exc:
            await client.messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert exc.value.response.headers["x-mock-failed"] == "1"
    assert exc.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "mock mock: injected failure 429"},
    }


# ----------------------------------------------------------------- control plane


async def test_request_recording(start: Start) -> None:
    base = await start(record=2)
    async with oai(base) as client:
        await client.models.list()
        await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "a"}],
            extra_headers={"X-Tenant": "t1"},
        )
        await client.chat.completions.create(
            model="m2", messages=[{"role": "user", "content": "b"}]
        )
    async with httpx.AsyncClient(base_url=base) as client:
        await client.get("/healthz")  # not recorded
        recorded = (await client.get("/_mock/requests")).json()
        assert len(recorded) == 2  # record=2 keeps the most recent two, oldest first
        first, last = recorded
        assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
        assert first["headers"]["x-tenant"] == "t1"
        assert first["headers"]["authorization"] == "Bearer sk-test"
        assert first["body"]["messages"] == [{"role": "user", "content": "a"}]
        assert last["body"]["model"] == "m2"
        assert (await client.delete("/_mock/requests")).status_code == 200
        assert (await client.get("/_mock/requests")).json() == []
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.text == "ok"


async def test_runtime_config(base: str) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        cfg = await client.post("/_mock/config", json={"fail_status": 503, "fail_rate": 1.0})
        assert cfg.status_code == 200 and cfg.json()["fail_status"] == 503
        failed = await client.post("/v1/chat/completions", json=chat)
        assert failed.status_code == 503 and failed.headers["x-mock-failed"] == "1"
        await client.post("/_mock/config", json={"fail_status": 0, "latency_ms": 50})
        shown = (await client.get("/_mock/config")).json()
        assert shown["fail_status"] == 0 and shown["latency_ms"] == 50
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        assert loop.time() - t0 >= 0.045
        assert (await client.post("/_mock/config", json={"name": "x"})).status_code == 400
        assert (await client.post("/_mock/config", json={"fail_rate": 2})).status_code == 400


async def test_latency_header_and_chunk_delay(start: Start) -> None:
    base = await start(chunk_delay_ms=10)
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with httpx.AsyncClient(base_url=base) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        resp = await client.post(
            "/v1/chat/completions", json=chat, headers={"x-mock-latency-ms": "30"}
        )
        elapsed = loop.time() - t0
    frames = [f for f in resp.text.split("\n\n") if f]
    # 30 ms latency + 10 ms between each of the frames.
    assert elapsed >= 0.03 + 0.01 * (len(frames) - 1) * 0.9
    assert frames[-1] == "data: [DONE]"


async def test_fail_rate_is_seeded(start: Start) -> None:
    async def failures(seed: int) -> list[int]:
        base = await start(fail_status=500, fail_rate=0.3, seed=seed, record=0)
        async with httpx.AsyncClient(base_url=base) as client:
            codes = [(await client.get("/v1/models")).status_code for _ in range(150)]
        return codes

    a = await failures(7)
    b = await failures(7)
    assert a == b  # same seed, same sequence
    rate = a.count(500) / len(a)
    assert 0.2 < rate < 0.4
    assert set(a) == {200, 500}


async def test_serve_and_main_cli(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="crdgol.mockllm")
    task = asyncio.create_task(serve("127.0.0.1", 0, MockSettings(name="srv")))
    for _ in range(100):
        if "mock-llm listening on http://127.0.0.1:" in caplog.text:
            break
        await asyncio.sleep(0.01)
    url = caplog.text.split("mock-llm listening on ")[1].split()[0]
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/healthz")).text == "ok"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(SystemExit):
        main(["--fail-rate", "3"])
