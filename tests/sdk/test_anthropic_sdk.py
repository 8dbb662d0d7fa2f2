"""The official Anthropic Python SDK, pointed at the gateway, works as it does against Anthropic."""

from __future__ import annotations

import anthropic
import pytest

from tests.conftest import ACME_KEY, Gateway


@pytest.fixture
def client(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=ACME_KEY, max_retries=0)


def test_messages_on_an_anthropic_backend(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="claude", max_tokens=64, messages=[{"role": "user", "content": "hello claude sdk"}])
    assert msg.content[0].type == "text" and "last=hello claude sdk" in msg.content[0].text
    assert msg.usage.output_tokens > 0


def test_messages_translated_to_an_openai_backend(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(model="chat", max_tokens=64, system="be terse", messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].type == "text" and "model=mock-gpt" in msg.content[0].text


@pytest.mark.parametrize("model", ["claude", "chat"])
def test_streamed_messages(client: anthropic.Anthropic, model: str) -> None:
    with client.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": "stream it"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "last=stream it" in text
    assert final.usage.output_tokens > 0


def test_sdk_exceptions_match_the_status(gw: Gateway, client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "x"}]
    bad = anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="claude", max_tokens=8, messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="missing-model", max_tokens=8, messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(model="limited", max_tokens=8, messages=msgs)  # type: ignore[arg-type]
