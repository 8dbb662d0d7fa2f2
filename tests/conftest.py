"""Shared fixtures: real processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crdgol.stack import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent


class MockProcess:
    """One bundled mock upstream as its own process (`crdgol mock-llm`)."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crdgol.cli", "mock-llm", "--port", str(self.port), *args],
            start_new_session=True,
        )
        wait_http(f"{self.url}/healthz", (200,), 20, self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture(scope="session")
def mock_factory() -> Iterator[type[MockProcess]]:
    started: list[MockProcess] = []

    class Factory(MockProcess):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Factory
    for m in started:
        m.stop()


# --- the gateway under test -----------------------------------------------------------------

import json as _json  # noqa: E402
import textwrap  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import httpx  # noqa: E402
import jwt  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from crdgol.stack import Stack, StackSettings  # noqa: E402

ACME_KEY = "sk-acme-test-key"
GLOBEX_KEY = "sk-globex-test-key"
PROVIDER_KEY = "sk-provider-secret"
HS_SECRET = "hs256-shared-secret-for-tests-0123456789"
HS_ISSUER = "https://issuer.test"
RS_ISSUER = "https://rs.test"


@dataclass
class Gateway:
    stack: Stack
    mocks: dict[str, MockProcess]
    rsa_key: rsa.RSAPrivateKey

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def mock_url(self) -> str:
        return self.stack.mock_url

    def client(self, key: str | None = ACME_KEY, **headers: str) -> httpx.Client:
        h = {"content-type": "application/json", **headers}
        if key is not None:
            h["authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, headers=h, timeout=30)

    def chat(self, model: str, text: str = "Hello", key: str | None = ACME_KEY, **extra: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
        with self.client(key) as c:
            return c.post("/v1/chat/completions", json=body)

    def upstream_requests(self, mock_url: str | None = None) -> list[dict[str, object]]:
        r = httpx.get(f"{mock_url or self.mock_url}/_mock/requests", timeout=10)
        return list(r.json())

    def clear_upstream(self, mock_url: str | None = None) -> None:
        httpx.delete(f"{mock_url or self.mock_url}/_mock/requests", timeout=10)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.stack.metrics_port}/metrics", timeout=10).text

    def hs256_token(self, **claims: object) -> str:
        base = {"iss": HS_ISSUER, "sub": "user-1", "org": "acme", "exp": 4102444800}
        return jwt.encode({**base, **claims}, HS_SECRET, algorithm="HS256")

    def rs256_token(self, **claims: object) -> str:
        base = {"iss": RS_ISSUER, "sub": "user-2", "org": "globex", "exp": 4102444800}
        return jwt.encode({**base, **claims}, self.rsa_key, algorithm="RS256", headers={"kid": "k1"})


def _binding(name: str, backends: list[dict[str, object]], **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"model": name, "backends": backends, **spec},
    }


def _backend(name: str, url: str, provider: str = "openai-compatible", model: str = "mock-gpt", priority: int = 0, weight: int = 1) -> dict[str, object]:
    return {
        "name": name,
        "provider": provider,
        "endpoint": url,
        "model": model,
        "priority": priority,
        "weight": weight,
        "credentialsRef": {"name": "provider", "key": "apiKey"},
    }


def write_manifests(folder: Path, mocks: dict[str, str], jwks: str) -> None:
    a, flaky, limited, slow, other, dead = (mocks[k] for k in ("a", "flaky", "limited", "slow", "other", "dead"))
    secrets = textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: acme-key, namespace: team-a, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: acme}}}}
        stringData: {{key: {ACME_KEY}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: globex-key, namespace: team-a, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: globex}}}}
        stringData: {{key: {GLOBEX_KEY}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: provider, namespace: team-a}}
        stringData: {{apiKey: {PROVIDER_KEY}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: jwt-hs, namespace: team-a}}
        stringData: {{secret: {HS_SECRET}}}
    """)
    context = {
        "systemPrompt": "Tenant ${tenant} calls ${model}. Team: ${user.team}. Name: ${user.name}.",
        "profile": [{"name": "team", "header": "x-user-team"}, {"name": "name", "claim": "name"}],
        "history": {"enabled": True, "maxTurns": 4, "maxTokens": 2000, "ttl": "1h"},
        "knowledge": [{"title": "Policy", "text": "Refunds take 5 days."}],
        "maxContextTokens": 4000,
    }
    auth = {
        "jwt": [
            {"issuer": HS_ISSUER, "tenantClaim": "org", "hs256SecretRef": {"name": "jwt-hs", "key": "secret"}, "audiences": []},
            {"issuer": RS_ISSUER, "tenantClaim": "org", "jwks": jwks},
        ]
    }
    bindings = [
        _binding("chat", [_backend("primary", f"{a}/v1")], tenants=["acme", "globex"], context=context, auth=auth),
        _binding("claude", [_backend("claude", a, "anthropic", "mock-claude")], context={"systemPrompt": "Be brief, ${tenant}."}),
        _binding("private", [_backend("p", a)], tenants=["globex"]),
        _binding("embed", [_backend("e", a, model="mock-embed")]),
        _binding("fallback-dead", [_backend("dead", dead), _backend("rescue", a, "anthropic", "rescue-claude", priority=1)]),
        _binding("fallback-503", [_backend("flaky", flaky), _backend("rescue", a, model="rescue-gpt", priority=1)]),
        _binding("fallback-429", [_backend("limited", limited), _backend("rescue", a, model="rescue-gpt", priority=1)]),
        _binding("all-fail", [_backend("flaky", flaky), _backend("flaky2", flaky, "anthropic", priority=1)]),
        _binding("limited", [_backend("limited", limited)]),
        _binding("slow", [_backend("slow", slow)], timeouts={"request": "1s", "perTry": "1s"}),
        _binding("split", [_backend("a", a, model="split-a"), _backend("b", other, model="split-b")]),
        _binding(
            "budget",
            [_backend("a", a)],
            context={
                "systemPrompt": "Short system.",
                "history": {"enabled": True, "maxTurns": 50, "maxTokens": 100000},
                "maxContextTokens": 120,
            },
        ),
    ]
    (folder / "secrets.yaml").write_text(secrets)
    (folder / "bindings.yaml").write_text("---\n".join(_json.dumps(b) + "\n" for b in bindings))


@pytest.fixture(scope="session")
def gw(tmp_path_factory: pytest.TempPathFactory, mock_factory: type[MockProcess]) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("manifests")
    mocks = {
        "flaky": mock_factory("--name", "flaky", "--fail-status", "503"),
        "limited": mock_factory("--name", "limited", "--fail-status", "429"),
        "slow": mock_factory("--name", "slow", "--latency-ms", "3000"),
        "other": mock_factory("--name", "other"),
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = _json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = _json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})
    stack = Stack(
        StackSettings(
            manifests=folder,
            mock_args=("--require-key", PROVIDER_KEY),
            metrics_port=free_port(),
            quiet=True,
        )
    )
    urls = {k: m.url for k, m in mocks.items()}
    urls["a"] = stack.mock_url
    urls["dead"] = f"http://127.0.0.1:{free_port()}"
    write_manifests(folder, urls, jwks)
    stack.start()
    try:
        yield Gateway(stack, mocks, key)
    finally:
        stack.stop()


def example_stack(tmp_path: Path, name: str, **settings: object) -> Stack:
    """A stack (not started) serving a copy of ``examples/<name>``, its backends pointed at the
    stack's own mock upstream instead of the examples' fixed 127.0.0.1:8081."""
    folder = tmp_path / name
    shutil.copytree(ROOT / "examples" / name, folder)
    stack = Stack(StackSettings(manifests=folder, quiet=True, **settings))  # type: ignore[arg-type]
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{stack.mock_port}"))
    return stack


@contextlib.contextmanager
def running_example(tmp_path: Path, name: str, **settings: object) -> Iterator[Stack]:
    """``examples/<name>`` served for the duration of the block."""
    stack = example_stack(tmp_path, name, **settings)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def quickstart(tmp_path: Path) -> Iterator[Stack]:
    """The quickstart example, running."""
    with running_example(tmp_path, "quickstart") as stack:
        yield stack
