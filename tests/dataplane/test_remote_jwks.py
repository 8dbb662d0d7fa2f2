"""A JWT issuer that names a JWKS URL, through real Envoy and extproc: the binding's jwksUri reaches
extproc in the policy, extproc fetches the keys from a key server the test runs on loopback, and a
rotation at that server is picked up when a token names the new key. A second issuer declares only
``discovery: true``: its keys come from the jwks_uri of its OIDC configuration document."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from crdgol.stack import Stack, StackSettings

ISSUER = "https://login.example"
KEY_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, object]:
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass
class KeyServer:
    keys: list[dict[str, object]] = field(default_factory=lambda: [jwk("k1", KEY_1)])
    hits: int = 0
    discovery_hits: list[str] = field(default_factory=list)  # paths asked for by the discovered issuer


@pytest.fixture(scope="module")
def keys() -> Iterator[tuple[KeyServer, str]]:
    state = KeyServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            if self.path == "/.well-known/openid-configuration":
                state.discovery_hits.append(self.path)
                doc: object = {"issuer": base, "jwks_uri": f"{base}/discovered/keys"}
            elif self.path == "/discovered/keys":
                state.discovery_hits.append(self.path)
                doc = {"keys": [jwk("d1", KEY_2)]}
            else:
                state.hits += 1
                doc = {"keys": state.keys}
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("cache-control", "max-age=300")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keys: tuple[KeyServer, str]) -> Iterator[Stack]:
    folder: Path = tmp_path_factory.mktemp("jwks")
    s = Stack(StackSettings(manifests=folder, quiet=True))
    binding = {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "idp-chat", "namespace": "team-j"},
        "spec": {
            "model": "idp-chat",
            "tenants": ["acme"],
            "backends": [{"name": "main", "provider": "openai-compatible", "endpoint": "MOCK/v1", "model": "mock-gpt"}],
            "auth": {"jwt": [{"issuer": ISSUER, "tenantClaim": "org", "jwksUri": keys[1]}]},
        },
    }
    (folder / "binding.json").write_text(json.dumps(binding).replace("MOCK", s.mock_url))
    discovered = json.loads(json.dumps(binding).replace("MOCK", s.mock_url).replace("idp-chat", "oidc-chat"))
    discovered["spec"]["auth"] = {"jwt": [{"issuer": issuer_url(keys[1]), "tenantClaim": "org", "discovery": True}]}
    (folder / "discovered.json").write_text(json.dumps(discovered))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def issuer_url(jwks_url: str) -> str:
    return jwks_url.split("/.well-known/")[0]


def chat(stack: Stack, kid: str, key: rsa.RSAPrivateKey, issuer: str = ISSUER, model: str = "idp-chat") -> httpx.Response:
    now = int(time.time())
    token = jwt.encode({"iss": issuer, "sub": "u1", "org": "acme", "iat": now, "exp": now + 600}, key, algorithm="RS256", headers={"kid": kid})
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}, timeout=30)


def test_a_token_signed_by_the_issuers_published_key_is_served(stack: Stack, keys: tuple[KeyServer, str]) -> None:
    assert keys[0].hits == 1  # fetched when the policy arrived, before any token
    r = chat(stack, "k1", KEY_1)
    assert r.status_code == 200, r.text
    assert chat(stack, "k1", KEY_1).status_code == 200
    assert keys[0].hits == 1  # fetched once (when the policy arrived), cached for max-age


def test_after_a_rotation_the_new_key_is_fetched_and_a_forged_kid_is_refused(stack: Stack, keys: tuple[KeyServer, str]) -> None:
    keys[0].keys = [jwk("k2", KEY_2)]
    hits = keys[0].hits
    r = chat(stack, "k2", KEY_2)
    assert r.status_code == 200, r.text
    assert keys[0].hits == hits + 1
    forged = chat(stack, "k3", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert forged.status_code == 401 and "'kid'" in forged.json()["error"]["message"]
    assert keys[0].hits == hits + 1  # within 10 s of the last refetch: not asked again


def test_an_issuer_with_discovery_is_served_with_the_keys_its_configuration_document_names(stack: Stack, keys: tuple[KeyServer, str]) -> None:
    issuer = issuer_url(keys[1])
    r = chat(stack, "d1", KEY_2, issuer=issuer, model="oidc-chat")
    assert r.status_code == 200, r.text
    assert chat(stack, "d1", KEY_2, issuer=issuer, model="oidc-chat").status_code == 200
    # The document, then the key set it names: each once, cached (before any token).
    assert keys[0].discovery_hits == ["/.well-known/openid-configuration", "/discovered/keys"]
    # A token of the other issuer's key does not pass here.
    assert chat(stack, "d1", KEY_1, issuer=issuer, model="oidc-chat").status_code == 401
