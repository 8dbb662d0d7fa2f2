"""The in-mesh render: Istio manifests that are deterministic, secret-free, and carry Envoy
config that Envoy's own validator accepts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from controller.mesh import MeshSettings, render_mesh, to_yaml, vhost_name
from controller.models import parse_binding, parse_secret
from controller.render import ROUTE_HEADER
from crdgol.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "envoy" / "mesh" / "quickstart-openai.yaml"
PROVIDER_KEY = "sk-provider-openai-secret"
ANTHROPIC_KEY = "sk-ant-provider-secret"
API_KEY = "sk-crdgol-mesh-caller"

Json = dict[str, Any]


def sample_binding(**spec: object) -> Json:
    base: Json = {
        "model": "chat",
        "tenants": ["team-a"],
        "backends": [
            {
                "name": "openai",
                "provider": "openai",
                "endpoint": "https://api.openai.com/v1",
                "model": "gpt-4o-mini",
                "credentialsRef": {"name": "providers", "key": "openai"},
            },
            {
                "name": "anthropic",
                "provider": "anthropic",
                "endpoint": "https://api.anthropic.com",
                "model": "claude-3-5-haiku-latest",
                "credentialsRef": {"name": "providers", "key": "anthropic"},
                "priority": 1,
            },
        ],
        "context": {"systemPrompt": "You answer for ${tenant}.", "history": {"enabled": True}},
        "quotas": {"tenants": {"team-a": {"requests": [{"amount": 60, "per": "minute"}]}}},
    }
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "chat", "namespace": "apps"},
        "spec": {**base, **spec},
    }


def sample_secrets() -> list[Json]:
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "providers", "namespace": "apps"},
         "stringData": {"openai": PROVIDER_KEY, "anthropic": ANTHROPIC_KEY}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "caller", "namespace": "apps", "labels": {"crdgol.io/api-key": "true"},
                      "annotations": {"crdgol.io/tenant": "team-a"}},
         "stringData": {"key": API_KEY}},
    ]


def rendered(settings: MeshSettings | None = None, bindings: list[Json] | None = None) -> list[Json]:
    specs = [parse_binding(b) for b in (bindings or [sample_binding()])]
    secrets = [parse_secret(s) for s in sample_secrets()]
    return render_mesh(specs, secrets, settings or MeshSettings())


def envoy_filter(docs: list[Json]) -> Json:
    return next(d for d in docs if d["kind"] == "EnvoyFilter")


def patches(docs: list[Json], apply_to: str) -> list[Json]:
    return [p for p in envoy_filter(docs)["spec"]["configPatches"] if p["applyTo"] == apply_to]


# --- the manifests ------------------------------------------------------------------------------


def test_the_sample_renders_to_its_golden_file_byte_for_byte() -> None:
    out = to_yaml(rendered())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(out)
    assert GOLDEN.exists(), "no golden file: run with UPDATE_GOLDEN=1"
    assert out == GOLDEN.read_text()
    assert out == to_yaml(rendered())  # deterministic
    assert list(yaml.safe_load_all(out)) == rendered()


def test_no_secret_value_reaches_the_manifests() -> None:
    out = to_yaml(rendered())
    for secret in (PROVIDER_KEY, ANTHROPIC_KEY, API_KEY):
        assert secret not in out


def test_each_provider_host_gets_a_service_entry_and_tls_origination() -> None:
    docs = rendered()
    entries = {d["spec"]["hosts"][0]: d["spec"] for d in docs if d["kind"] == "ServiceEntry"}
    rules = {d["spec"]["host"]: d["spec"] for d in docs if d["kind"] == "DestinationRule"}
    assert sorted(entries) == sorted(rules) == ["api.anthropic.com", "api.openai.com"]
    for host, se in entries.items():
        assert se["location"] == "MESH_EXTERNAL" and se["resolution"] == "DNS"
        assert se["ports"] == [{"number": 80, "name": "http-crdgol", "protocol": "HTTP", "targetPort": 443}]
        assert rules[host]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "sni": host}


def test_ext_proc_goes_before_the_router_and_is_enabled_only_on_provider_vhosts() -> None:
    docs = rendered()
    (filt,) = patches(docs, "HTTP_FILTER")
    assert filt["match"]["context"] == "SIDECAR_OUTBOUND"
    assert filt["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    assert filt["patch"]["operation"] == "INSERT_BEFORE"
    value = filt["patch"]["value"]
    assert value["name"] == "envoy.filters.http.ext_proc" and value["disabled"] is True
    assert value["typed_config"]["failure_mode_allow"] is False  # fail closed, as in the gateway
    vhosts = [p["match"]["routeConfiguration"]["vhost"]["name"] for p in patches(docs, "VIRTUAL_HOST")]
    assert vhosts == ["api.anthropic.com:80", "api.openai.com:80"]
    for p in patches(docs, "VIRTUAL_HOST"):
        assert "envoy.filters.http.ext_proc" in p["patch"]["value"]["typed_per_filter_config"]


def test_routes_match_the_route_header_only_in_provider_vhosts() -> None:
    docs = rendered()
    routes = patches(docs, "HTTP_ROUTE")
    assert {r["match"]["routeConfiguration"]["vhost"]["name"] for r in routes} == {
        vhost_name(h, MeshSettings()) for h in ("api.openai.com", "api.anthropic.com")
    }
    for r in routes:
        assert r["match"]["routeConfiguration"]["vhost"]["name"].endswith(":80")
        assert r["patch"]["value"]["match"]["headers"][0]["name"] == ROUTE_HEADER


def test_extproc_cluster_is_added_or_an_existing_one_is_used() -> None:
    added = [p["patch"]["value"]["name"] for p in patches(rendered(), "CLUSTER")]
    assert added[0] == "crdgol-extproc"
    istio = "outbound|9002||crdgol-extproc.crdgol-system.svc.cluster.local"
    docs = rendered(MeshSettings(extproc_cluster=istio))
    names = [p["patch"]["value"]["name"] for p in patches(docs, "CLUSTER")]
    assert "crdgol-extproc" not in names
    text = json.dumps(envoy_filter(docs))
    assert '"cluster_name": "crdgol-extproc"' not in text
    assert text.count(istio) == 1 + 2  # the downstream filter and each backend's upstream filter


def test_plain_http_only_bindings_and_unservable_ones_are_left_out() -> None:
    local = sample_binding(backends=[{"name": "v", "provider": "openai-compatible", "endpoint": "http://vllm:8000/v1", "model": "m"}])
    assert rendered(bindings=[local]) == []
    missing = sample_binding()
    missing["spec"]["backends"][0]["credentialsRef"] = {"name": "nope", "key": "k"}
    assert rendered(bindings=[missing]) == []


def test_a_workload_selector_scopes_the_filter() -> None:
    docs = rendered(MeshSettings(namespace="apps", workload_labels=(("crdgol.io/gateway", "mesh"),)))
    ef = envoy_filter(docs)
    assert ef["metadata"]["namespace"] == "apps"
    assert ef["spec"]["workloadSelector"] == {"labels": {"crdgol.io/gateway": "mesh"}}


# --- the embedded Envoy config is valid Envoy config ----------------------------------------------


def bootstrap_from(docs: list[Json]) -> Json:
    """A minimal static bootstrap built only from the EnvoyFilter's patch values."""
    (filt,) = patches(docs, "HTTP_FILTER")
    clusters = [p["patch"]["value"] for p in patches(docs, "CLUSTER")]
    vhosts = []
    for p in patches(docs, "VIRTUAL_HOST"):
        name = p["match"]["routeConfiguration"]["vhost"]["name"]
        routes = [r["patch"]["value"] for r in patches(docs, "HTTP_ROUTE") if r["match"]["routeConfiguration"]["vhost"]["name"] == name]
        vhosts.append({"name": name, "domains": [name.split(":")[0]], **p["patch"]["value"], "routes": routes})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mesh",
        "route_config": {"name": "80", "virtual_hosts": vhosts},
        "http_filters": [
            filt["patch"]["value"],
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    listener = {
        "name": "0.0.0.0_80",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15080}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def test_the_patched_envoy_config_is_accepted_by_envoy(tmp_path: Path) -> None:
    path = tmp_path / "mesh-envoy.json"
    path.write_text(json.dumps(bootstrap_from(rendered()), indent=1))
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
