"""A new policy and the Envoy config that depends on it reach the data plane in an order that
never routes a request to something extproc does not know: changes that rename, add and remove
backends, under load, fail no request (no 503 "not in the policy in force")."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.conftest import running_example

HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}
BODY = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "x"}]}


def served_model(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=HEADERS, timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"]).split("model=", 1)[1].split()[0]


def wait_for_model(url: str, model: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served_model(url) == model:
            return
        time.sleep(0.05)
    raise AssertionError(f"{model} not served within {timeout}s")


def test_backend_renames_additions_and_removals_under_load_fail_no_request(tmp_path: Path) -> None:
    with running_example(tmp_path, "quickstart") as stack:
        binding = stack.settings.manifests / "binding.yaml"
        original = binding.read_text()
        failures: list[str] = []
        counts = [0]
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=10) as c:
                while not stop.is_set():
                    r = c.post(f"{stack.url}/v1/chat/completions", json=BODY, headers=HEADERS)
                    counts[0] += 1
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            # 1. The first backend gets a new name: new clusters, the old ones go.
            binding.write_text(original.replace("name: primary", "name: renamed").replace("model: mock-gpt", "model: mock-gpt-renamed"))
            wait_for_model(stack.url, "mock-gpt-renamed")
            # 2. A second first-priority backend: the first one is no longer rewritten downstream.
            second = (
                "    - name: second\n      provider: openai-compatible\n"
                f"      endpoint: {stack.mock_url}/v1\n      model: mock-gpt-second\n"
                "      credentialsRef: {name: mock-provider, key: apiKey}\n      priority: 0\n"
            )
            text = binding.read_text().replace("  backends:\n", "  backends:\n" + second)
            binding.write_text(text.replace("model: mock-gpt-renamed", "model: mock-gpt-both"))
            wait_for_model(stack.url, "mock-gpt-second")
            # 3. Back to one first-priority backend, under its first name.
            binding.write_text(original.replace("model: mock-gpt", "model: mock-gpt-final"))
            wait_for_model(stack.url, "mock-gpt-final")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert counts[0] > 30
        assert failures == []
