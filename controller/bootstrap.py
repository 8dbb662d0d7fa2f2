"""Envoy's bootstrap in the ADS setups: the little it holds before the controller serves it the
rest (its admin address, the extproc cluster, the xDS cluster, plain or with mutual TLS from SDS
files), built from the same ``RenderSettings`` as the resources it will receive
(``controller.envoy_config``)."""

from __future__ import annotations

from controller.envoy_config import (
    INTERNAL_LISTENER_EXTENSION,
    Json,
    RenderSettings,
    extproc_cluster,
    grpc_cluster,
    is_ip,
    overload_manager,
    socket_address,
    typed,
)

XDS_CLUSTER = "crdgol-xds"


def admin_address(settings: RenderSettings) -> Json:
    """Where Envoy's admin API listens: its Unix socket (owner only) if set, else loopback TCP."""
    if settings.admin_socket:
        return {"pipe": {"path": settings.admin_socket, "mode": 0o600}}
    return socket_address("127.0.0.1", settings.admin_port)


def ads_bootstrap(
    settings: RenderSettings,
    xds_host: str,
    xds_port: int,
    node_id: str = "crdgol-gateway",
    *,
    xds_socket: str = "",
    xds_tls: Json | None = None,
) -> Json:
    """An Envoy bootstrap that takes listeners and clusters from the controller's ADS server
    (at ``xds_host:xds_port``, or on the Unix socket ``xds_socket`` when it is given; over mutual
    TLS when ``xds_tls`` is a transport socket from ``xds_client_tls``)."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    xds_address = {"pipe": {"path": xds_socket}} if xds_socket else socket_address(xds_host, xds_port)
    xds = grpc_cluster(XDS_CLUSTER, [xds_address], dns=not xds_socket and not is_ip(xds_host))
    if xds_tls is not None:
        xds["transport_socket"] = xds_tls
    return {
        "node": {"id": node_id, "cluster": "crdgol"},
        "admin": {"address": admin_address(settings)},
        "overload_manager": overload_manager(settings.max_connections),
        # MCPServer views are internal listeners (controller.mcp_render), served over LDS.
        "bootstrap_extensions": [INTERNAL_LISTENER_EXTENSION],
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [
                # extproc sits beside Envoy (a sidecar, or the same host): static, never sent over CDS.
                extproc_cluster(settings),
                xds,
            ]
        },
    }


XDS_CERTIFICATE = "crdgol-gateway-certificate"
XDS_CA = "crdgol-control-plane-ca"
_TLS_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def xds_client_tls(tls_dir: str, sds_dir: str, server_name: str) -> tuple[Json, dict[str, Json]]:
    """Envoy's side of the control plane's mutual TLS, following certificate rotation.

    Envoy presents ``tls_dir``/tls.crt and tls.key and accepts only a controller whose certificate
    chains to ``tls_dir``/ca.crt and names ``server_name``. The files come through file-based SDS
    watching ``tls_dir`` (a Kubernetes Secret volume swaps its ``..data`` link on rotation), so a
    renewed certificate is used from the next connection on, without a restart. Returns the
    transport socket and the SDS files (name -> content) to write into ``sds_dir``.
    """

    def sds(name: str) -> Json:
        return {"resource_api_version": "V3", "path_config_source": {"path": f"{sds_dir}/{name}"}}

    watched = {"path": tls_dir}
    files = {
        "sds-certificate.yaml": {
            "resources": [
                {
                    "@type": _TLS_SECRET,
                    "name": XDS_CERTIFICATE,
                    "tls_certificate": {
                        "certificate_chain": {"filename": f"{tls_dir}/tls.crt"},
                        "private_key": {"filename": f"{tls_dir}/tls.key"},
                        "watched_directory": watched,
                    },
                }
            ]
        },
        "sds-ca.yaml": {
            "resources": [
                {
                    "@type": _TLS_SECRET,
                    "name": XDS_CA,
                    "validation_context": {"trusted_ca": {"filename": f"{tls_dir}/ca.crt"}, "watched_directory": watched},
                }
            ]
        },
    }
    socket = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            sni=server_name,
            common_tls_context={
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [{"name": XDS_CERTIFICATE, "sds_config": sds("sds-certificate.yaml")}],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": server_name}}],
                    },
                    "validation_context_sds_secret_config": {"name": XDS_CA, "sds_config": sds("sds-ca.yaml")},
                },
            },
        ),
    }
    return socket, files
