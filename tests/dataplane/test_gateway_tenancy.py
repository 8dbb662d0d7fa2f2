"""Tenancy has an owner, through real Envoy: a namespace's identity sources act only as its own
tenants, so a second namespace cannot act as the first one's tenant, read its session history,
spend its quota or take its model name — with a JWT issuer of the same name or with an API key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from crdgol.stack import Stack, StackSettings
from tests.conftest import MockProcess

ISSUER = "https://login.example"  # one issuer name, declared by both namespaces
VICTIM_HS = "victim-hs256-secret-0123456789-abcdef"
EVIL_HS = "attacker-hs256-secret-0123456789-abcd"
VICTIM_KEY = "sk-victim-quickstart"
COLLEAGUE_KEY = "sk-victim-colleague"  # another caller of the victim's own tenant
EVIL_KEY = "sk-evil-quickstart"
FORGED_KEY = "sk-evil-forged"


def _secret(namespace: str, name: str, data: dict[str, str], tenant: str | None = None, accept: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if tenant is not None:
        meta["labels"] = {"crdgol.io/api-key": "true"}
        meta["annotations"] = {"crdgol.io/tenant": tenant}
        if accept:  # the namespaces whose grants this one accepts
            meta["annotations"]["crdgol.io/accept-from"] = accept
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}


def _binding(namespace: str, name: str, model: str, url: str, upstream: str, **spec: Any) -> dict[str, Any]:
    backend = {"name": "main", "provider": "openai-compatible", "endpoint": f"{url}/v1", "model": upstream}
    backend["credentialsRef"] = spec.pop("credentials", {"name": "provider", "key": "apiKey"})
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": model, "backends": [backend], **spec},
    }


def _jwt() -> dict[str, Any]:
    """The issuer, verified with the HS256 key in the namespace's own ``issuer`` Secret."""
    return {"jwt": [{"issuer": ISSUER, "tenantClaim": "tenant", "hs256SecretRef": {"name": "issuer", "key": "hs"}}]}


HISTORY = {"history": {"enabled": True, "maxTurns": 10}}


def write(folder: Path, victim_url: str, evil_url: str) -> None:
    docs = [
        # The victim: namespace "default", tenant "quickstart".
        _secret("default", "victim-key", {"key": VICTIM_KEY}, tenant="quickstart", accept="shared"),
        _secret("default", "colleague-key", {"key": COLLEAGUE_KEY}, tenant="quickstart"),
        _secret("default", "provider", {"apiKey": "sk-victim-provider"}),
        _secret("default", "issuer", {"hs": VICTIM_HS}),
        _binding("default", "victim-chat", "victim-chat", victim_url, "victim-gpt", tenants=["quickstart"], auth=_jwt(), context=HISTORY),
        _binding(
            "default", "victim-limited", "victim-limited", victim_url, "victim-gpt",
            tenants=["quickstart"], quotas={"tenants": {"quickstart": {"requests": [{"amount": 2, "per": "day"}]}}},
        ),
        # The attacker: namespace "attacker" (sorted before "default", so a global first-wins
        # table would have taken its declaration of the shared issuer name), with an API key for a tenant it also calls "quickstart",
        # a key annotated with the victim's qualified tenant, and the victim's issuer name signed
        # with its own secret.
        _secret("attacker", "evil-key", {"key": EVIL_KEY}, tenant="quickstart"),
        _secret("attacker", "evil-forged", {"key": FORGED_KEY}, tenant="default/quickstart"),
        _secret("attacker", "provider", {"apiKey": "sk-evil-provider"}),
        _secret("attacker", "issuer", {"hs": EVIL_HS}),
        _binding("attacker", "evil-chat", "evil-chat", evil_url, "evil-gpt", tenants=["quickstart"], auth=_jwt(), context=HISTORY),
        # Serves the victim's model name to the victim's namespace: the victim's own binding wins.
        _binding("attacker", "shadow", "victim-chat", evil_url, "shadow-gpt", tenants=["default/*"]),
        # Offers the victim's namespace a model name it does not serve (a lure for its callers'
        # prompts): the victim's namespace never accepted grants from the attacker's.
        _binding("attacker", "lure", "lure-chat", evil_url, "lure-gpt", tenants=["default/*", "quickstart"]),
        # Uses the victim's provider credential: refused.
        _binding("attacker", "steal", "steal-chat", evil_url, "steal-gpt", credentials={"name": "provider", "key": "apiKey", "namespace": "default"}),
        # A third namespace granting the victim's tenant explicitly: the owner of the binding says so.
        _secret("shared", "provider", {"apiKey": "sk-shared-provider"}),
        _binding("shared", "shared-chat", "shared-chat", victim_url, "shared-gpt", tenants=["default/quickstart"]),
    ]
    (folder / "tenancy.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))


@pytest.fixture(scope="module")
def evil_mock() -> Iterator[MockProcess]:
    mock = MockProcess("--name", "evil")
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, evil_mock: MockProcess) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("tenancy")
    s = Stack(StackSettings(manifests=folder, quiet=True))
    write(folder, s.mock_url, evil_mock.url)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def token(secret: str, tenant: str = "quickstart") -> str:
    return jwt.encode({"iss": ISSUER, "sub": "u", "tenant": tenant, "exp": 4102444800}, secret, algorithm="HS256")


def chat(stack: Stack, credential: str, model: str, text: str = "hi", session: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {credential}"}
    if session:
        headers["x-session-id"] = session
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=15)


def reply(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_the_victims_own_key_and_token_are_served_as_its_tenant(stack: Stack) -> None:
    assert "model=victim-gpt" in reply(chat(stack, VICTIM_KEY, "victim-chat"))
    assert "model=victim-gpt" in reply(chat(stack, token(VICTIM_HS), "victim-chat"))


def test_another_namespaces_issuer_of_the_same_name_cannot_act_as_the_tenant(stack: Stack) -> None:
    forged = token(EVIL_HS)
    # Valid in its own namespace (it is attacker/quickstart there) ...
    assert "model=evil-gpt" in reply(chat(stack, forged, "evil-chat"))
    # ... and nothing in the victim's: the victim's bindings do not exist for it (victim-chat is
    # its own namespace's "shadow" binding, which serves only the victim's namespace: 403).
    assert chat(stack, forged, "victim-limited").status_code == 404
    assert chat(stack, forged, "victim-chat").status_code == 403
    # A claim naming the victim's qualified tenant is not a tenant name at all.
    assert chat(stack, token(EVIL_HS, "default/quickstart"), "evil-chat").status_code == 401


def test_another_namespaces_api_key_cannot_act_as_the_tenant(stack: Stack) -> None:
    assert "model=evil-gpt" in reply(chat(stack, EVIL_KEY, "evil-chat"))
    assert chat(stack, EVIL_KEY, "victim-limited").status_code == 404
    assert chat(stack, EVIL_KEY, "victim-chat").status_code == 403
    # A Secret that names another namespace's tenant loads no key, and the status says why.
    assert chat(stack, FORGED_KEY, "victim-chat").status_code == 401
    sources = stack.status()["sources"]
    assert "not a tenant name" in sources["Secret attacker/evil-forged"]  # type: ignore[index]


def test_another_namespace_cannot_read_the_tenants_session_history(stack: Stack, evil_mock: MockProcess) -> None:
    assert chat(stack, VICTIM_KEY, "victim-chat", "my PIN is 4242", session="s-history").status_code == 200
    httpx.delete(f"{evil_mock.url}/_mock/requests", timeout=5)
    for credential in (token(EVIL_HS), EVIL_KEY):
        assert chat(stack, credential, "victim-chat", "what is my PIN?", session="s-history").status_code == 403
        assert chat(stack, credential, "evil-chat", "what is my PIN?", session="s-history").status_code == 200
    seen = json.dumps(httpx.get(f"{evil_mock.url}/_mock/requests", timeout=5).json())
    assert "what is my PIN?" in seen and "4242" not in seen
    # The victim's own next turn still carries it (so the check above could have failed).
    assert chat(stack, VICTIM_KEY, "victim-chat", "and again?", session="s-history").status_code == 200
    assert "4242" in json.dumps(httpx.get(f"{stack.mock_url}/_mock/requests", timeout=5).json()[-1])


def test_another_caller_of_the_same_tenant_cannot_read_a_session_by_guessing_its_id(stack: Stack) -> None:
    assert chat(stack, VICTIM_KEY, "victim-chat", "my PIN is 5151", session="s-colleague").status_code == 200
    httpx.delete(f"{stack.mock_url}/_mock/requests", timeout=5)
    # Same tenant, same x-session-id: the colleague's key and a token of another subject.
    other = jwt.encode({"iss": ISSUER, "sub": "someone-else", "tenant": "quickstart", "exp": 4102444800}, VICTIM_HS, algorithm="HS256")
    for credential in (COLLEAGUE_KEY, other):
        assert chat(stack, credential, "victim-chat", "what is my PIN?", session="s-colleague").status_code == 200
    assert "5151" not in json.dumps(httpx.get(f"{stack.mock_url}/_mock/requests", timeout=5).json())
    # The session's owner still has it.
    assert chat(stack, VICTIM_KEY, "victim-chat", "and again?", session="s-colleague").status_code == 200
    assert "5151" in json.dumps(httpx.get(f"{stack.mock_url}/_mock/requests", timeout=5).json()[-1])


def test_another_namespace_cannot_spend_the_tenants_quota(stack: Stack) -> None:
    for credential in (token(EVIL_HS), EVIL_KEY, FORGED_KEY) * 2:
        assert chat(stack, credential, "victim-limited").status_code in (401, 404)  # 401: the forged key
    # The victim's 2 requests a day are all still there, and the limit does hold.
    assert [chat(stack, VICTIM_KEY, "victim-limited").status_code for _ in range(3)] == [200, 200, 429]


def test_another_namespace_cannot_take_the_model_name_and_cannot_use_its_secrets(stack: Stack, evil_mock: MockProcess) -> None:
    httpx.delete(f"{evil_mock.url}/_mock/requests", timeout=5)
    for _ in range(3):
        assert "model=victim-gpt" in reply(chat(stack, VICTIM_KEY, "victim-chat"))
    assert httpx.get(f"{evil_mock.url}/_mock/requests", timeout=5).json() == []
    status = stack.status()["bindings"]
    steal = {c["type"]: c for c in status["attacker/steal"]["conditions"]}  # type: ignore[index]
    assert (steal["Ready"]["status"], steal["Ready"]["reason"]) == ("False", "CrossNamespaceReference")
    assert chat(stack, EVIL_KEY, "steal-chat").status_code == 404


def test_a_binding_owner_may_grant_another_namespaces_tenant_explicitly(stack: Stack) -> None:
    assert "model=shared-gpt" in reply(chat(stack, VICTIM_KEY, "shared-chat"))
    assert chat(stack, EVIL_KEY, "shared-chat").status_code == 404
    with httpx.Client(base_url=stack.url, headers={"authorization": f"Bearer {VICTIM_KEY}"}, timeout=10) as c:
        models = {m["id"]: m["owned_by"] for m in c.get("/v1/models").json()["data"]}
    assert models == {"victim-chat": "default", "victim-limited": "default", "shared-chat": "shared"}


def test_a_grant_the_grantee_namespace_never_accepted_reaches_none_of_its_callers(stack: Stack, evil_mock: MockProcess) -> None:
    httpx.delete(f"{evil_mock.url}/_mock/requests", timeout=5)
    assert chat(stack, VICTIM_KEY, "lure-chat", "my PIN is 4242").status_code == 404
    assert chat(stack, token(VICTIM_HS), "lure-chat", "my PIN is 4242").status_code == 404
    assert httpx.get(f"{evil_mock.url}/_mock/requests", timeout=5).json() == []
    # Served in its own namespace all the same; its status says who has not accepted, and how to.
    assert "model=lure-gpt" in reply(chat(stack, EVIL_KEY, "lure-chat"))
    lure = {c["type"]: c for c in stack.status()["bindings"]["attacker/lure"]["conditions"]}  # type: ignore[index]
    assert lure["Ready"]["status"] == "True"
    assert (lure["GrantsAccepted"]["status"], lure["GrantsAccepted"]["reason"]) == ("False", "GrantNotAccepted")
    assert "crdgol.io/accept-from: attacker" in lure["GrantsAccepted"]["message"]


def test_metrics_name_the_qualified_tenant(stack: Stack) -> None:
    chat(stack, EVIL_KEY, "evil-chat")
    # Usage is counted from Envoy's access log, within its flush interval of the response.
    deadline = time.monotonic() + 2
    while 'binding="attacker/evil-chat",tenant="attacker/quickstart"' not in (
        text := httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5).text
    ) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 'binding="attacker/evil-chat",tenant="attacker/quickstart"' in text
