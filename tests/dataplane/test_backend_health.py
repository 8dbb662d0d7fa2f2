"""Backends have health, through real Envoy: a backend that keeps failing is ejected by outlier
detection, callers are still served by the healthy one, and the binding's status says which."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crdgol.stack import Stack, StackSettings
from tests.conftest import MockProcess


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, MockProcess]]:
    bad = MockProcess("--name", "bad", "--fail-status", "503")
    s = Stack(StackSettings(manifests=tmp_path, quiet=True))
    docs = [
        {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "k", "namespace": "default", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "t"}},
            "stringData": {"key": "sk-health"},
        },
        {
            "apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": "chat", "namespace": "default"},
            "spec": {
                "model": "chat",
                "health": {"outlierDetection": {"consecutive5xx": 3, "interval": "500ms", "baseEjectionTime": "60s"}},
                "backends": [
                    {"name": "flaky", "provider": "openai-compatible", "endpoint": f"{bad.url}/v1", "model": "bad-gpt"},
                    {"name": "steady", "provider": "openai-compatible", "endpoint": f"{s.mock_url}/v1", "model": "good-gpt", "priority": 1},
                ],
            },
        },
    ]
    (tmp_path / "m.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
    s.start()
    try:
        yield s, bad
    finally:
        s.stop()
        bad.stop()


def health_of(stack: Stack) -> dict[str, str]:
    return dict(stack.status()["bindings"]["default/chat"].get("backendHealth", {}))  # type: ignore[index,union-attr]


def test_a_failing_backend_is_ejected_traffic_goes_to_the_healthy_one_and_status_says_so(stack: tuple[Stack, MockProcess]) -> None:
    s, bad = stack
    deadline = time.monotonic() + 10
    while health_of(s) != {"flaky": "healthy", "steady": "healthy"}:
        assert time.monotonic() < deadline, s.status()
        time.sleep(0.1)
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    answers = []
    for _ in range(10):
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-health"}, timeout=10)
        answers.append((r.status_code, str(r.json().get("model"))))
    assert answers == [(200, "good-gpt")] * 10  # every caller served by the healthy backend
    deadline = time.monotonic() + 10
    while health_of(s).get("flaky") != "ejected":
        assert time.monotonic() < deadline, health_of(s)
        time.sleep(0.1)
    assert health_of(s)["steady"] == "healthy"
    conds = {c["type"]: c for c in s.status()["bindings"]["default/chat"]["conditions"]}  # type: ignore[index]
    assert conds["BackendsHealthy"]["status"] == "False" and "flaky (ejected)" in conds["BackendsHealthy"]["message"]
    assert conds["Ready"]["status"] == "True"
    # Envoy's own counters agree: the failing host was ejected.
    stats = httpx.get(f"http://127.0.0.1:{s.admin_port}/stats?filter=outlier_detection.ejections_enforced_total", timeout=5).text
    assert any(line.startswith("cluster.crdgol-be.default.chat.flaky.") and not line.endswith(": 0") for line in stats.splitlines()), stats
    assert len(httpx.get(f"{bad.url}/_mock/requests", timeout=5).json()) >= 3
