"""File mode through the whole stack: a changed folder is live within a second, with no failed
request during the switch; a broken file or spec is refused and the last good config keeps serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from crdgol.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}


@pytest.fixture
def live(quickstart: Stack) -> tuple[Stack, Path]:
    return quickstart, quickstart.settings.manifests / "binding.yaml"


def ask(url: str, model: str = "quickstart-chat") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=10)


def served_model(url: str) -> str:
    r = ask(url)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"]).split("model=", 1)[1].split()[0]


def wait_for(pred: object, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


def test_a_changed_binding_goes_live_under_load_with_no_failed_request(live: tuple[Stack, Path]) -> None:
    stack, binding = live
    failures: list[str] = []
    stop = threading.Event()
    counts = [0]

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                r = c.post(
                    f"{stack.url}/v1/chat/completions",
                    json={"model": "quickstart-chat", "messages": [{"role": "user", "content": "x"}]},
                    headers=HEADERS,
                )
                counts[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        binding.write_text(binding.read_text().replace("model: mock-gpt", "model: mock-gpt-v2"))
        # The latency target (live within 1 s) is measured by benchmarks/controller.py; here the
        # change must simply arrive, under load, without a failed request.
        wait_for(lambda: served_model(stack.url) == "mock-gpt-v2", 15)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert counts[0] > 20
    assert failures == []


def test_a_broken_file_keeps_the_last_good_config_and_says_why(live: tuple[Stack, Path]) -> None:
    stack, binding = live
    binding.write_text("spec: [this is not: valid yaml\n")
    wait_for(lambda: str(binding) in stack.status()["files"], 15)  # type: ignore[operator]
    assert served_model(stack.url) == "mock-gpt"


def test_an_invalid_spec_is_refused_with_a_reason_while_the_last_good_one_serves(live: tuple[Stack, Path]) -> None:
    stack, binding = live
    binding.write_text(binding.read_text().replace("provider: openai-compatible", "provider: azure"))

    def refused() -> bool:
        conds = stack.status()["bindings"]["default/quickstart-chat"]["conditions"]  # type: ignore[index]
        return any(c["type"] == "Accepted" and c["status"] == "False" and c["reason"] == "InvalidProvider" for c in conds)

    wait_for(refused, 15)
    assert served_model(stack.url) == "mock-gpt"


def test_a_new_binding_is_served_and_a_removed_one_is_gone(live: tuple[Stack, Path]) -> None:
    stack, binding = live
    extra = binding.parent / "extra.yaml"
    extra.write_text(
        binding.read_text().replace("name: quickstart-chat", "name: second-chat").replace("model: quickstart-chat", "model: second-chat")
    )
    wait_for(lambda: ask(stack.url, "second-chat").status_code == 200, 15)
    extra.unlink()
    wait_for(lambda: ask(stack.url, "second-chat").status_code == 404, 15)
    assert ask(stack.url).status_code == 200


def test_the_gateway_keeps_serving_while_the_controller_is_away_and_catches_up_when_it_returns(
    live: tuple[Stack, Path],
) -> None:
    import subprocess

    stack, binding = live
    controller = stack.procs["controller"]
    argv = list(controller.args)  # type: ignore[arg-type]
    controller.kill()
    controller.wait(10)
    # Envoy and extproc keep their last good config and policy.
    for _ in range(5):
        assert served_model(stack.url) == "mock-gpt"
    binding.write_text(binding.read_text().replace("model: mock-gpt", "model: mock-gpt-after-restart"))
    stack.procs["controller"] = subprocess.Popen(argv, start_new_session=True)
    # extproc reconnects (with backoff) and Envoy re-subscribes: the change made meanwhile goes live.
    wait_for(lambda: served_model(stack.url) == "mock-gpt-after-restart", 15)
