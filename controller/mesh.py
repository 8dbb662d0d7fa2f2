"""The in-mesh shape: Istio manifests that make every sidecar a crdgol gateway for provider hosts.

``render_mesh(bindings, secrets, MeshSettings)`` is pure and deterministic (sorted, no clock):
it returns Kubernetes manifests as Python data, and ``to_yaml`` serialises them. Nothing secret
is in them: provider credentials travel only in the policy snapshot extproc receives.

The pattern (Istio's egress TLS origination):

* The application calls ``http://api.openai.com/v1/...`` -- the same URL with ``http`` instead
  of ``https`` (for the SDKs: ``base_url="http://api.openai.com/v1"``), with its *crdgol* API key.
  The scheme change is unavoidable: a sidecar cannot see inside TLS the application originates,
  so policy (auth, quotas, context, usage) is only possible on plaintext the sidecar then
  encrypts. The hop from the application to its own sidecar never leaves the pod.
* A ``ServiceEntry`` per provider host declares it MESH_EXTERNAL with one port, 80/HTTP, whose
  ``targetPort`` is the provider's TLS port (443); resolution is DNS. That gives every sidecar
  an outbound HTTP virtual host ``api.openai.com:80`` to attach policy to. Port 443 is
  deliberately *not* declared: with ``outboundTrafficPolicy: REGISTRY_ONLY`` a direct https call,
  which would bypass policy, is refused (fail closed).
* A ``DestinationRule`` per host originates TLS (``mode: SIMPLE``, ``sni`` = the host) for
  Istio's own route to the host, so anything Istio routes there itself is encrypted too.
* One ``EnvoyFilter`` (SIDECAR_OUTBOUND) does what crdgol's gateway listener does:

  - inserts the ``envoy.filters.http.ext_proc`` filter (crdgol's ExternalProcessor config,
    fail-closed) before the router of the port-80 HTTP connection manager, **disabled by
    default**: the port-80 listener is shared by every HTTP service the pod calls, so the filter
    is enabled only on the provider virtual hosts (``typed_per_filter_config``, matched by
    ``routeConfiguration.vhost.name: "api.openai.com:80"``);
  - adds, first in each provider virtual host, one route per binding that matches the
    ``x-crdgol-route`` header extproc sets (the same routes as the gateway: priority groups,
    retries, fallback across providers). Only those virtual hosts get the routes: elsewhere no
    ext_proc strips a client-supplied ``x-crdgol-route``;
  - adds the clusters: crdgol's extproc service and one cluster per backend, each with the
    *upstream* ext_proc filter that rewrites the model, swaps the caller's crdgol key for the
    provider credential and translates between the OpenAI and Anthropic APIs. These backend
    clusters originate TLS themselves (SNI and SAN checked against the system CA bundle, which
    the istio-proxy image carries), exactly as in the standalone gateway.

Bindings are included when at least one backend has an https endpoint (a public provider);
all of such a binding's backends get clusters, since fallback may cross to any of them.

Limits, stated so nobody is surprised: the gateway's OpenAI-shaped local replies for Envoy's own
errors (413/502/503/504) are not patched into the shared connection manager; the extproc
cluster added here speaks plaintext h2 to the extproc Service (set ``extproc_cluster`` to
Istio's ``outbound|9002||crdgol-extproc.crdgol-system.svc.cluster.local`` to get mesh mTLS
instead, with the Service port named ``grpc``); in-cluster http backends of an included binding
are reached directly (their cluster is crdgol's, not Istio's).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from controller import envoy_config
from controller.envoy_config import (
    CA_BUNDLE,
    EXTPROC_CLUSTER,
    RenderSettings,
    backend_cluster,
    binding_route,
    binding_stamp,
    grpc_cluster,
    socket_address,
    typed,
)
from controller.models import BindingSpec, SecretData
from controller.render import render

Json = dict[str, Any]

EXT_PROC = "envoy.filters.http.ext_proc"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
MANAGED_BY = {"app.kubernetes.io/managed-by": "crdgol"}


@dataclass(frozen=True, slots=True)
class MeshSettings:
    # Where the manifests go. The Istio root namespace makes the EnvoyFilter mesh-wide;
    # any other namespace scopes it to that namespace's workloads.
    namespace: str = "istio-system"
    name: str = "crdgol-mesh"
    # Only sidecars whose pod labels match (empty = every sidecar in scope).
    workload_labels: tuple[tuple[str, str], ...] = ()
    # The crdgol extproc Service the sidecars call.
    extproc_host: str = "crdgol-extproc.crdgol-system.svc.cluster.local"
    extproc_port: int = 9002
    # Use an existing cluster (e.g. Istio's outbound|9002||<host>) instead of adding one.
    extproc_cluster: str = ""
    # The plaintext port the applications call; the sidecar originates TLS to the provider.
    http_port: int = 80
    extproc_timeout_ms: int = 2000
    max_request_bytes: int = 4 * 1024 * 1024
    ca_bundle: str = CA_BUNDLE
    # Extra labels on every manifest.
    labels: tuple[tuple[str, str], ...] = ()

    def render_settings(self) -> RenderSettings:
        return RenderSettings(
            extproc_timeout_ms=self.extproc_timeout_ms,
            max_request_bytes=self.max_request_bytes,
            ca_bundle=self.ca_bundle,
        )

    @property
    def cluster(self) -> str:
        return self.extproc_cluster or EXTPROC_CLUSTER


def provider_hosts(bindings: Iterable[BindingSpec]) -> dict[str, int]:
    """Every https backend host -> its TLS port, sorted by host."""
    hosts: dict[str, int] = {}
    for b in bindings:
        for be in b.backends:
            if be.endpoint.tls:
                hosts.setdefault(be.endpoint.host, be.endpoint.port)
    return dict(sorted(hosts.items()))


def vhost_name(host: str, settings: MeshSettings) -> str:
    """The name Istio gives the sidecar's outbound virtual host for a ServiceEntry host."""
    return f"{host}:{settings.http_port}"


def _meta(name: str, settings: MeshSettings) -> Json:
    return {"name": name, "namespace": settings.namespace, "labels": {**MANAGED_BY, **dict(settings.labels)}}


def _slug(host: str) -> str:
    return host.replace(".", "-").lower()


def _retarget(value: Json, cluster: str) -> Json:
    """Point every ext_proc gRPC service in ``value`` at ``cluster`` (a deep copy)."""
    out = copy.deepcopy(value)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            grpc = node.get("envoy_grpc")
            if isinstance(grpc, dict) and grpc.get("cluster_name") == EXTPROC_CLUSTER:
                grpc["cluster_name"] = cluster
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


def _extproc_cluster(settings: MeshSettings) -> Json:
    return grpc_cluster(EXTPROC_CLUSTER, [socket_address(settings.extproc_host, settings.extproc_port)], dns=True)


def ext_proc_filter(settings: MeshSettings) -> Json:
    """The downstream ext_proc filter, disabled unless a provider virtual host enables it."""
    f = _retarget(envoy_config.ext_proc_filter(settings.render_settings(), backend=None), settings.cluster)
    return {"name": f["name"], "disabled": True, "typed_config": f["typed_config"]}


def _vhost_patch(settings: MeshSettings) -> Json:
    return {
        "request_body_buffer_limit": settings.max_request_bytes,
        "typed_per_filter_config": {
            EXT_PROC: typed("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", overrides={}),
        },
    }


def _envoy_filter(bindings: list[BindingSpec], hosts: list[str], settings: MeshSettings) -> Json:
    rs = settings.render_settings()
    outbound = "SIDECAR_OUTBOUND"
    patches: list[Json] = []
    if not settings.extproc_cluster:
        patches.append(
            {"applyTo": "CLUSTER", "match": {"context": outbound}, "patch": {"operation": "ADD", "value": _extproc_cluster(settings)}}
        )
    for b in bindings:
        stamp = binding_stamp(b)
        for be in b.backends:
            cluster = _retarget(backend_cluster(b, be, rs, stamp), settings.cluster)
            patches.append({"applyTo": "CLUSTER", "match": {"context": outbound}, "patch": {"operation": "ADD", "value": cluster}})
    patches.append(
        {
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": outbound,
                "listener": {
                    "portNumber": settings.http_port,
                    "filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}},
                },
            },
            "patch": {"operation": "INSERT_BEFORE", "value": ext_proc_filter(settings)},
        }
    )
    for host in hosts:
        match = {
            "context": outbound,
            "routeConfiguration": {"portNumber": settings.http_port, "vhost": {"name": vhost_name(host, settings)}},
        }
        patches.append({"applyTo": "VIRTUAL_HOST", "match": match, "patch": {"operation": "MERGE", "value": _vhost_patch(settings)}})
        # INSERT_FIRST puts each route before Istio's default one; header matches are exclusive,
        # so their relative order does not matter.
        for b in bindings:
            patches.append({"applyTo": "HTTP_ROUTE", "match": match, "patch": {"operation": "INSERT_FIRST", "value": binding_route(b, binding_stamp(b))}})
    spec: Json = {"configPatches": patches}
    if settings.workload_labels:
        spec = {"workloadSelector": {"labels": dict(settings.workload_labels)}, **spec}
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": _meta(settings.name, settings),
        "spec": spec,
    }


def _service_entry(host: str, port: int, settings: MeshSettings) -> Json:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "ServiceEntry",
        "metadata": _meta(f"crdgol-{_slug(host)}", settings),
        "spec": {
            "hosts": [host],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": settings.http_port, "name": "http-crdgol", "protocol": "HTTP", "targetPort": port}],
        },
    }


def _destination_rule(host: str, settings: MeshSettings) -> Json:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": _meta(f"crdgol-{_slug(host)}", settings),
        "spec": {
            "host": host,
            # The only port is the plaintext one the applications call: originate TLS on it.
            "trafficPolicy": {"tls": {"mode": "SIMPLE", "sni": host}},
        },
    }


def render_mesh(bindings: Iterable[BindingSpec], secrets: Iterable[SecretData], settings: MeshSettings) -> list[Json]:
    """ServiceEntry + DestinationRule per provider host, then one EnvoyFilter; [] if no provider.

    Only bindings the gateway render accepts are included (the same model-conflict and
    missing-Secret rules, so routes and backend clusters agree with the policy snapshot extproc
    serves). ``secrets`` is read for that check only; no secret value reaches the output.
    """
    specs = list(bindings)
    accepted = set(render(specs, secrets, settings.render_settings()).accepted)
    chosen = sorted(
        (b for b in specs if b.key in accepted and any(be.endpoint.tls for be in b.backends)), key=lambda b: b.key
    )
    hosts = provider_hosts(chosen)
    if not hosts:
        return []
    docs: list[Json] = []
    for host, port in hosts.items():
        docs.append(_service_entry(host, port, settings))
        docs.append(_destination_rule(host, settings))
    docs.append(_envoy_filter(chosen, list(hosts), settings))
    return docs


def to_yaml(docs: list[Json]) -> str:
    """The manifests as one multi-document YAML stream (deterministic: sorted keys)."""
    return str(yaml.safe_dump_all(docs, sort_keys=True, default_flow_style=False, width=120))
