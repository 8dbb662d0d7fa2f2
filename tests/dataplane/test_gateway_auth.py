"""Who may call what: API keys, JWTs, tenants — through real Envoy and extproc."""

from __future__ import annotations

import time

import httpx
import jwt

from tests.conftest import ACME_KEY, GLOBEX_KEY, HS_SECRET, Gateway


def error_of(r: httpx.Response) -> dict[str, str]:
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return dict(body["error"])


def test_a_valid_api_key_in_the_authorization_header_is_served(gw: Gateway) -> None:
    r = gw.chat("chat")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("[mock]")


def test_a_valid_api_key_in_x_api_key_is_served(gw: Gateway) -> None:
    with gw.client(None, **{"x-api-key": ACME_KEY}) as c:
        r = c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_a_missing_key_is_refused_with_401_and_an_openai_error(gw: Gateway) -> None:
    r = gw.chat("chat", key=None)
    assert r.status_code == 401
    assert error_of(r)["type"] == "authentication_error"


def test_a_wrong_key_is_refused_with_401_and_the_key_is_not_echoed(gw: Gateway) -> None:
    r = gw.chat("chat", key="sk-not-a-real-key-123")
    assert r.status_code == 401
    assert "sk-not-a-real-key-123" not in r.text


def test_a_tenant_not_allowed_on_the_binding_gets_403(gw: Gateway) -> None:
    assert gw.chat("private", key=ACME_KEY).status_code == 403
    assert gw.chat("private", key=GLOBEX_KEY).status_code == 200


def test_an_hs256_jwt_names_the_tenant_from_its_claim(gw: Gateway) -> None:
    token = gw.hs256_token(org="globex", name="Ada")
    r = gw.chat("chat", key=token)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert "Tenant team-a/globex calls chat" in content
    assert 'Name: "Ada"' in content  # the user profile comes from the JWT claim, quoted


def test_an_rs256_jwt_is_verified_against_the_jwks_from_the_manifests(gw: Gateway) -> None:
    r = gw.chat("chat", key=gw.rs256_token())
    assert r.status_code == 200, r.text
    assert "Tenant team-a/globex" in r.json()["choices"][0]["message"]["content"]


def test_an_expired_or_forged_jwt_is_refused(gw: Gateway) -> None:
    expired = gw.hs256_token(exp=int(time.time()) - 3600)
    assert gw.chat("chat", key=expired).status_code == 401
    forged = jwt.encode({"iss": "https://issuer.test", "org": "acme", "exp": 4102444800}, "wrong-secret-wrong-secret-wrong-secret", algorithm="HS256")
    assert gw.chat("chat", key=forged).status_code == 401
    unsigned = jwt.encode({"iss": "https://issuer.test", "org": "acme"}, None, algorithm="none")
    assert gw.chat("chat", key=unsigned).status_code == 401
    assert HS_SECRET not in gw.chat("chat", key=forged).text


def test_models_lists_only_what_the_tenant_may_call(gw: Gateway) -> None:
    with gw.client(ACME_KEY) as c:
        acme = {m["id"] for m in c.get("/v1/models").json()["data"]}
    with gw.client(GLOBEX_KEY) as c:
        globex = {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert "chat" in acme and "private" not in acme
    assert "private" in globex


def test_models_without_a_key_is_401(gw: Gateway) -> None:
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401
