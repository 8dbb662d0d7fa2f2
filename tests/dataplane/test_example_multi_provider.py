"""examples/multi-provider, run as its README says: weighted backends, JWT callers, fallback."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from crdgol.stack import Stack
from tests.conftest import running_example

SECRET = "change-me-to-a-long-random-secret"


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[Stack]:
    with running_example(tmp_path, "multi-provider") as stack:
        yield stack


def ask(stack: Stack, credential: str) -> str:
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "team-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {credential}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_a_jwt_caller_gets_its_profile_and_the_weights_hold(multi: Stack) -> None:
    token = jwt.encode(
        {"iss": "https://auth.example.com", "sub": "u1", "org": "quickstart", "name": "Ada", "exp": int(time.time()) + 600},
        SECRET,
        algorithm="HS256",
    )
    # A verified claim speaks in the system message as a quoted JSON string.
    assert 'You help "Ada" of tenant default/quickstart.' in ask(multi, token)
    models = Counter(ask(multi, "sk-crdgol-quickstart").split("model=", 1)[1].split()[0] for _ in range(60))
    assert set(models) == {"mock-gpt-large", "mock-gpt-small"}
    assert models["mock-gpt-large"] > models["mock-gpt-small"]  # 3:1


def test_a_failing_first_priority_falls_back_to_the_anthropic_backend(multi: Stack) -> None:
    # All three backends are the one bundled mock, so make it fail everything and read the attempt
    # chain from its request log: a first-priority backend first, then the Anthropic fallback
    # (translated, with its own model name); the client gets the last failure as a JSON error.
    httpx.delete(f"{multi.mock_url}/_mock/requests")
    httpx.post(f"{multi.mock_url}/_mock/config", json={"fail_status": 503})
    try:
        r = httpx.post(
            f"{multi.url}/v1/chat/completions",
            json={"model": "team-chat", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": "Bearer sk-crdgol-quickstart"},
            timeout=30,
        )
    finally:
        httpx.post(f"{multi.mock_url}/_mock/config", json={"fail_status": 0})
    assert r.status_code == 503 and r.json()["error"]["message"]
    paths = [(q["path"], (q["body"] or {}).get("model")) for q in httpx.get(f"{multi.mock_url}/_mock/requests").json()]
    assert paths[0][0] == "/v1/chat/completions" and paths[0][1] in ("mock-gpt-large", "mock-gpt-small")
    assert paths[-1] == ("/v1/messages", "mock-claude")  # the fallback, translated, with its own model
