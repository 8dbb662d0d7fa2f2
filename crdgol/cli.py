"""The one CLI, ``crdgol``: up, render, extproc, controller, certs, mock-llm.

Settings are built here, at the entry point, from flags (and the environment variables each flag
names); nothing below reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crdgol import __version__, logs

if TYPE_CHECKING:
    from controller.workflow.retention import RunLimits
    from crdgol.control_plane import TlsFiles
    from crdgol.tracing import TracingSettings


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _tracing(args: argparse.Namespace, service: str) -> TracingSettings:
    """Tracing settings from ``--otlp-endpoint`` and the ``OTEL_*`` variables; exits on a bad one."""
    from crdgol.tracing import TracingError, settings_from

    try:
        return settings_from(os.environ, str(args.otlp_endpoint), service)
    except TracingError as exc:
        raise SystemExit(f"crdgol: tracing: {exc}") from None


def _run_async(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_render(args: argparse.Namespace) -> int:
    from controller.manifests import load_folder
    from controller.render import RenderSettings, render

    manifests = load_folder(Path(args.manifests))
    if args.mesh:
        from controller.mesh import MeshSettings, render_mesh, to_yaml

        for where, problem in manifests.problems.items():
            print(f"crdgol render: {where}: {problem.reason}: {problem.message}", file=sys.stderr)
        sys.stdout.write(to_yaml(render_mesh(manifests.bindings, manifests.secrets, MeshSettings(namespace=args.mesh_namespace))))
        return 1 if args.strict and manifests.problems else 0
    sds_dir = Path(args.secrets_dir).resolve()
    result = render(
        manifests.bindings,
        manifests.secrets,
        RenderSettings(
            listen_port=args.port,
            extproc_port=args.extproc_port,
            admin_port=args.admin_port,
            tracing=_tracing(args, "crdgol-controller"),
            sds_dir=str(sds_dir),
            native_path=args.native_path,
        ),
        mcp_servers=manifests.mcp_servers,
    )
    write_sds_files(sds_dir, result.secrets)
    for where, problem in {**manifests.problems, **result.problems, **{f"MCPServer {k}": v for k, v in result.mcp.problems.items()}}.items():
        print(f"crdgol render: {where}: {problem.reason}: {problem.message}", file=sys.stderr)
    for where, message in result.source_problems.items():
        print(f"crdgol render: {where}: {message}", file=sys.stderr)
    fmt = args.output
    if fmt == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(result.envoy, sort_keys=True))
    else:
        sys.stdout.write(json.dumps(result.envoy, indent=2, sort_keys=True) + "\n")
    return 1 if args.strict and (manifests.problems or result.problems or result.source_problems) else 0


def write_sds_files(folder: Path, secrets: tuple[dict[str, object], ...]) -> None:
    """The provider credentials a static config injects, as SDS files only the owner can read."""
    if not secrets:
        return
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    for secret in secrets:
        path = folder / f"{secret['name']}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"resources": [secret]}, f)
        path.chmod(0o600)
    print(f"crdgol render: {len(secrets)} provider credential(s) written to {folder} (mode 0600)", file=sys.stderr)


def build_services(redis_url: str, redis_timeout: float) -> object:
    """extproc's shared parts: in memory by default, in Redis when a URL is given."""
    from extproc.services import Services

    if not redis_url:
        return Services()
    from extproc.cache import ResponseCache
    from extproc.mcp_sessions import McpSessions, RedisSessionRegistry
    from extproc.quota_store import RedisQuotaStore
    from extproc.redis_client import RedisClient
    from extproc.redis_history import RedisHistoryStore

    # One pipelined connection, replaced on the next call if it drops (a restarted Redis costs
    # the calls in flight, not the ones after).
    client = RedisClient.from_url(redis_url, connect_timeout=redis_timeout)
    return Services(
        quotas=RedisQuotaStore(client, timeout=redis_timeout),
        history=RedisHistoryStore(client, timeout=redis_timeout),
        cache=ResponseCache.in_redis(client, redis_timeout),
        mcp_sessions=McpSessions(RedisSessionRegistry(client, timeout=redis_timeout)),
    )


def _tls_files(what: str, cert: str, key: str, ca: str) -> TlsFiles | None:
    """TlsFiles from three flags given together, or None when none is given."""
    from crdgol.control_plane import TlsFiles

    given = [bool(cert), bool(key), bool(ca)]
    if not any(given):
        return None
    if not all(given):
        raise SystemExit(f"crdgol: {what} needs all three of its certificate, key and CA files")
    return TlsFiles(cert=Path(cert), key=Path(key), ca=Path(ca))


def cmd_extproc(args: argparse.Namespace) -> int:
    # One BLAS thread for the semantic cache's vector scans (numpy reads this when first
    # imported): a scan is small, and on a busy host a second BLAS thread that is not scheduled
    # turns a 0.1 ms scan into milliseconds. Set here, at the entry point, before any import.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from crdgol.control_plane import ClientAuth, InsecureControlPlane, require_secure_client
    from extproc.capacity import Capacity, CapacitySettings
    from extproc.server import ServerSettings, serve
    from extproc.services import Services

    tls = _tls_files("--policy-tls-*", args.policy_tls_cert, args.policy_tls_key, args.policy_tls_ca)
    policy_auth = ClientAuth(tls=tls, server_name=args.policy_tls_server_name)
    if args.policy_server:
        try:
            require_secure_client(args.policy_server, policy_auth)
        except InsecureControlPlane as exc:
            print(f"crdgol extproc: {exc}", file=sys.stderr)
            return 2
    if args.port == 0 and not args.socket:
        print("crdgol extproc: --port 0 (no TCP listener) needs --socket", file=sys.stderr)
        return 2
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        grace=args.grace,
        policy_file=Path(args.policy) if args.policy else None,
        policy_server=args.policy_server,
        policy_auth=policy_auth,
        socket=args.socket,
        report_interval=args.report_interval,
        envoy_admin=args.envoy_admin,
    )
    capacity = CapacitySettings(max_streams=args.max_streams, max_body_bytes=args.max_body_mib * 1024 * 1024, shed_lag=args.shed_lag_ms / 1000)
    tracing = _tracing(args, "crdgol-extproc")
    tracer, shutdown = None, None
    if tracing.enabled:  # the SDK is loaded only on this path
        from crdgol import tracing as otel
        from extproc.tracing import CallTracer

        sdk_tracer, shutdown = otel.start(tracing)
        tracer = CallTracer(sdk_tracer)

    async def main() -> None:
        services = build_services(args.redis_url, args.redis_timeout)
        assert isinstance(services, Services)
        services.capacity = Capacity(capacity)
        services.tracer = tracer
        await serve(settings, services)

    try:
        _run_async(main())
    finally:
        if shutdown is not None:
            shutdown()  # flushes the spans still batched
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.app import ControllerSettings, serve_file_mode
    from controller.render import RenderSettings
    from crdgol.control_plane import InsecureControlPlane, ServerAuth, require_secure_server

    controller_gc()
    _raise_fd_limit()
    tls = _tls_files("--tls-*", args.tls_cert, args.tls_key, args.tls_client_ca)
    auth = ServerAuth(tls=tls, client_names=tuple(args.tls_client_name))
    tcp = [f"{args.host}:{port}" for port, sock in ((args.xds_port, args.xds_socket), (args.policy_port, args.policy_socket)) if not sock]
    try:
        require_secure_server(auth, tcp)
    except InsecureControlPlane as exc:
        print(f"crdgol controller: {exc}", file=sys.stderr)
        return 2

    render = RenderSettings(
        listen_host=args.gateway_host,
        listen_port=args.gateway_port,
        extproc_host=args.extproc_host,
        extproc_ports=tuple(int(p) for p in str(args.extproc_port).split(",")),
        extproc_sockets=tuple(p for p in str(args.extproc_socket).split(",") if p),
        admin_port=args.admin_port,
        access_log="" if args.access_log == "off" else args.access_log,
        admin_socket=args.admin_socket,
        tracing=_tracing(args, "crdgol-controller"),
        native_path=args.native_path,
    )
    workflows = None
    if args.manifests:
        from controller.workflow.egress import WorkflowEnvoySettings
        from controller.workflow.host import WorkflowSettings

        gateway_host = "127.0.0.1" if args.gateway_host in ("0.0.0.0", "::") else args.gateway_host
        workflows = WorkflowSettings(
            state_dir=Path(args.workflow_state),
            gateway_url=f"http://{gateway_host}:{args.gateway_port}",
            envoy=WorkflowEnvoySettings(egress_port=args.egress_port, api_socket=args.workflow_socket),
            limits=_run_limits(args),
        )
    settings = ControllerSettings(
        workflows=workflows,
        render=render,
        host=args.host,
        xds_port=args.xds_port,
        policy_port=args.policy_port,
        xds_socket=args.xds_socket,
        policy_socket=args.policy_socket,
        auth=auth,
        metrics_port=args.metrics_port,
        manifests=Path(args.manifests) if args.manifests else None,
        status_file=Path(args.status_file) if args.status_file else None,
        usage_window=args.usage_window,
        usage_interval=args.usage_interval,
    )
    if settings.manifests is not None:
        _run_async(serve_file_mode(settings))
        return 0
    kubeconfig = [Path(p) for p in os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")).split(os.pathsep) if p]
    if not os.environ.get("KUBERNETES_SERVICE_HOST") and not any(p.is_file() for p in kubeconfig):
        print(
            "crdgol controller: no Kubernetes cluster to watch (not in a pod, and no kubeconfig at "
            f"{os.pathsep.join(map(str, kubeconfig))}). Set KUBECONFIG, or run without a cluster: "
            "crdgol controller --manifests DIR",
            file=sys.stderr,
        )
        return 2
    from controller.operator import run_operator

    cluster_workflows = None
    if args.workflow_gateway:
        from controller.workflow.cluster import ClusterWorkflowSettings
        from controller.workflow.egress import WorkflowEnvoySettings

        api_host, api_port = _api_address(args.workflow_api_address, args.workflow_api_port)
        cluster_workflows = ClusterWorkflowSettings(
            gateway_url=args.workflow_gateway,
            egress_url=args.workflow_egress,
            egress=WorkflowEnvoySettings(egress_host=args.egress_host, egress_port=args.egress_port, api_host=api_host, api_port=api_port),
            api_listen_port=args.workflow_api_port,
            limits=_run_limits(args),
        )
    return int(run_operator(settings, namespaces=args.namespace, peering=args.peering, workflows=cluster_workflows))


def controller_gc() -> None:
    """The controller's garbage-collector settings (``benchmarks/controller.py`` measures with them).

    The workflow engine makes many short-lived objects per step: CPython's default gen-0
    threshold (700 allocations) collected every few steps, and full passes over 1,000 live runs
    stalled the loop 50-200 ms. Fewer, larger collections cut the controller's CPU per step ~10%
    in benchmarks/workflows.py (RESULTS.md), and a render of 5,000 bindings ~20% (2.5-2.9 s with
    the defaults, 2.0-2.2 s with these); objects loaded at start-up are not rescanned."""
    gc.set_threshold(50_000, 50, 100)
    gc.freeze()


def _raise_fd_limit() -> None:
    """The soft limit on open files up to the hard one (at most 65,536), as Go programs do: the
    workflow engine keeps each live run's journal open (``RunStore``), and distributions often
    start processes at a soft 1,024."""
    import contextlib
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # keep the limit we were given
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _run_limits(args: argparse.Namespace) -> RunLimits:
    """``--workflow-max-active-runs``, ``--workflow-run-ttl``, ``--workflow-keep-finished-runs``."""
    from controller.spec_parsing import parse_duration
    from controller.workflow.retention import RunLimits

    try:
        ttl = parse_duration(args.workflow_run_ttl, "--workflow-run-ttl")
    except ValueError as exc:  # SpecError: says which flag and why
        raise SystemExit(getattr(exc, "message", str(exc))) from None
    if args.workflow_max_active_runs < 1 or args.workflow_keep_finished_runs < 0:
        raise SystemExit("--workflow-max-active-runs must be at least 1 and --workflow-keep-finished-runs at least 0")
    return RunLimits(max_active_per_tenant=args.workflow_max_active_runs, finished_ttl=ttl, keep_finished=args.workflow_keep_finished_runs)


def _api_address(address: str, listen_port: int) -> tuple[str, int]:
    """``--workflow-api-address``: where Envoy reaches the run API (empty: loopback, its port)."""
    if not address:
        return "127.0.0.1", listen_port
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--workflow-api-address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def cmd_mock(args: argparse.Namespace) -> int:
    from mockllm.server import main as mock_main

    return mock_main(args.mock_args)


def cmd_certs(args: argparse.Namespace) -> int:
    from crdgol import devcerts

    issued = devcerts.issue(days=args.days)
    if not args.out:
        sys.stdout.write(devcerts.secrets_yaml(issued, args.namespace))
        return 0
    out = Path(args.out)
    devcerts.write(out / "controller", issued.server, issued.ca)
    devcerts.write(out / "gateway", issued.client, issued.ca)
    print(f"crdgol certs: wrote {out}/controller and {out}/gateway (tls.crt, tls.key, ca.crt)", file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from crdgol.up import UpSettings, up

    settings = UpSettings(
        manifests=Path(args.manifests),
        host=args.host,
        port=args.port,
        mock_port=None if args.no_mock else args.mock_port,
        metrics_port=args.metrics_port,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        envoy_log_level=args.envoy_log_level,
        redis_url=args.redis_url,
        extproc_replicas=args.extproc_replicas,
        access_log=args.access_log,
        native_path=args.native_path,
    )
    return up(settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crdgol",
        description="crdgol: a Kubernetes-native AI gateway (Envoy + ext_proc + controller).",
        epilog="Quick start: `crdgol up --manifests examples/quickstart`, then call http://127.0.0.1:8080/v1 "
        "with the key sk-crdgol-quickstart and the model quickstart-chat.",
    )
    p.add_argument("--version", action="version", version=f"crdgol {__version__}")
    p.add_argument("--log-level", default=_env("CRDGOL_LOG_LEVEL", "info"), help="debug|info|warning (env CRDGOL_LOG_LEVEL)")
    p.add_argument("--log-format", default=_env("CRDGOL_LOG_FORMAT", "text"), help="text|json: json writes one object per line (env CRDGOL_LOG_FORMAT; `up` passes it to its children)")
    p.add_argument(
        "--otlp-endpoint",
        default="",
        help="send OpenTelemetry traces to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (default: the standard "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set or OTEL_TRACES_EXPORTER=none; "
        "OTEL_SERVICE_NAME names the process; `up` passes it to its children)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the standalone gateway (Envoy + extproc + mock upstream) from a folder of manifests")
    up.add_argument("--manifests", required=True, help="folder of AIModelBinding and Secret manifests")
    up.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=int(_env("CRDGOL_PORT", "8080")), help="gateway port (default 8080, env CRDGOL_PORT)")
    up.add_argument("--mock-port", type=int, default=8081, help="port of the bundled mock LLM upstream (default 8081)")
    up.add_argument("--no-mock", action="store_true", help="do not start the bundled mock upstream")
    up.add_argument("--metrics-port", type=int, default=9102, help="extproc's Prometheus /metrics port (default 9102; 0 = off)")
    up.add_argument("--state-dir", default=None, help="where rendered config is written (default: a temporary folder)")
    up.add_argument("--redis-url", default=_env("CRDGOL_REDIS_URL", ""), help="share quotas and history through this Redis (env CRDGOL_REDIS_URL; default: in memory)")
    up.add_argument("--extproc-replicas", type=int, default=1, help="extproc processes Envoy spreads requests across (default 1; more than 1 needs --redis-url)")
    up.add_argument("--envoy-log-level", default="warning", help="Envoy's log level (default warning)")
    up.add_argument("--native-path", action=argparse.BooleanOptionalAction, default=True, help="Envoy decides model calls to bindings that need no extproc decision (API key, tenant, routing, usage; no quotas, context or cache) alone, with no ext_proc message (default on; --no-native-path sends every call to extproc)")
    up.add_argument("--access-log", default=_env("CRDGOL_ACCESS_LOG", "-"), help="the gateway's JSON access log, one line per request: - = stdout (default), a file path, or off (env CRDGOL_ACCESS_LOG)")
    up.set_defaults(func=cmd_up)

    render = sub.add_parser("render", help="print the complete static Envoy config for a folder of manifests")
    render.add_argument("--manifests", required=True, help="folder of manifests")
    render.add_argument("--port", type=int, default=8080, help="gateway listener port in the rendered config")
    render.add_argument("--extproc-port", type=int, default=9002, help="extproc gRPC port in the rendered config")
    render.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port in the rendered config")
    render.add_argument("--output", choices=("json", "yaml"), default="json", help="output format (default json)")
    render.add_argument("--secrets-dir", default="crdgol-sds", help="where the provider credentials Envoy injects are written as SDS files, mode 0600 (default ./crdgol-sds); the config only names them")
    render.add_argument("--native-path", action=argparse.BooleanOptionalAction, default=True, help="Envoy decides model calls to bindings that need no extproc decision (API key, tenant, routing, usage; no quotas, context or cache) alone, with no ext_proc message (default on; --no-native-path sends every call to extproc)")
    render.add_argument("--strict", action="store_true", help="exit 1 if any manifest is refused")
    render.add_argument("--mesh", action="store_true", help="print Istio manifests (EnvoyFilter, ServiceEntry, DestinationRule) that make every sidecar apply crdgol to provider hosts")
    render.add_argument("--mesh-namespace", default="istio-system", help="namespace of the mesh manifests (default istio-system: mesh-wide)")
    render.set_defaults(func=cmd_render)

    ext = sub.add_parser("extproc", help="run the ext_proc gRPC service Envoy calls for every request")
    ext.add_argument("--host", default=_env("CRDGOL_EXTPROC_HOST", "127.0.0.1"), help="listen address (env CRDGOL_EXTPROC_HOST)")
    ext.add_argument("--port", type=int, default=int(_env("CRDGOL_EXTPROC_PORT", "9002")), help="gRPC port (default 9002, env CRDGOL_EXTPROC_PORT)")
    ext.add_argument("--metrics-port", type=int, default=int(_env("CRDGOL_METRICS_PORT", "9102")), help="Prometheus port (default 9102; 0 = off)")
    ext.add_argument("--policy", default=_env("CRDGOL_POLICY_FILE", ""), help="policy snapshot file (binary PolicySnapshot); SIGHUP reloads it")
    ext.add_argument("--socket", default=_env("CRDGOL_EXTPROC_SOCKET", ""), help="also listen on this Unix domain socket (0600), for an Envoy on the same host; with --port 0, only there (env CRDGOL_EXTPROC_SOCKET)")
    ext.add_argument("--policy-server", default=_env("CRDGOL_POLICY_SERVER", ""), help="controller's policy stream: host:port (needs the --policy-tls-* files) or unix:PATH (env CRDGOL_POLICY_SERVER)")
    ext.add_argument("--policy-tls-cert", default="", help="client certificate (PEM) extproc presents to the policy stream")
    ext.add_argument("--policy-tls-key", default="", help="its private key (PEM)")
    ext.add_argument("--policy-tls-ca", default="", help="CA (PEM) the controller's certificate must chain to")
    ext.add_argument("--policy-tls-server-name", default="", help="name the controller's certificate must carry (default: the --policy-server host)")
    ext.add_argument("--redis-url", default=_env("CRDGOL_REDIS_URL", ""), help="share quotas and session history through Redis, e.g. redis://127.0.0.1:6379/0 (env CRDGOL_REDIS_URL; default: in memory)")
    ext.add_argument("--redis-timeout", type=float, default=0.25, help="seconds one Redis call may take before the fail policy applies (default 0.25)")
    ext.add_argument("--grace", type=float, default=10.0, help="seconds to drain open streams on shutdown (default 10)")
    ext.add_argument("--max-streams", type=int, default=4096, help="gateway requests processed at once; more get 503 gateway_overloaded (default 4096)")
    ext.add_argument("--max-body-mib", type=int, default=64, help="MiB of request and response bodies held at once; a request body beyond gets 503 (default 64)")
    ext.add_argument("--report-interval", type=float, default=float(_env("CRDGOL_REPORT_INTERVAL", "10")), help="seconds between reports of usage and backend health to the controller's policy server, for the bindings' status (default 10; 0 = never; env CRDGOL_REPORT_INTERVAL)")
    ext.add_argument("--envoy-admin", default=_env("CRDGOL_ENVOY_ADMIN", ""), help="Envoy's admin URL beside this extproc (e.g. http://127.0.0.1:9901): its backend health goes into the reports (env CRDGOL_ENVOY_ADMIN)")
    ext.add_argument("--shed-lag-ms", type=float, default=500.0, help="refuse new requests with 503 while the event loop runs this late (default 500 ms)")
    ext.set_defaults(func=cmd_extproc)

    ctl = sub.add_parser("controller", help="run the controller: kopf against a cluster, or --manifests DIR without one")
    ctl.add_argument("--manifests", default=_env("CRDGOL_MANIFESTS", ""), help="file mode: watch this folder instead of a cluster (env CRDGOL_MANIFESTS)")
    ctl.add_argument("--namespace", action="append", default=[], help="watch only this namespace (repeatable; default: all)")
    ctl.add_argument("--peering", default="crdgol", help="kopf peering name: one active controller at a time (default crdgol)")
    ctl.add_argument("--host", default=_env("CRDGOL_CONTROLLER_HOST", "127.0.0.1"), help="listen address for xDS, policy and metrics (env CRDGOL_CONTROLLER_HOST)")
    ctl.add_argument("--xds-port", type=int, default=18000, help="ADS gRPC port Envoy connects to (default 18000; needs the --tls-* files)")
    ctl.add_argument("--policy-port", type=int, default=18001, help="policy stream port extproc subscribes to (default 18001; needs the --tls-* files)")
    ctl.add_argument("--xds-socket", default="", help="serve ADS on this Unix socket (0600) instead of --xds-port")
    ctl.add_argument("--policy-socket", default="", help="serve the policy stream on this Unix socket (0600) instead of --policy-port")
    ctl.add_argument("--tls-cert", default="", help="controller's certificate (PEM) for mutual TLS on the xDS and policy ports; re-read when it changes")
    ctl.add_argument("--tls-key", default="", help="its private key (PEM)")
    ctl.add_argument("--tls-client-ca", default="", help="CA (PEM) that signs the certificates of Envoy and extproc")
    ctl.add_argument("--tls-client-name", action="append", default=[], help="a name (SAN or CN) a client certificate must carry (repeatable; default: any the CA signed)")
    ctl.add_argument("--metrics-port", type=int, default=9103, help="/metrics and /status port (default 9103; 0 = off)")
    ctl.add_argument("--status-file", default="", help="file mode: write resource status here as JSON")
    ctl.add_argument("--gateway-host", default="0.0.0.0", help="address the rendered Envoy listener binds (default 0.0.0.0)")
    ctl.add_argument("--gateway-port", type=int, default=8080, help="port the rendered Envoy listener binds (default 8080)")
    ctl.add_argument("--extproc-host", default="127.0.0.1", help="where Envoy reaches extproc (default 127.0.0.1)")
    ctl.add_argument("--extproc-port", default="9002", help="extproc's gRPC port, or several comma-separated for several replicas (default 9002)")
    ctl.add_argument("--extproc-socket", default="", help="Envoy reaches extproc on these Unix sockets instead (comma-separated), when they share a host")
    ctl.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port in the rendered bootstrap (default 9901)")
    ctl.add_argument("--workflow-state", default=".crdgol/workflows", help="file mode: where each workflow run's state file is kept (default .crdgol/workflows)")
    ctl.add_argument("--workflow-socket", default="", help="file mode: serve the workflow run API on this Unix socket, routed to by Envoy (default: off)")
    ctl.add_argument("--egress-port", type=int, default=0, help="port of Envoy's egress listener for http-request steps (default 0: none)")
    ctl.add_argument("--egress-host", default="127.0.0.1", help="on a cluster: address the egress listener binds in the gateway's Envoy (default 127.0.0.1)")
    ctl.add_argument("--workflow-gateway", default=_env("CRDGOL_WORKFLOW_GATEWAY", ""), help="on a cluster: run WorkflowSpecs and WorkflowRuns, their AI steps calling the gateway listener at this URL, e.g. http://crdgol-gateway.crdgol-system.svc:8080 (env CRDGOL_WORKFLOW_GATEWAY; unset: workflows are not run)")
    ctl.add_argument("--workflow-api-port", type=int, default=int(_env("CRDGOL_WORKFLOW_API_PORT", "0")), help="on a cluster: serve the workflow run API (/v1/workflows/..., routed to by the gateway's Envoy) on this port (env CRDGOL_WORKFLOW_API_PORT; default 0: off)")
    ctl.add_argument("--workflow-api-address", default=_env("CRDGOL_WORKFLOW_API_ADDRESS", ""), help="on a cluster: HOST:PORT where the gateway's Envoy reaches the run API, e.g. crdgol-controller.crdgol-system.svc:8091 (env CRDGOL_WORKFLOW_API_ADDRESS; default 127.0.0.1 and --workflow-api-port)")
    ctl.add_argument("--workflow-max-active-runs", type=int, default=int(_env("CRDGOL_WORKFLOW_MAX_ACTIVE_RUNS", "100")), help="the most workflow runs one tenant may have Pending or Running at once; a start over HTTP beyond it gets a 429 (env CRDGOL_WORKFLOW_MAX_ACTIVE_RUNS; default 100)")
    ctl.add_argument("--workflow-run-ttl", default=_env("CRDGOL_WORKFLOW_RUN_TTL", "24h"), help="a run started over HTTP is deleted this long after it finished, unless its WorkflowSpec sets ttlAfterFinished (env CRDGOL_WORKFLOW_RUN_TTL; default 24h)")
    ctl.add_argument("--workflow-keep-finished-runs", type=int, default=int(_env("CRDGOL_WORKFLOW_KEEP_FINISHED_RUNS", "100")), help="finished runs started over HTTP kept per workflow and tenant, the oldest deleted first, unless the WorkflowSpec sets keepFinishedRuns (env CRDGOL_WORKFLOW_KEEP_FINISHED_RUNS; default 100)")
    ctl.add_argument("--workflow-egress", default=_env("CRDGOL_WORKFLOW_EGRESS", ""), help="on a cluster: URL of the gateway's egress listener, as http-request steps reach it (env CRDGOL_WORKFLOW_EGRESS)")
    ctl.add_argument("--native-path", action=argparse.BooleanOptionalAction, default=True, help="Envoy decides model calls to bindings that need no extproc decision (API key, tenant, routing, usage; no quotas, context or cache) alone, with no ext_proc message (default on; --no-native-path sends every call to extproc)")
    ctl.add_argument("--access-log", default=_env("CRDGOL_ACCESS_LOG", "-"), help="the gateway's JSON access log, one line per request: - = Envoy's stdout (default), a file path, or off (env CRDGOL_ACCESS_LOG)")
    ctl.add_argument("--usage-window", type=float, default=3600.0, help="each binding's status.usage covers this many seconds (default 3600)")
    ctl.add_argument("--usage-interval", type=float, default=float(_env("CRDGOL_USAGE_INTERVAL", "30")), help="refresh each binding's status.usage (from extproc's reports) at most this often, in seconds (default 30, env CRDGOL_USAGE_INTERVAL)")
    ctl.add_argument("--admin-socket", default="", help="Envoy's admin API is on this Unix socket instead (file mode reads backend health there)")
    ctl.set_defaults(func=cmd_controller)

    certs = sub.add_parser("certs", help="issue development certificates for the control plane's mutual TLS (a CA, the controller, the gateway)")
    certs.add_argument("--out", default="", help="write ca.crt and controller/ and gateway/ (tls.crt, tls.key, ca.crt) here instead of printing Secrets")
    certs.add_argument("--namespace", default="crdgol-system", help="namespace of the printed Secrets (default crdgol-system)")
    certs.add_argument("--days", type=int, default=90, help="validity in days (default 90)")
    certs.set_defaults(func=cmd_certs)

    from crdgol import workflow_cli

    workflow_cli.add_parser(sub)

    mock = sub.add_parser("mock-llm", help="run the bundled OpenAI/Anthropic-compatible mock upstream (see `crdgol mock-llm --help`)", add_help=False)
    mock.add_argument("mock_args", nargs=argparse.REMAINDER)
    mock.set_defaults(func=cmd_mock)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock-llm"]:
        # The mock has its own parser and flags: hand it everything after the command name.
        from mockllm.server import main as mock_main

        logs.configure("info", os.environ.get("CRDGOL_LOG_FORMAT", "text"))
        return mock_main([a for a in argv[1:] if a != "--"])
    args = build_parser().parse_args(argv)
    logs.configure(str(args.log_level), str(args.log_format))
    if args.func is cmd_up:
        # The stack's children (controller, extproc, mock) are crdgol commands too: same format.
        os.environ["CRDGOL_LOG_FORMAT"] = str(args.log_format)
        if args.otlp_endpoint:  # checked here, then given to the children the standard way
            os.environ.update(_tracing(args, "crdgol").environment())
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
