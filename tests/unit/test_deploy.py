"""The Kubernetes manifests in deploy/ are valid, complete and agree with each other.

Every object is checked against the Kubernetes OpenAPI schemas bundled with kubernetes-validate
(strict: unknown fields fail), the Envoy bootstrap in its ConfigMap against Envoy's own validator,
and the cross-references (selectors, ports, names, the ADS address) against each other. What needs
a cluster (admission, CEL in the CRDs, image pulls) is not checked here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.bootstrap import xds_client_tls
from crdgol import cli, devcerts
from crdgol.control_plane import InsecureControlPlane, ServerAuth, TlsFiles, require_secure_server
from crdgol.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NAMESPACE = "crdgol-system"
CRDGOL_IMAGE = "ghcr.io/crdgol/crdgol:0.1.0"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40.0"
Json = dict[str, Any]

MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")
OBJECTS: list[tuple[str, Json]] = [
    (f"{p.relative_to(DEPLOY)}:{doc['kind']}/{doc['metadata']['name']}", doc)
    for p in MANIFESTS
    for doc in yaml.safe_load_all(p.read_text())
    if doc
]


def find(kind: str, name: str) -> Json:
    (obj,) = [o for _, o in OBJECTS if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def containers(deployment: str) -> dict[str, Json]:
    return {c["name"]: c for c in find("Deployment", deployment)["spec"]["template"]["spec"]["containers"]}


def bootstrap() -> Json:
    config: Json = yaml.safe_load(find("ConfigMap", "crdgol-envoy-bootstrap")["data"]["envoy.yaml"])
    return config


def flag(args: list[str], name: str) -> str:
    """The value of ``--name value`` or ``--name=value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def test_there_are_manifests() -> None:
    kinds = {o["kind"] for _, o in OBJECTS}
    assert {"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Service", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=[i for i, _ in OBJECTS])
def test_every_object_is_valid_kubernetes(obj: Json) -> None:
    if obj["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
        # A custom resource: its CRD ships here too (kubernetes-validate knows only built-ins).
        crds = {(o["spec"]["group"], o["spec"]["names"]["kind"]) for _, o in OBJECTS if o["kind"] == "CustomResourceDefinition"}
        assert (obj["apiVersion"].split("/")[0], obj["kind"]) in crds
        return
    # The newest Kubernetes the installed kubernetes-validate knows; strict refuses unknown fields.
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


CUSTOM_GROUPS = {"kopf.dev"}


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(str(p.relative_to(DEPLOY)) for p in MANIFESTS)
    # CRDs and the namespace first, for tools that apply in order.
    assert listed[:5] == ["crds/aimodelbindings.yaml", "crds/workflowspecs.yaml", "crds/workflowruns.yaml", "crds/mcpservers.yaml", "namespace.yaml"]


def test_namespaced_objects_live_in_crdgol_system() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterKopfPeering"}
    for where, obj in OBJECTS:
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], where
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, where
    assert find("Namespace", NAMESPACE)


def test_the_envoy_bootstrap_is_accepted_by_envoy(tmp_path: Path) -> None:
    # Envoy loads the TLS files while validating: give it the ConfigMap's files and the gateway's
    # certificate as the Secret would mount them (issued by `crdgol certs`).
    issued = devcerts.issue()
    devcerts.write(tmp_path / "tls", issued.client, issued.ca)
    data = find("ConfigMap", "crdgol-envoy-bootstrap")["data"]
    for name, text in data.items():
        assert TLS_MOUNT in text or ENVOY_MOUNT in text, name
        (tmp_path / name).write_text(text.replace(TLS_MOUNT, f"{tmp_path}/tls").replace(ENVOY_MOUNT + "/", f"{tmp_path}/"))
    path = tmp_path / "envoy.yaml"
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_the_envoy_image_is_the_envoy_the_tests_run() -> None:
    version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert containers("crdgol-gateway")["envoy"]["image"] == ENVOY_IMAGE
    assert f"/{ENVOY_IMAGE.rsplit(':v', 1)[1]}/" in version


def _socket(cluster: Json) -> tuple[str, int]:
    (endpoints,) = cluster["load_assignment"]["endpoints"]
    (lb,) = endpoints["lb_endpoints"]
    addr = lb["endpoint"]["address"]["socket_address"]
    return addr["address"], addr["port_value"]


def _service_port(service: str, name: str) -> int:
    (port,) = [p["port"] for p in find("Service", service)["spec"]["ports"] if p["name"] == name]
    return int(port)


def test_envoy_gets_its_config_over_ads_from_the_controller_service() -> None:
    config = bootstrap()
    ads = config["dynamic_resources"]["ads_config"]
    assert (ads["api_type"], ads["transport_api_version"]) == ("GRPC", "V3")
    assert ads["grpc_services"] == [{"envoy_grpc": {"cluster_name": "crdgol-xds"}}]
    for kind in ("cds_config", "lds_config"):
        source = config["dynamic_resources"][kind]
        assert (source["ads"], source["resource_api_version"]) == ({}, "V3")
        # Not ready until the controller has answered (the default opens listeners after 15 s).
        assert source["initial_fetch_timeout"] == "0s"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    xds = clusters["crdgol-xds"]
    assert xds["type"] == "STRICT_DNS"
    assert "http2_protocol_options" in xds["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    assert _socket(xds) == (f"crdgol-controller.{NAMESPACE}.svc", _service_port("crdgol-controller", "grpc-xds"))
    assert _service_port("crdgol-controller", "grpc-xds") == 18000
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}


def test_envoy_and_extproc_meet_on_loopback() -> None:
    clusters = {c["name"]: c for c in bootstrap()["static_resources"]["clusters"]}
    extproc = clusters["crdgol-extproc"]
    assert "http2_protocol_options" in extproc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    args = containers("crdgol-gateway")["extproc"]["args"]
    assert args[0] == "extproc"
    assert _socket(extproc) == (flag(args, "--host"), int(flag(args, "--port"))) == ("127.0.0.1", 9002)
    assert _socket(clusters["crdgol-extproc-metrics"]) == ("127.0.0.1", int(flag(args, "--metrics-port")))
    host, port = flag(args, "--policy-server").rsplit(":", 1)
    assert host == f"crdgol-controller.{NAMESPACE}.svc" and int(port) == _service_port("crdgol-controller", "grpc-policy") == 18001


def test_the_controller_serves_the_ports_its_service_names() -> None:
    deployment = find("Deployment", "crdgol-controller")
    assert deployment["spec"]["replicas"] == 1
    (controller,) = containers("crdgol-controller").values()
    assert controller["image"] == CRDGOL_IMAGE
    assert controller["command"] == ["crdgol"] and controller["args"][0] == "controller"
    ports = {p["name"]: p["containerPort"] for p in controller["ports"]}
    assert ports == {"grpc-xds": 18000, "grpc-policy": 18001, "metrics": 9103, "workflow-api": 8091}
    assert int(flag(controller["args"], "--workflow-api-port")) == 8091
    assert flag(controller["args"], "--workflow-api-address") == "crdgol-controller.crdgol-system.svc:8091"
    assert int(flag(controller["args"], "--xds-port")) == 18000
    assert int(flag(controller["args"], "--policy-port")) == 18001
    assert int(flag(controller["args"], "--metrics-port")) == 9103
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "crdgol-controller"


@pytest.mark.parametrize("service", ["crdgol-controller", "crdgol-gateway"])
def test_each_service_selects_its_deployments_pods_and_named_ports(service: str) -> None:
    svc = find("Service", service)
    template = find("Deployment", service)["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in named, port


def test_the_gateway_listens_on_8080_with_two_replicas() -> None:
    assert find("Deployment", "crdgol-gateway")["spec"]["replicas"] == 2
    (port,) = [p for p in find("Service", "crdgol-gateway")["spec"]["ports"] if p["name"] == "http"]
    assert port["port"] == 8080
    envoy = containers("crdgol-gateway")["envoy"]
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]}[port["targetPort"]] == 8080
    assert containers("crdgol-gateway")["extproc"]["image"] == CRDGOL_IMAGE


def test_envoy_reads_the_bootstrap_configmap() -> None:
    spec = find("Deployment", "crdgol-gateway")["spec"]["template"]["spec"]
    envoy = containers("crdgol-gateway")["envoy"]
    (mount,) = [m for m in envoy["volumeMounts"] if m["name"] == "bootstrap"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "bootstrap"]
    assert volume["configMap"]["name"] == "crdgol-envoy-bootstrap"
    assert flag(envoy["args"], "--config-path") == f"{mount['mountPath']}/envoy.yaml"


def test_envoy_probes_hit_the_static_ready_listener() -> None:
    (listener,) = bootstrap()["static_resources"]["listeners"]
    port = listener["address"]["socket_address"]["port_value"]
    envoy = containers("crdgol-gateway")["envoy"]
    named = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert envoy[probe]["httpGet"]["path"] == "/ready"
        assert named[envoy[probe]["httpGet"]["port"]] == port


@pytest.mark.parametrize("deployment", ["crdgol-controller", "crdgol-gateway"])
def test_every_container_is_locked_down_probed_and_sized(deployment: str) -> None:
    pod = find("Deployment", deployment)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for name, c in containers(deployment).items():
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys() and {"cpu", "memory"} <= c["resources"]["limits"].keys(), name
        assert "readinessProbe" in c and "livenessProbe" in c, name
        assert c["image"] in (CRDGOL_IMAGE, ENVOY_IMAGE), name


def _allowed(rules: list[Json], group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"]:
            verbs |= set(rule["verbs"])
    return verbs


def test_the_controller_may_do_what_it_needs_and_no_more() -> None:
    rules = find("ClusterRole", "crdgol-controller")["rules"]
    crds = [o for _, o in OBJECTS if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "crdgol.io"]
    assert len(crds) == 4
    for crd in crds:
        plural = crd["spec"]["names"]["plural"]
        # WorkflowRuns: the run API creates them, their retention deletes finished ones.
        extra = {"create", "delete"} if plural == "workflowruns" else set()
        assert _allowed(rules, "crdgol.io", plural) == {"get", "list", "watch", "patch"} | extra
        assert _allowed(rules, "crdgol.io", f"{plural}/status") >= {"patch"}
    assert _allowed(rules, "", "secrets") == {"get", "list", "watch"}
    assert _allowed(rules, "", "events") >= {"create", "patch"}
    # One active controller at a time (kopf peering).
    assert _allowed(rules, "kopf.dev", "clusterkopfpeerings") == {"get", "list", "watch", "patch"}
    assert _allowed(rules, "batch", "jobs") == {"get", "list", "watch", "create", "delete"}
    assert not any("*" in r["verbs"] or "*" in r["resources"] or "*" in r["apiGroups"] for r in rules)
    binding = find("ClusterRoleBinding", "crdgol-controller")
    assert binding["roleRef"]["name"] == "crdgol-controller"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "crdgol-controller", "namespace": NAMESPACE}]
    assert find("ServiceAccount", "crdgol-controller")
    gateway = find("Deployment", "crdgol-gateway")["spec"]["template"]["spec"]
    assert find("ServiceAccount", gateway["serviceAccountName"])
    assert gateway["automountServiceAccountToken"] is False


TLS_MOUNT = "/etc/crdgol/tls"
ENVOY_MOUNT = "/etc/envoy"


def _tls_secret(deployment: str, container: str) -> str:
    """The Secret mounted at TLS_MOUNT in this container."""
    pod = find("Deployment", deployment)["spec"]["template"]["spec"]
    (mount,) = [m for m in containers(deployment)[container]["volumeMounts"] if m["mountPath"] == TLS_MOUNT]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    # Keys readable by the pod's group only (both gateway containers share the fsGroup).
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"]
    return str(volume["secret"]["secretName"])


def test_the_controller_serves_xds_and_policy_over_mutual_tls_only() -> None:
    (controller,) = containers("crdgol-controller").values()
    args = ["controller", *controller["args"][1:]]
    parsed = cli.build_parser().parse_args(args)
    assert parsed.host == "0.0.0.0"
    assert (parsed.tls_cert, parsed.tls_key, parsed.tls_client_ca) == (f"{TLS_MOUNT}/tls.crt", f"{TLS_MOUNT}/tls.key", f"{TLS_MOUNT}/ca.crt")
    assert parsed.tls_client_name == [devcerts.GATEWAY_NAME]
    assert _tls_secret("crdgol-controller", "controller") == "crdgol-controller-tls"
    # The command line would start: TCP only with mutual TLS (it refuses the same flags without).
    tls = TlsFiles(Path(parsed.tls_cert), Path(parsed.tls_key), Path(parsed.tls_client_ca))
    require_secure_server(ServerAuth(tls=tls), ["0.0.0.0:18000"])
    with pytest.raises(InsecureControlPlane):
        require_secure_server(ServerAuth(), ["0.0.0.0:18000"])


def test_envoy_and_extproc_prove_themselves_with_the_gateway_certificate_and_check_the_controllers() -> None:
    service_name = f"crdgol-controller.{NAMESPACE}.svc"
    clusters = {c["name"]: c for c in bootstrap()["static_resources"]["clusters"]}
    xds = clusters["crdgol-xds"]
    assert _socket(xds)[0] == service_name
    # Exactly what xds_client_tls builds (the function the mutual-TLS test runs real Envoy with).
    socket, sds_files = xds_client_tls(TLS_MOUNT, ENVOY_MOUNT, service_name)
    assert xds["transport_socket"] == socket
    data = find("ConfigMap", "crdgol-envoy-bootstrap")["data"]
    assert {name: yaml.safe_load(data[name]) for name in sds_files} == sds_files
    (mount,) = [m for m in containers("crdgol-gateway")["envoy"]["volumeMounts"] if m["name"] == "bootstrap"]
    assert mount["mountPath"] == ENVOY_MOUNT
    args = containers("crdgol-gateway")["extproc"]["args"]
    assert flag(args, "--policy-server").rsplit(":", 1)[0] == service_name
    assert (flag(args, "--policy-tls-cert"), flag(args, "--policy-tls-key"), flag(args, "--policy-tls-ca")) == (
        f"{TLS_MOUNT}/tls.crt", f"{TLS_MOUNT}/tls.key", f"{TLS_MOUNT}/ca.crt",
    )
    assert _tls_secret("crdgol-gateway", "envoy") == _tls_secret("crdgol-gateway", "extproc") == "crdgol-gateway-tls"
    # The certificates `crdgol certs` issues carry exactly the names the two sides check.
    assert service_name in devcerts.CONTROLLER_NAMES


def test_crdgol_certs_prints_the_two_secrets_the_deployments_mount() -> None:
    docs = list(yaml.safe_load_all(devcerts.secrets_yaml(devcerts.issue(days=1))))
    assert {d["metadata"]["name"] for d in docs} == {"crdgol-controller-tls", "crdgol-gateway-tls"}
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        assert doc["type"] == "kubernetes.io/tls" and doc["metadata"]["namespace"] == NAMESPACE
        assert set(doc["data"]) == {"tls.crt", "tls.key", "ca.crt"}


def _ingress_to(component: str) -> list[Json]:
    (policy,) = [
        o for _, o in OBJECTS
        if o["kind"] == "NetworkPolicy" and o["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == component
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    labels = find("Deployment", f"crdgol-{component}")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    rules: list[Json] = policy["spec"]["ingress"]
    return rules


def test_only_gateway_pods_reach_the_controllers_control_plane_ports_and_metrics_stay_scrapeable() -> None:
    deny = find("NetworkPolicy", "crdgol-default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    gateway_labels = find("Deployment", "crdgol-gateway")["spec"]["template"]["metadata"]["labels"]
    controller_ports = {p["name"] for p in containers("crdgol-controller")["controller"]["ports"]}
    open_to: dict[str, list[Json]] = {}
    for rule in _ingress_to("controller"):
        for port in rule["ports"]:
            assert port["port"] in controller_ports
            open_to.setdefault(port["port"], []).extend(rule.get("from", [{"anyone": True}]))
    assert set(open_to) == {"grpc-xds", "grpc-policy", "metrics", "workflow-api"}
    for name in ("grpc-xds", "grpc-policy", "workflow-api"):
        (peer,) = open_to[name]
        assert set(peer) == {"podSelector"}  # these pods, in this namespace; nothing else
        assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert open_to["metrics"] == [{"anyone": True}]
    # The gateway takes client traffic and probes/scrapes on its named ports, nothing else.
    gateway_ports = {p["name"] for c in containers("crdgol-gateway").values() for p in c.get("ports", [])}
    rule, egress = _ingress_to("gateway")
    assert "from" not in rule and {p["port"] for p in rule["ports"]} == {"http", "ready"} <= gateway_ports
    # The egress listener (workflow http-request steps) only from the controller's pods.
    controller_labels = find("Deployment", "crdgol-controller")["spec"]["template"]["metadata"]["labels"]
    (peer,) = egress["from"]
    assert [p["port"] for p in egress["ports"]] == ["egress"] and "egress" in gateway_ports
    assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= controller_labels.items()
