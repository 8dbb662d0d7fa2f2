"""The official OpenAI Python SDK, pointed at the gateway, works as it does against OpenAI."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import ACME_KEY, Gateway


@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=ACME_KEY, max_retries=0)


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello sdk"}])
    assert "last=hello sdk" in (r.choices[0].message.content or "")
    assert r.usage is not None and r.usage.total_tokens > 0


def test_streamed_chat_completion_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "stream sdk"}], stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "last=stream sdk" in "".join(parts)
    assert usage is not None and usage.completion_tokens > 0


def test_models_and_embeddings(client: openai.OpenAI) -> None:
    assert "chat" in {m.id for m in client.models.list()}
    emb = client.embeddings.create(model="embed", input="vector me")
    assert len(emb.data[0].embedding) > 0


def test_sdk_exceptions_match_the_status(gw: Gateway, client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "x"}]
    bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="chat", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="missing-model", messages=msgs)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="private", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="limited", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[])
