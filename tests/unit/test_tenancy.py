"""Tenancy has an owner: who a credential can act as, which binding a caller reaches, and which
declarations are refused — the pure rules, from the manifests through the render to extproc."""

from __future__ import annotations

import hashlib
from typing import Any

import jwt
import pytest

from controller.models import SpecError, parse_binding, parse_secret
from controller.render import RenderSettings, render
from crdgol import tenancy
from extproc.auth import Authenticator
from extproc.errors import Unauthenticated
from extproc.policy import Policy, compile_policy

ISSUER = "https://login.example"
NOW = 1_800_000_000.0


def binding(namespace: str, name: str, model: str | None = None, accept: str = "", **spec: Any) -> dict[str, Any]:
    """An AIModelBinding; ``accept``: the namespaces whose grants its namespace accepts."""
    backend = {"name": "a", "provider": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m"}
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if accept:
        meta["annotations"] = {"crdgol.io/accept-from": accept}
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": meta,
        "spec": {"model": model or name, "backends": [backend], **spec},
    }


def key_secret(namespace: str, name: str, tenant: str, value: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": tenant}},
        "stringData": {"key": value},
    }


def hs_secret(namespace: str, value: str) -> dict[str, Any]:
    return {"metadata": {"name": "issuer", "namespace": namespace}, "stringData": {"hs": value}}


JWT = {"jwt": [{"issuer": ISSUER, "hs256SecretRef": {"name": "issuer", "key": "hs"}}]}


def policy(bindings: list[dict[str, Any]], secrets: list[dict[str, Any]] | None = None) -> tuple[Policy, Any]:
    result = render([parse_binding(b) for b in bindings], [parse_secret(s) for s in secrets or []], RenderSettings(version=1))
    return compile_policy(result.snapshot), result


def token(secret: str, tenant: str = "acme") -> str:
    return jwt.encode({"iss": ISSUER, "sub": "u", "tenant": tenant, "exp": int(NOW) + 600}, secret, algorithm="HS256")


# --- names and patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "qualified"),
    [("acme", "team/acme"), ("*", "team/*"), ("other/acme", "other/acme"), ("other/*", "other/*"), (" acme ", "team/acme")],
)
def test_a_tenant_pattern_is_qualified_by_the_bindings_namespace(raw: str, qualified: str) -> None:
    assert tenancy.parse_pattern(raw, "team") == qualified


@pytest.mark.parametrize("raw", ["", "a/b/c", "Team/acme", "acme*", "a b", "-acme", "x" * 129])
def test_a_malformed_tenant_pattern_is_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        tenancy.parse_pattern(raw, "team")


def test_a_binding_without_tenants_serves_its_own_namespace_only() -> None:
    assert parse_binding(binding("team", "chat")).tenants == ("team/*",)
    assert parse_binding(binding("team", "chat", tenants=["acme", "other/bob"])).tenants == ("other/bob", "team/acme")


def test_quota_entries_name_qualified_tenants() -> None:
    spec = parse_binding(binding("team", "chat", quotas={"tenants": {"acme": {"concurrent": 1}, "other/bob": {"concurrent": 2}}}))
    assert [t for t, _ in spec.quotas.tenants] == ["other/bob", "team/acme"]
    with pytest.raises(SpecError, match="name one tenant"):
        parse_binding(binding("team", "chat", quotas={"tenants": {"*": {"concurrent": 1}}}))


def test_a_binding_can_use_another_namespaces_secret_only_when_its_owner_shares_it() -> None:
    ref = {"name": "p", "key": "k", "namespace": "platform"}
    b = binding("team", "chat", backends=[{"provider": "openai", "endpoint": "http://x/v1", "model": "m", "credentialsRef": ref}])
    unshared = {"metadata": {"name": "p", "namespace": "platform"}, "stringData": {"k": "sk-platform"}}
    _, result = policy([b], [unshared])
    assert result.problems["team/chat"].reason == "CrossNamespaceReference"
    assert "crdgol.io/share-with: team" in result.problems["team/chat"].message
    for share in ("team", "other, team", "*"):
        annotations = {"crdgol.io/share-with": share, "crdgol.io/share-hosts": "x"}
        shared = {**unshared, "metadata": {**unshared["metadata"], "annotations": annotations}}
        _, result = policy([b], [shared])
        assert result.accepted == ("team/chat",), share
    _, result = policy([b], [{**unshared, "metadata": {**unshared["metadata"], "annotations": {"crdgol.io/share-with": "other"}}}])
    assert result.problems["team/chat"].reason == "CrossNamespaceReference"


def test_unsharing_a_secret_takes_effect_even_when_the_render_is_cached() -> None:
    from controller.render import RenderCache

    ref = {"name": "p", "key": "k", "namespace": "platform"}
    spec = parse_binding(binding("team", "chat", backends=[{"provider": "openai", "endpoint": "http://x/v1", "model": "m", "credentialsRef": ref}]))
    meta = {"name": "p", "namespace": "platform"}
    cache = RenderCache()
    annotations = {"crdgol.io/share-with": "team", "crdgol.io/share-hosts": "x"}
    shared = parse_secret({"metadata": {**meta, "annotations": annotations}, "stringData": {"k": "v"}})
    assert render([spec], [shared], RenderSettings(), cache).accepted == ("team/chat",)
    unshared = parse_secret({"metadata": meta, "stringData": {"k": "v"}})
    assert render([spec], [unshared], RenderSettings(), cache).accepted == ()


# --- identity sources -----------------------------------------------------------------------------


def test_an_api_key_acts_as_a_tenant_of_its_secrets_namespace() -> None:
    pol, _ = policy([], [key_secret("team", "k", "acme", "sk-1"), key_secret("evil", "k", "acme", "sk-2")])
    auth = Authenticator(pol)
    assert auth.authenticate("sk-1").tenants == ("team/acme",)
    assert auth.authenticate("sk-2").tenants == ("evil/acme",)


def test_an_api_key_secret_naming_another_namespaces_tenant_loads_no_key_and_says_why() -> None:
    pol, result = policy([], [key_secret("evil", "k", "team/acme", "sk-forged")])
    assert pol.api_keys == {}
    assert "not a tenant name" in result.source_problems["Secret evil/k"]
    with pytest.raises(Unauthenticated):
        Authenticator(pol).authenticate("sk-forged")


def test_one_issuer_declared_by_two_namespaces_acts_only_where_its_keys_verify() -> None:
    pol, result = policy(
        [binding("team", "chat", auth=JWT), binding("evil", "bait", auth=JWT)],
        [hs_secret("team", "team-secret-0123456789-0123456789"), hs_secret("evil", "evil-secret-0123456789-0123456789")],
    )
    assert result.accepted == ("evil/bait", "team/chat")  # two namespaces' declarations: no conflict
    auth = Authenticator(pol, clock=lambda: NOW)
    assert auth.authenticate(token("team-secret-0123456789-0123456789")).tenants == ("team/acme",)
    assert auth.authenticate(token("evil-secret-0123456789-0123456789")).tenants == ("evil/acme",)
    with pytest.raises(Unauthenticated, match="signature"):
        auth.authenticate(token("guessed-secret-0123456789-012345678"))


def test_a_token_both_namespaces_verify_acts_as_each_namespaces_tenant() -> None:
    shared = "shared-idp-secret-0123456789-01234567"
    pol, _ = policy([binding("a", "chat", auth=JWT), binding("b", "chat", auth=JWT)], [hs_secret("a", shared), hs_secret("b", shared)])
    ident = Authenticator(pol, clock=lambda: NOW).authenticate(token(shared))
    assert ident.tenants == ("a/acme", "b/acme")
    # Both namespaces serve "chat": which one it means is not the gateway's to guess (403).
    reached, tenant = pol.resolve("chat", ident.tenants)
    assert reached is not None and tenant == ""
    assert pol.visible(ident.tenants) == []


def test_a_tenant_claim_naming_a_namespace_is_refused() -> None:
    pol, _ = policy([binding("evil", "bait", auth=JWT)], [hs_secret("evil", "evil-secret-0123456789-0123456789")])
    with pytest.raises(Unauthenticated, match="not a tenant name"):
        Authenticator(pol, clock=lambda: NOW).authenticate(token("evil-secret-0123456789-0123456789", tenant="team/acme"))


def test_an_identity_can_only_act_as_its_own_tenants() -> None:
    pol, _ = policy([], [key_secret("team", "k", "acme", "sk-1")])
    ident = Authenticator(pol).authenticate("sk-1")
    assert ident.acting_as("team/acme").tenant == "team/acme"
    with pytest.raises(ValueError):
        ident.acting_as("other/acme")


# --- which binding a caller reaches ---------------------------------------------------------------


def test_the_callers_own_namespace_serves_a_model_name_before_any_other() -> None:
    pol, result = policy([binding("aaa", "squat", model="chat", tenants=["team/*"]), binding("team", "chat", accept="aaa")])
    assert set(result.accepted) == {"aaa/squat", "team/chat"}
    assert pol.resolve("chat", ("team/acme",))[0].key == "team/chat"  # type: ignore[union-attr]
    # Only where the caller's namespace serves nothing does another's explicit grant apply.
    pol2, _ = policy([binding("aaa", "squat", model="chat", tenants=["team/*"]), binding("team", "other", accept="aaa")])
    assert pol2.resolve("chat", ("team/acme",)) == (pol2.models["chat"][0], "team/acme")


def test_a_model_of_another_namespace_that_grants_nothing_is_invisible() -> None:
    pol, _ = policy([binding("team", "chat", tenants=["acme"])])
    assert pol.resolve("chat", ("evil/acme",)) == (None, "")  # 404, not 403
    assert pol.resolve("chat", ("team/bob",))[1] == ""  # own namespace, not allowed: 403
    assert pol.resolve("chat", ("team/bob",))[0] is not None
    assert [b.key for b in pol.visible(("team/acme",))] == ["team/chat"]
    assert pol.visible(("evil/acme",)) == []


def test_conflicting_claims_are_refused_and_the_refused_binding_is_not_served() -> None:
    pol, result = policy(
        [
            binding("team", "chat", accept="x, y"),
            binding("team", "chat-2", model="chat"),  # same model, same namespace
            binding("x", "one", model="shared", tenants=["team/*"]),
            binding("y", "two", model="shared", tenants=["team/acme"]),  # both grant team's tenants
        ]
    )
    assert result.problems["team/chat-2"].reason == "ModelConflict"
    assert "namespace team" in result.problems["y/two"].message
    assert set(result.accepted) == {"team/chat", "x/one"}
    assert {b.key for bs in pol.models.values() for b in bs} == {"team/chat", "x/one"}


def test_an_issuer_declared_differently_twice_in_one_namespace_refuses_the_second_binding() -> None:
    other = {"jwt": [{"issuer": ISSUER, "tenantClaim": "org", "hs256SecretRef": {"name": "issuer", "key": "hs"}}]}
    pol, result = policy([binding("team", "a", auth=JWT), binding("team", "b", auth=other)], [hs_secret("team", "s" * 40)])
    assert result.problems["team/b"].reason == "JwtIssuerConflict"
    assert result.accepted == ("team/a",)
    assert "b" not in pol.models  # never "served but not Ready"


def test_quotas_and_history_key_on_the_qualified_tenant() -> None:
    from extproc.history import history_key
    from extproc.quota import quota_scope

    assert quota_scope("team/acme", "team/chat") != quota_scope("evil/acme", "team/chat")
    assert history_key("team/acme", "team/chat", "key:01", "s1") != history_key("evil/acme", "team/chat", "key:01", "s1")


def test_api_key_hashes_in_the_snapshot_name_their_qualified_tenant() -> None:
    _, result = policy([], [key_secret("team", "k", "acme", "sk-1")])
    (key,) = result.snapshot.api_keys
    assert (key.sha256, key.tenant, key.source) == (hashlib.sha256(b"sk-1").digest(), "team/acme", "team/k")


# --- a public key proves nothing about who owns an issuer ---------------------------------------


def _rs256_issuer() -> tuple[Any, dict[str, Any]]:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return key, {"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}


def test_a_copied_public_jwks_cannot_capture_the_victims_callers() -> None:
    # The victim's IdP publishes its JWKS (public by design). An attacker namespace that sorts
    # first declares the same issuer with the same JWKS and a binding for the victim's model name.
    # The victim's token now verifies in both namespaces; it must never be routed to the
    # attacker's backend (which would receive the victim's prompts and session id).
    key, jwks = _rs256_issuer()
    auth_spec = {"jwt": [{"issuer": ISSUER, "jwks": jwks}]}
    pol, result = policy([binding("team", "chat", auth=auth_spec), binding("aaa", "chat", auth=auth_spec)])
    assert set(result.accepted) == {"aaa/chat", "team/chat"}
    victim = jwt.encode({"iss": ISSUER, "sub": "u", "tenant": "acme", "exp": int(NOW) + 600}, key, algorithm="RS256", headers={"kid": "k1"})
    ident = Authenticator(pol, clock=lambda: NOW).authenticate(victim)
    assert ident.tenants == ("aaa/acme", "team/acme")
    reached, tenant = pol.resolve("chat", ident.tenants)
    assert reached is None or reached.namespace != "aaa" or not tenant, "the victim's request was routed to the attacker"
    # The same through a grant: the platform grants "team/*" a model; the attacker serves the same
    # name in its own namespace. The victim's call must not land in the attacker's namespace either.
    pol2, _ = policy(
        [
            binding("platform", "shared", model="gpt", tenants=["team/*"]),
            binding("aaa", "gpt", auth=auth_spec),
            binding("team", "x", accept="platform", auth=auth_spec),
        ]
    )
    reached, tenant = pol2.resolve("gpt", ident.tenants)
    assert reached is None or reached.namespace != "aaa" or not tenant, "the victim's request was routed to the attacker"
    assert [b.key for b in pol2.visible(ident.tenants) if b.namespace == "aaa"] == []


def test_a_caller_whose_own_namespaces_agree_is_still_served() -> None:
    # The same IdP trusted by two namespaces is fine as long as only one of them serves the model.
    _key, jwks = _rs256_issuer()
    auth_spec = {"jwt": [{"issuer": ISSUER, "jwks": jwks}]}
    pol, _ = policy([binding("team", "chat", auth=auth_spec), binding("other", "embed", auth=auth_spec)])
    reached, tenant = pol.resolve("chat", ("other/acme", "team/acme"))
    assert reached is not None and (reached.key, tenant) == ("team/chat", "team/acme")


def test_a_shared_provider_credential_goes_only_to_the_hosts_its_owner_names() -> None:
    # Sharing lets another namespace spend the account, not read the key: that namespace chooses
    # its binding's endpoint, so without a host list it could point it at its own server and
    # receive the credential in the Authorization header.
    ref = {"name": "p", "key": "k", "namespace": "platform"}

    def team(endpoint: str) -> dict[str, Any]:
        return binding("team", "chat", backends=[{"provider": "openai", "endpoint": endpoint, "model": "m", "credentialsRef": ref}])

    def platform(**annotations: str) -> dict[str, Any]:
        return {"metadata": {"name": "p", "namespace": "platform", "annotations": annotations}, "stringData": {"k": "sk-platform"}}

    share = {"crdgol.io/share-with": "team"}
    hosts = {"crdgol.io/share-hosts": "api.openai.com, 127.0.0.1:8081"}
    _, result = policy([team("https://attacker.example/v1")], [platform(**share, **hosts)])
    assert result.problems["team/chat"].reason == "CrossNamespaceReference"
    assert "crdgol.io/share-hosts" in result.problems["team/chat"].message
    assert b"sk-platform" not in result.snapshot.SerializeToString()
    _, result = policy([team("https://api.openai.com/v1")], [platform(**share)])  # no host list: shared with nobody's endpoint
    assert result.problems["team/chat"].reason == "CrossNamespaceReference"
    for endpoint in ("https://api.openai.com/v1", "http://127.0.0.1:8081/v1"):
        _, result = policy([team(endpoint)], [platform(**share, **hosts)])
        assert result.accepted == ("team/chat",), endpoint
    _, result = policy([team("http://127.0.0.1:9999/v1")], [platform(**share, **hosts)])  # another port: another server
    assert result.problems["team/chat"].reason == "CrossNamespaceReference"
    # The owner's own bindings need no host list.
    own = binding("platform", "chat", backends=[{"provider": "openai", "endpoint": "http://x/v1", "model": "m", "credentialsRef": ref}])
    assert policy([own], [platform()])[1].accepted == ("platform/chat",)


# --- a grant to another namespace needs that namespace's consent ----------------------------------


def test_a_grant_the_grantee_never_accepted_is_not_in_force_and_the_status_says_who_must_accept() -> None:
    from controller.state import ControllerState

    state = ControllerState(RenderSettings(), clock=lambda: 1.0)
    state.upsert_binding(binding("aaa", "squat", model="chat", tenants=["team/*", "acme"]))
    state.upsert_secret(key_secret("team", "k", "alice", "sk-team"))
    result = state.rebuild()
    pol = compile_policy(result.snapshot)
    # Still served to its own namespace; team's callers do not reach it.
    assert result.accepted == ("aaa/squat",)
    assert pol.resolve("chat", ("team/alice",)) == (None, "")
    assert pol.resolve("chat", ("aaa/acme",))[1] == "aaa/acme"
    status = state.status("aaa/squat")
    assert status is not None and status.ready
    [grant] = [c for c in status.conditions if c.type == "GrantsAccepted"]
    assert (grant.status, grant.reason) == ("False", "GrantNotAccepted")
    assert "namespace team" in grant.message and "crdgol.io/accept-from: aaa" in grant.message
    # The grantee's API-key Secret accepts: the grant is in force and the condition goes away.
    state.upsert_secret({**key_secret("team", "k", "alice", "sk-team"), "metadata": {**key_secret("team", "k", "alice", "sk-team")["metadata"], "annotations": {"crdgol.io/tenant": "alice", "crdgol.io/accept-from": "aaa"}}})
    pol = compile_policy(state.rebuild().snapshot)
    assert pol.resolve("chat", ("team/alice",))[1] == "team/alice"
    status = state.status("aaa/squat")
    assert status is not None and not [c for c in status.conditions if c.type == "GrantsAccepted"]


def test_an_unaccepted_grant_cannot_squat_a_model_name_another_namespace_grants_with_consent() -> None:
    # "aaa" sorts first and grants team's tenants the model the platform serves them; only the
    # platform's grant is accepted by team, so it is the one in force (before: "aaa" won the name
    # and the platform's binding was refused as a conflict, and team's prompts went to aaa).
    pol, result = policy(
        [
            binding("aaa", "squat", model="gpt", tenants=["team/*"]),
            binding("platform", "gpt", tenants=["team/*"]),
            binding("team", "own", accept="platform"),
        ]
    )
    assert set(result.accepted) == {"aaa/squat", "platform/gpt", "team/own"}
    assert set(result.grant_problems) == {"aaa/squat"}
    reached, tenant = pol.resolve("gpt", ("team/acme",))
    assert reached is not None and reached.key == "platform/gpt" and tenant == "team/acme"


@pytest.mark.parametrize("accept", ["*", "aaa", "other, aaa"])
def test_a_namespace_accepts_grants_by_name_or_from_everyone(accept: str) -> None:
    pol, result = policy([binding("aaa", "m", tenants=["team/*"]), binding("team", "own", accept=accept)])
    assert not result.grant_problems
    assert pol.resolve("m", ("team/acme",))[1] == "team/acme"


def test_a_namespace_cannot_accept_on_anothers_behalf() -> None:
    # aaa's own binding says team accepts aaa: an annotation speaks only for its own namespace.
    _, result = policy([binding("aaa", "m", accept="aaa", tenants=["team/*"])])
    assert result.grant_problems["aaa/m"].reason == "GrantNotAccepted"


# --- what a refused caller is told ------------------------------------------------------------------


async def _refusal(pol: Policy, credential: str, model: str) -> dict[str, Any]:
    from extproc.policy import PolicyHolder
    from extproc.services import Services
    from tests.unit.request_path import chat, downstream, drive, request_body, request_headers

    services = Services(policy=PolicyHolder(pol))
    run = await drive(downstream(services), [request_headers(key=credential), request_body(chat(model))], services=services)
    assert run.status() == 403, run.responses
    return run.error()["error"]


def _live_token(secret: str) -> str:
    import time

    return jwt.encode({"iss": ISSUER, "sub": "u", "tenant": "acme", "exp": int(time.time()) + 600}, secret, algorithm="HS256")


async def test_an_ambiguous_credential_is_told_what_happened_without_naming_any_namespace() -> None:
    shared = "shared-idp-secret-0123456789-01234567"
    pol, _ = policy(
        [binding("victim", "chat", auth=JWT), binding("attacker", "chat", auth=JWT)],
        [hs_secret("victim", shared), hs_secret("attacker", shared)],
    )
    error = await _refusal(pol, _live_token(shared), "chat")
    assert error["code"] == "ambiguous_credential"
    assert "more than one namespace" in error["message"]
    assert "victim" not in error["message"] and "attacker" not in error["message"]


async def test_a_denied_caller_is_told_its_tenant_in_the_refusing_namespace_only() -> None:
    shared = "shared-idp-secret-0123456789-01234567"
    pol, _ = policy(
        [binding("team", "chat", tenants=["bob"], auth=JWT), binding("elsewhere", "other", auth=JWT)],
        [hs_secret("team", shared), hs_secret("elsewhere", shared)],
    )
    error = await _refusal(pol, _live_token(shared), "chat")
    assert error["code"] == "model_not_allowed"
    assert "team/acme may not call the model 'chat'" in error["message"]
    assert "elsewhere" not in error["message"]
