"""A provider's answer cannot choose what it is billed as, through real Envoy.

crdgol's filters talk to each other in ``x-crdgol-*`` headers; the upstream filter of a fallback
attempt tags the answer with ``x-crdgol-backend``, which decides the price a request is charged
at. A provider that sends such headers itself (here: the binding's dear first backend, claiming
to be its cheap fallback) has them stripped as its answer enters Envoy: the request is billed as
the backend Envoy sent it to, and no ``x-crdgol-*`` header reaches the client.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from crdgol.stack import Stack, StackSettings

KEY = "sk-trust-test"
FORGED = {
    "x-crdgol-backend": "crdgol-be.trust.forged.cheap",
    "x-crdgol-route": "trust.other.00000000",
    "x-crdgol-client-api": "anthropic",
    "x-crdgol-made-up": "1",
}


class Hostile(BaseHTTPRequestHandler):
    """A provider that answers properly, plus crdgol's own headers, forged."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "model": "dear-gpt",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for name, value in FORGED.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _backend(name: str, url: str, priority: int, per_million: str) -> dict[str, object]:
    return {
        "name": name,
        "provider": "openai-compatible",
        "endpoint": f"{url}/v1",
        "model": f"{name}-gpt",
        "priority": priority,
        "credentialsRef": {"name": "provider", "key": "apiKey"},
        "pricing": {"inputPerMillion": per_million, "outputPerMillion": per_million},
    }


def _binding(name: str, backends: list[dict[str, object]]) -> str:
    return json.dumps(
        {
            "apiVersion": "crdgol.io/v1alpha1",
            "kind": "AIModelBinding",
            "metadata": {"name": name, "namespace": "trust"},
            "spec": {"model": name, "tenants": ["payer"], "backends": backends},
        }
    )


SECRETS = f"""
apiVersion: v1
kind: Secret
metadata: {{name: payer-key, namespace: trust, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: payer}}}}
stringData: {{key: {KEY}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: provider, namespace: trust}}
stringData: {{apiKey: sk-provider}}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, hostile: str) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("trust")
    stack = Stack(StackSettings(manifests=folder, quiet=True))
    assert stack.mock_url
    (folder / "secrets.yaml").write_text(SECRETS)
    bindings = [
        # The dear first backend answers (directly: its cluster has no upstream ext_proc) and
        # claims to be the cheap fallback.
        _binding("forged", [_backend("dear", hostile, 0, "100.00"), _backend("cheap", stack.mock_url, 1, "0.01")]),
        # A fallback's answer (the first backend's port is closed): the provider's own tag is
        # stripped, and the tag its attempt's filter sets must survive (it runs after the strip).
        _binding("fallback", [_backend("closed", "http://127.0.0.1:9", 0, "0.01"), _backend("dear", hostile, 1, "100.00")]),
    ]
    (folder / "bindings.yaml").write_text("\n---\n".join(bindings))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def spend(gw: Stack) -> dict[str, float]:
    """crdgol_spend_total by backend (what the tenant was billed, in the pricing's currency)."""
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for backend, value in re.findall(r'^crdgol_spend_total\{[^}]*backend="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        out[backend] = out.get(backend, 0.0) + float(value)
    return out


def settled(gw: Stack, backend_part: str) -> dict[str, float]:
    """The spend once the usage log has settled a request billed to a backend containing ``backend_part``."""
    deadline = time.monotonic() + 3
    while not any(backend_part in b for b in spend(gw)) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    return spend(gw)


def test_a_provider_cannot_bill_its_answer_as_a_cheaper_backend(gw: Stack) -> None:
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "forged", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=15,
    )
    assert r.status_code == 200, r.text
    billed = settled(gw, "forged")
    # 2,000 tokens at 100 per million: 0.2, as the dear backend that answered.
    assert billed.get("crdgol-be.trust.forged.dear") == pytest.approx(0.2), billed
    assert "crdgol-be.trust.forged.cheap" not in billed
    assert not [h for h in r.headers if h.lower().startswith("x-crdgol-")], dict(r.headers)


def test_a_fallbacks_answer_is_billed_as_the_backend_envoy_sent_it_to(gw: Stack) -> None:
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "fallback", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=15,
    )
    assert r.status_code == 200, r.text
    assert not [h for h in r.headers if h.lower().startswith("x-crdgol-")], dict(r.headers)
    billed = settled(gw, "fallback")
    assert billed.get("crdgol-be.trust.fallback.dear") == pytest.approx(0.2)
    assert "crdgol-be.trust.fallback.closed" not in billed and "crdgol-be.trust.forged.cheap" not in billed
