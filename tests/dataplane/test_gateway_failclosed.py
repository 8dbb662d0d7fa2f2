"""Fail closed: without extproc, requests get a clear error and never reach a provider."""

from __future__ import annotations

import signal

import httpx

from crdgol.stack import Stack


def test_the_quickstart_answers_then_fails_closed_when_extproc_dies(quickstart: Stack) -> None:
    body = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-crdgol-quickstart"}
    r = httpx.post(f"{quickstart.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    httpx.delete(f"{quickstart.mock_url}/_mock/requests")

    proc = quickstart.procs["extproc"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    r = httpx.post(f"{quickstart.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "policy_unavailable"
    assert "not forwarded" in err["message"]
    # The same in Anthropic's shape on /v1/messages.
    a = httpx.post(f"{quickstart.url}/v1/messages", json={**body, "max_tokens": 8}, headers=headers, timeout=30)
    assert a.status_code == 503 and a.json()["type"] == "error" and a.json()["error"]["code"] == "policy_unavailable"
    # Nothing reached the provider without being authenticated.
    assert httpx.get(f"{quickstart.mock_url}/_mock/requests").json() == []


def test_stopping_the_stack_lets_an_open_stream_finish(quickstart: Stack) -> None:
    import threading

    httpx.post(f"{quickstart.mock_url}/_mock/config", json={"chunk_delay_ms": 150})
    body = {"model": "quickstart-chat", "stream": True, "messages": [{"role": "user", "content": "a long answer please"}]}
    frames: list[str] = []
    with httpx.stream(
        "POST", f"{quickstart.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-crdgol-quickstart"}, timeout=30
    ) as r:
        lines = r.iter_lines()
        frames.append(next(lines))
        stopper = threading.Thread(target=quickstart.stop)
        stopper.start()  # shutdown begins while the stream is mid-way
        frames.extend(line for line in lines if line)
    stopper.join(30)
    assert frames[-1] == "data: [DONE]", frames[-3:]
    assert len(frames) > 4
