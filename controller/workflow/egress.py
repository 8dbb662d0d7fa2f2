"""Envoy resources for workflows: the egress listener for http-request steps and the run API route.

Pure functions of the accepted workflows and ``WorkflowEnvoySettings``. The egress listener has a
virtual host per target (scheme, host, port) any WorkflowSpec names, with one route per step that
calls it (matched on ``STEP_HEADER``: the step's timeout and transport retries live there) and a
403 for anything else; a host no spec names falls to a default virtual host that answers 403. So it
is not an open proxy: only the hosts written in accepted specs are reachable through it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.envoy_config import (
    CA_BUNDLE,
    Json,
    duration,
    is_ip,
    socket_address,
    typed,
)
from controller.workflow.accept import CompiledWorkflow
from crdgol.request_path import ROUTE_HEADER
from crdgol.workflow_contract import API_TOKEN_HEADER, ROUTE, STEP_HEADER

EGRESS_LISTENER = "crdgol-egress"
API_CLUSTER = "crdgol-workflows"


@dataclass(frozen=True, slots=True)
class WorkflowEnvoySettings:
    egress_host: str = "127.0.0.1"
    egress_port: int = 0  # 0: no egress listener
    # Where Envoy reaches the controller's run API: a Unix socket, or host and port.
    api_socket: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 0
    # On a cluster (TCP): the token the route adds and the run API requires (see ``api``).
    api_token: str = field(default="", repr=False)
    ca_bundle: str = CA_BUNDLE
    default_timeout: float = 30.0


def _json_403(message: str) -> Json:
    body = json.dumps({"error": {"message": message, "type": "permission_error", "code": "egress_not_allowed"}})
    return {"status": 403, "body": {"inline_string": body}}


_JSON_TYPE = [{"header": {"key": "content-type", "value": "application/json"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]


# Envoy's default circuit breakers allow 1,024 requests in flight per cluster; a thousand runs
# calling one helpdesk at once would trip them, so the engine's own clusters allow more.
_BREAKERS = {"thresholds": [{"max_connections": 100_000, "max_pending_requests": 100_000, "max_requests": 100_000}]}


def target_cluster(scheme: str, host: str, port: int) -> str:
    return f"crdgol-egress.{scheme}.{host}.{port}"


def step_key(wf: CompiledWorkflow, step: str) -> str:
    return f"{wf.spec.namespace}/{wf.spec.name}/{step}"


def egress_resources(workflows: Iterable[CompiledWorkflow], settings: WorkflowEnvoySettings) -> tuple[list[Json], list[Json]]:
    """(listeners, clusters) of the egress listener; none when it is switched off or no accepted
    spec has an http-request step."""
    if not settings.egress_port:
        return [], []
    routes: dict[tuple[str, str, int], list[Json]] = {}
    for wf in sorted(workflows, key=lambda w: w.key):
        for c in wf.all_steps():
            h = c.spec.http_request
            if h is None:
                continue
            origin = h.origin
            route: Json = {
                "cluster": target_cluster(*origin),
                "timeout": duration(c.spec.timeout or settings.default_timeout),
            }
            if c.spec.retry.limit:
                # Only what is safe to repeat at the transport level; the engine retries the rest
                # (with backoff, honouring Retry-After).
                route["retry_policy"] = {"retry_on": "connect-failure,reset", "num_retries": c.spec.retry.limit}
            routes.setdefault(origin, []).append(
                {
                    "name": step_key(wf, c.spec.name),
                    "match": {"prefix": "/", "headers": [{"name": STEP_HEADER, "string_match": {"exact": step_key(wf, c.spec.name)}}]},
                    "route": route,
                    "request_headers_to_remove": [STEP_HEADER],
                }
            )
    if not routes:
        return [], []  # no spec names a host: no listener, no port open
    vhosts: list[Json] = []
    clusters: list[Json] = []
    for (scheme, host, port), rs in sorted(routes.items()):
        default = 443 if scheme == "https" else 80
        domains = [f"{host}:{port}"] + ([host] if port == default else [])
        vhosts.append(
            {
                "name": target_cluster(scheme, host, port),
                "domains": domains,
                "routes": [*rs, {"name": "unknown-step", "match": {"prefix": "/"}, "direct_response": _json_403("no WorkflowSpec step calls this host with this request"), "response_headers_to_add": _JSON_TYPE}],
            }
        )
        clusters.append(_cluster(scheme, host, port, settings))
    vhosts.append(
        {
            "name": "not-allowed",
            "domains": ["*"],
            "routes": [{"name": "not-allowed", "match": {"prefix": "/"}, "direct_response": _json_403("egress to this host is not allowed: no WorkflowSpec names it"), "response_headers_to_add": _JSON_TYPE}],
        }
    )
    hcm = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="crdgol_egress",
        codec_type="AUTO",
        route_config={"name": EGRESS_LISTENER, "virtual_hosts": vhosts},
        http_filters=[{"name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router")}],
    )
    listener = {
        "name": EGRESS_LISTENER,
        "address": socket_address(settings.egress_host, settings.egress_port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }
    return [listener], clusters


def _cluster(scheme: str, host: str, port: int, settings: WorkflowEnvoySettings) -> Json:
    name = target_cluster(scheme, host, port)
    bare = host.strip("[]")
    cluster: Json = {
        "name": name,
        "type": "STATIC" if is_ip(bare) else "STRICT_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "circuit_breakers": _BREAKERS,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(bare, port)}}]}]},
    }
    if scheme == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=bare,
                common_tls_context={
                    "validation_context": {
                        "trusted_ca": {"filename": settings.ca_bundle},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": bare}}],
                    }
                },
            ),
        }
    return cluster


def api_route_and_cluster(settings: WorkflowEnvoySettings) -> tuple[list[Json], list[Json]]:
    """The gateway listener's route to the run API (after extproc authenticated the caller)."""
    if not settings.api_socket and not settings.api_port:
        return [], []
    address = {"pipe": {"path": settings.api_socket}} if settings.api_socket else socket_address(settings.api_host, settings.api_port)
    route: Json = {
        "name": "crdgol-workflow-api",
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": ROUTE}}]},
        "route": {"cluster": API_CLUSTER, "timeout": "30s"},
    }
    if settings.api_token:
        route["request_headers_to_add"] = [
            {"header": {"key": API_TOKEN_HEADER, "value": settings.api_token}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ]
    cluster = {
        "name": API_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": _BREAKERS,
        "load_assignment": {"cluster_name": API_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }
    if not settings.api_socket and not is_ip(settings.api_host):  # a Service name on a cluster
        cluster.update(type="STRICT_DNS", dns_lookup_family="V4_PREFERRED")
    return [route], [cluster]
