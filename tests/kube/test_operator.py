"""The kopf operator against kmock's emulated API server: status, config versions, Secrets."""

from __future__ import annotations

import base64
import copy
from typing import Any

from tests.kube.conftest import BINDINGS, SECRETS, Cluster


def binding(name: str, model: str = "chat", *, upstream: str = "gpt-4o", provider: str = "openai-compatible",
            secret: str = "provider") -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": model,
            "backends": [
                {
                    "name": "primary",
                    "provider": provider,
                    "endpoint": "http://127.0.0.1:8081/v1",
                    "model": upstream,
                    "credentialsRef": {"name": secret, "key": "apiKey"},
                }
            ],
        },
    }


def secret(name: str, data: dict[str, str], *, api_key: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if api_key:
        meta["labels"] = {"crdgol.io/api-key": "true"}
        meta["annotations"] = {"crdgol.io/tenant": "team-a"}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}


def served_models(cluster: Cluster) -> set[str]:
    result = cluster.controller.state.result
    return {b.model for b in result.snapshot.bindings} if result else set()


def backend_key(cluster: Cluster, model: str) -> str | None:
    snap = cluster.controller.policy.snapshot
    if snap is None:
        return None
    for b in snap.bindings:
        if b.model == model:
            return str(b.backends[0].api_key)
    return None


def xds_version(cluster: Cluster) -> int:
    snap = cluster.controller.xds.snapshot
    return int(snap.version) if snap is not None else 0


async def test_a_valid_binding_becomes_ready_and_is_served(cluster: Cluster) -> None:
    await cluster.create(secret("api-keys", {"k": "sk-team-a"}, api_key=True))
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    before = xds_version(cluster)
    await cluster.create(binding("chat"))

    ready = await cluster.wait_condition("chat", "Ready", "True", "Served")
    obj = await cluster.get(BINDINGS, "default", "chat")
    assert obj["status"]["observedGeneration"] == 1
    assert ready["observedGeneration"] == 1
    assert obj["status"]["model"] == "chat" and obj["status"]["backends"] == 1
    assert (await cluster.condition("chat", "Accepted"))["status"] == "True"
    # (state.result is what rebuild() returns for an unchanged state; rebuild() itself belongs to
    # the operator's thread.)
    result = cluster.controller.state.result
    assert result is not None and "chat" in {b.model for b in result.snapshot.bindings}
    assert xds_version(cluster) > before
    assert backend_key(cluster, "chat") == "sk-upstream-1"
    # kopf kept its bookkeeping in annotations and added no finalizer.
    assert not obj["metadata"].get("finalizers")
    assert "kopf" not in obj["status"]


async def test_an_updated_binding_gets_a_new_config_version_and_observed_generation(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("chat"))
    await cluster.wait_condition("chat", "Ready", "True")
    version = cluster.controller.state.version

    await cluster.patch(BINDINGS, "default", "chat", {"spec": {"backends": binding("chat", upstream="gpt-5")["spec"]["backends"]}})

    async def observed() -> bool:
        obj = await cluster.get(BINDINGS, "default", "chat")
        return bool(obj["metadata"]["generation"] == 2 and obj["status"]["observedGeneration"] == 2)

    await cluster.eventually(observed, what="observedGeneration 2")
    assert cluster.controller.state.version > version
    snap = cluster.controller.policy.snapshot
    assert snap is not None and snap.version == cluster.controller.state.version
    assert [b.backends[0].model for b in snap.bindings if b.model == "chat"] == ["gpt-5"]
    assert (await cluster.condition("chat", "Ready"))["observedGeneration"] == 2


async def test_a_bad_spec_is_refused_and_the_last_good_one_keeps_being_served(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("chat"))
    await cluster.wait_condition("chat", "Ready", "True")
    version = cluster.controller.state.version

    bad = copy.deepcopy(binding("chat")["spec"]["backends"])
    bad[0]["provider"] = "azure"
    await cluster.patch(BINDINGS, "default", "chat", {"spec": {"backends": bad}})

    refused = await cluster.wait_condition("chat", "Accepted", "False", "InvalidProvider")
    assert "azure" in refused["message"]
    assert refused["observedGeneration"] == 2
    # The last good spec is still served, unchanged.
    ready = await cluster.condition("chat", "Ready")
    assert ready["status"] == "True" and "newest was refused" in ready["message"]
    assert served_models(cluster) == {"chat"}
    assert cluster.controller.state.version == version
    # The refusal is also an Event on the binding, and the handler did not loop on it.
    warnings = await cluster.eventually(
        lambda: [e for e in cluster.events() if e.get("reason") == "InvalidProvider"], what="an Event"
    )
    assert warnings[0]["type"] == "Warning"
    assert warnings[0]["involvedObject"]["name"] == "chat"


async def test_a_binding_never_valid_is_refused_without_being_served(cluster: Cluster) -> None:
    await cluster.create(binding("broken", provider="azure"))
    await cluster.wait_condition("broken", "Accepted", "False", "InvalidProvider")
    assert (await cluster.condition("broken", "Ready"))["reason"] == "NoValidSpec"
    assert served_models(cluster) == set()


async def test_a_missing_secret_makes_the_binding_not_ready_until_it_appears(cluster: Cluster) -> None:
    # Another binding is already served, so the missing Secret changes nothing but a status.
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("other", model="other"))
    await cluster.wait_condition("other", "Ready", "True")

    await cluster.create(binding("chat", secret="late"))
    missing = await cluster.wait_condition("chat", "Ready", "False", "SecretNotFound")
    assert "default/late" in missing["message"]
    assert served_models(cluster) == {"other"}

    await cluster.create(secret("late", {"apiKey": "sk-late"}))
    await cluster.wait_condition("chat", "Ready", "True", "Served")
    assert served_models(cluster) == {"chat", "other"}
    assert backend_key(cluster, "chat") == "sk-late"


async def test_a_secret_created_before_its_binding_is_read_when_the_binding_arrives(cluster: Cluster) -> None:
    # Not labelled and not yet referenced: the filtered watch skips it at first.
    await cluster.create(secret("early", {"apiKey": "sk-early"}))
    await cluster.create(binding("chat", secret="early"))
    await cluster.wait_condition("chat", "Ready", "True", "Served")
    assert backend_key(cluster, "chat") == "sk-early"


async def test_rotating_a_provider_secret_publishes_a_new_credential(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-old"}))
    await cluster.create(binding("chat"))
    await cluster.wait_condition("chat", "Ready", "True")
    await cluster.eventually(lambda: backend_key(cluster, "chat") == "sk-old", what="the old key")
    snap = cluster.controller.policy.snapshot
    assert snap is not None
    version = snap.version

    new = base64.b64encode(b"sk-new").decode()
    await cluster.patch(SECRETS, "default", "provider", {"data": {"apiKey": new}})

    await cluster.eventually(lambda: backend_key(cluster, "chat") == "sk-new", what="the rotated key")
    snap = cluster.controller.policy.snapshot
    assert snap is not None and snap.version > version
    # The credential is in the policy snapshot only, never in the binding's status.
    obj = await cluster.get(BINDINGS, "default", "chat")
    assert "sk-new" not in str(obj)


async def test_a_deleted_binding_disappears_from_the_snapshot(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("chat"))
    await cluster.create(binding("other", model="other"))
    await cluster.wait_condition("chat", "Ready", "True")
    await cluster.wait_condition("other", "Ready", "True")
    version = cluster.controller.state.version

    await cluster.delete(BINDINGS, "default", "chat")

    def policy_models() -> set[str]:
        snap = cluster.controller.policy.snapshot
        return {b.model for b in snap.bindings} if snap else set()

    await cluster.eventually(lambda: policy_models() == {"other"}, what="chat to be gone")
    assert served_models(cluster) == {"other"}
    assert cluster.controller.state.version > version
    assert cluster.controller.state.status("default/chat") is None


async def test_a_second_binding_claiming_a_served_model_gets_a_conflict(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("chat-a", model="chat"))
    await cluster.wait_condition("chat-a", "Ready", "True")

    await cluster.create(binding("chat-b", model="chat"))
    conflict = await cluster.wait_condition("chat-b", "Ready", "False", "ModelConflict")
    assert "default/chat-a" in conflict["message"]
    assert (await cluster.condition("chat-a", "Ready"))["status"] == "True"


async def test_a_binding_losing_a_conflict_is_served_when_the_owner_goes(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("chat-a", model="chat"))
    await cluster.wait_condition("chat-a", "Ready", "True")
    await cluster.create(binding("chat-b", model="chat"))
    await cluster.eventually(lambda: cluster.controller.state.status("default/chat-b"), what="chat-b in the state")
    assert [b.model for b in cluster.controller.state.result.snapshot.bindings] == ["chat"]  # type: ignore[union-attr]

    # The other binding's status follows without any change of its own.
    await cluster.delete(BINDINGS, "default", "chat-a")
    ready = await cluster.wait_condition("chat-b", "Ready", "True", "Served")
    assert ready["observedGeneration"] == 1
    assert served_models(cluster) == {"chat"}


async def test_a_misspelled_field_is_refused_in_status_on_a_cluster_too(cluster: Cluster) -> None:
    # A real API server prunes unknown fields (or kubectl refuses them); kmock does not, so this
    # is the controller's own check: the same as file mode's.
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    obj = binding("chat")
    obj["spec"]["rateLimits"] = {"requestsPerMinute": 5}
    await cluster.create(obj)
    refused = await cluster.wait_condition("chat", "Accepted", "False", "UnknownField")
    assert refused["message"] == "spec.rateLimits: unknown field; did you mean quotas?"
    assert served_models(cluster) == set()


async def test_another_namespaces_keys_and_secrets_grant_nothing_on_a_cluster(cluster: Cluster) -> None:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(secret("api-keys", {"k": "sk-team-a"}, api_key=True))
    evil_key = secret("api-keys", {"k": "sk-evil"}, api_key=True)
    evil_key["metadata"]["namespace"] = "evil"
    await cluster.create(evil_key)
    steal = binding("steal", model="steal")
    steal["metadata"]["namespace"] = "evil"
    steal["spec"]["backends"][0]["credentialsRef"]["namespace"] = "default"
    await cluster.create(steal)
    await cluster.create(binding("chat"))
    await cluster.wait_condition("chat", "Ready", "True", "Served")
    refused = await cluster.wait_condition("steal", "Ready", "False", "CrossNamespaceReference", namespace="evil")
    assert "not shared with namespace evil" in refused["message"]

    def tenants() -> dict[str, str]:
        snap = cluster.controller.policy.snapshot
        return {k.source: k.tenant for k in snap.api_keys} if snap else {}

    # The same tenant name in two namespaces is two tenants.
    await cluster.eventually(lambda: tenants() == {"default/api-keys": "default/team-a", "evil/api-keys": "evil/team-a"}, what="both keys")
    # Sharing is the Secret owner's word: once annotated, the binding is served.
    # Naming the namespace is not enough: the owner also names the hosts its key may be sent to.
    await cluster.patch(SECRETS, "default", "provider", {"metadata": {"annotations": {"crdgol.io/share-with": "evil"}}})

    async def asks_for_hosts() -> bool:
        cond = await cluster.condition("steal", "Ready", namespace="evil")
        return cond.get("reason") == "CrossNamespaceReference" and "crdgol.io/share-hosts" in cond.get("message", "")

    await cluster.eventually(asks_for_hosts, what="a refusal naming crdgol.io/share-hosts")
    await cluster.patch(SECRETS, "default", "provider", {"metadata": {"annotations": {"crdgol.io/share-hosts": "127.0.0.1:8081"}}})
    await cluster.wait_condition("steal", "Ready", "True", "Served", namespace="evil")
