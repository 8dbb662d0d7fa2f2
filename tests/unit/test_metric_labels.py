"""Metric labels stay bounded by the policy, whatever tokens claim.

A JWT issuer's owner can sign any tenant claim; every distinct label value would be a new series
held by extproc (and Prometheus) forever. Tenants the policy names keep their own label; every
other tenant of a namespace shows as ``namespace/*``. Read back with prometheus_client's parser.
"""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.manifests import load_folder
from controller.render import RenderSettings, render
from extproc.policy import PolicyHolder, compile_policy
from extproc.services import Services
from tests.unit.request_path import (
    chat,
    downstream,
    drive,
    openai_completion,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

ISSUER = "https://idp.example"
SECRET = "issuer-secret-0123456789-0123456789-0123"
KEY = "sk-labels-key"

MANIFESTS = [
    {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "key", "namespace": "ns", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "named"}},
        "stringData": {"key": KEY},
    },
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "issuer", "namespace": "ns"}, "stringData": {"hs": SECRET}},
    {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {
            "model": "chat",
            "tenants": ["*"],  # every tenant of the namespace: whatever a token names
            "backends": [{"name": "a", "provider": "openai-compatible", "endpoint": "http://127.0.0.1:9/v1", "model": "m"}],
            "auth": {"jwt": [{"issuer": ISSUER, "hs256SecretRef": {"name": "issuer", "key": "hs"}}]},
            "quotas": {
                "default": {"requests": [{"amount": 1000, "per": "minute"}]},
                "tenants": {"quota-named": {"requests": [{"amount": 1000, "per": "minute"}]}},
            },
        },
    },
]


def services(tmp_path: Path) -> Services:
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all(MANIFESTS))
    m = load_folder(tmp_path)
    return Services(policy=PolicyHolder(compile_policy(render(m.bindings, m.secrets, RenderSettings(version=1)).snapshot)))


def token(tenant: str) -> str:
    return jwt.encode({"iss": ISSUER, "sub": f"user-{tenant}", "tenant": tenant, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def call(s: Services, credential: str) -> None:
    run = await drive(
        downstream(s),
        [request_headers(key=credential), request_body(chat("chat")), response_headers(), response_body(openai_completion(3, 4))],
        services=s,
    )
    assert run.immediate is None, run.responses


def tenant_labels(s: Services) -> dict[str, set[str]]:
    """Metric name -> the tenant label values it carries."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(s.metrics.render().decode()):
        for sample in family.samples:
            if "tenant" in sample.labels:
                out.setdefault(family.name, set()).add(sample.labels["tenant"])
    return out


async def test_tenants_a_token_makes_up_share_one_label_per_namespace(tmp_path: Path) -> None:
    s = services(tmp_path)
    for i in range(40):
        await call(s, token(f"minted-{i}"))
    labels = tenant_labels(s)
    assert {"crdgol_tokens", "gen_ai_client_token_usage", "gen_ai_server_request_duration_seconds"} <= set(labels)
    assert set().union(*labels.values()) == {"ns/*"}  # every metric with a tenant label
    # A quota gauge shows one tenant's headroom: none for tenants the policy does not name.
    assert "crdgol_quota_remaining" not in labels


async def test_tenants_the_policy_names_keep_their_own_label(tmp_path: Path) -> None:
    s = services(tmp_path)
    await call(s, KEY)  # an API key's tenant
    await call(s, token("quota-named"))  # a tenant a quota entry names
    await call(s, token("someone"))
    labels = tenant_labels(s)
    assert labels["crdgol_tokens"] == {"ns/named", "ns/quota-named", "ns/*"}
    assert labels["crdgol_quota_remaining"] == {"ns/named", "ns/quota-named"}
