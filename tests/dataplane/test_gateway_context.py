"""The context policy: system template, user profile, knowledge, session history, budget."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import ACME_KEY, GLOBEX_KEY, Gateway


def ask(gw: Gateway, model: str, text: str, key: str = ACME_KEY, session: str | None = None, **headers: str) -> str:
    h = {"authorization": f"Bearer {key}", **headers}
    if session:
        h["x-session-id"] = session
    body = {"model": model, "messages": [{"role": "system", "content": "CLIENT-SYSTEM"}, {"role": "user", "content": text}]}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_the_system_template_profile_and_knowledge_are_injected_before_the_clients_system(gw: Gateway) -> None:
    gw.clear_upstream()
    text = ask(gw, "chat", "hi", **{"x-user-team": "payments"})
    system = text.split("system=", 1)[1].split(" last=", 1)[0]
    # A header is caller text: the system message only points at it (see test_gateway_context_trust).
    assert system.startswith("Tenant team-a/acme calls chat. Team: (see caller_profile.team).")
    assert "payments" not in system
    assert "Refunds take 5 days." in system
    assert system.index("Refunds") < system.index("CLIENT-SYSTEM")


def test_session_history_carries_the_conversation(gw: Gateway) -> None:
    session = f"s-{uuid.uuid4().hex}"
    first = ask(gw, "chat", "my name is Ada", session=session)
    # gateway system + client system + the user message
    assert "messages=3" in first
    second = ask(gw, "chat", "what is my name", session=session)
    # ... + the user/assistant turns of the first exchange
    assert "messages=5" in second, second
    gw.clear_upstream()
    ask(gw, "chat", "third", session=session)
    sent = gw.upstream_requests()[-1]["body"]
    assert isinstance(sent, dict)
    contents = [m["content"] for m in sent["messages"]]
    assert "my name is Ada" in contents and "what is my name" in contents


def test_history_is_scoped_by_tenant(gw: Gateway) -> None:
    session = f"s-{uuid.uuid4().hex}"
    ask(gw, "chat", "acme secret plan", session=session)
    other = ask(gw, "chat", "what did they say", key=GLOBEX_KEY, session=session)
    assert "messages=3" in other and "acme secret plan" not in other


def test_the_context_budget_drops_the_oldest_turns_first(gw: Gateway) -> None:
    session = f"s-{uuid.uuid4().hex}"
    for i in range(6):
        ask(gw, "budget", f"turn number {i} " + "x" * 40, session=session)
    gw.clear_upstream()
    ask(gw, "budget", "final", session=session)
    sent = gw.upstream_requests()[-1]["body"]
    assert isinstance(sent, dict)
    texts = " ".join(str(m["content"]) for m in sent["messages"])
    assert "turn number 0" not in texts  # oldest gone
    assert "turn number 5" in texts  # newest kept
    assert "crdgol_context_history_turns_dropped_total" in gw.metrics()
