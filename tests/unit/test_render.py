"""The pure render: deterministic, secret-free, and accepted by Envoy's own validator."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from controller.manifests import load_folder
from controller.models import SpecError, parse_binding
from controller.render import RenderSettings, render
from crdgol.cli import write_sds_files
from crdgol.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir())
GOLDEN = ROOT / "envoy" / "golden"


# Golden configs name the provider credentials' SDS files relative to where Envoy runs.
SDS_DIR = "sds"


def rendered(folder: Path) -> str:
    m = load_folder(folder)
    result = render(m.bindings, m.secrets, RenderSettings(sds_dir=SDS_DIR), mcp_servers=m.mcp_servers)
    assert not m.problems and not result.problems and not result.mcp.problems, (m.problems, result.problems, result.mcp.problems)
    return json.dumps(result.envoy, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("folder", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_to_its_golden_file(folder: Path) -> None:
    out = rendered(folder)
    golden = GOLDEN / f"{folder.name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(out)
    assert golden.exists(), f"no golden file for {folder.name}: run with UPDATE_GOLDEN=1"
    assert out == golden.read_text()
    assert out == rendered(folder)  # deterministic: same input, same bytes


@pytest.mark.parametrize("folder", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_golden_file_is_accepted_by_envoy(folder: Path, tmp_path: Path) -> None:
    golden = GOLDEN / f"{folder.name}.json"
    m = load_folder(folder)
    write_sds_files(tmp_path / SDS_DIR, render(m.bindings, m.secrets, RenderSettings(sds_dir=SDS_DIR), mcp_servers=m.mcp_servers).secrets)
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(golden), "--log-level", "error"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_secret_reaches_the_envoy_config() -> None:
    m = load_folder(ROOT / "examples" / "quickstart")
    result = render(m.bindings, m.secrets, RenderSettings())
    out = json.dumps(result.envoy) + json.dumps(result.listeners) + json.dumps(result.clusters) + json.dumps(result.routes)
    for s in m.secrets:
        for value in s.data.values():
            assert value not in out
    # The provider credential Envoy injects is an SDS secret, served apart from the config.
    assert result.secrets


def test_no_mcp_server_credential_reaches_the_envoy_config() -> None:
    m = load_folder(ROOT / "examples" / "mcp-tools")
    result = render(m.bindings, m.secrets, RenderSettings(), mcp_servers=m.mcp_servers)
    out = json.dumps(result.envoy)
    values = [v for s in m.secrets for v in s.data.values() if not s.name.endswith("-key")]
    assert values and not [v for v in values if v in out]
    # Envoy injects it from an SDS secret, served apart from the config.
    assert [s for s in result.secrets if any(v in json.dumps(s) for v in values)]


def test_crdgol_render_writes_the_injected_credentials_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "sds"
    proc = subprocess.run(
        [sys.executable, "-m", "crdgol.cli", "render", "--manifests", str(ROOT / "examples" / "quickstart"), "--secrets-dir", str(folder)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    files = list(folder.iterdir())
    assert files and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    values = [json.loads(f.read_text())["resources"][0]["generic_secret"]["secret"]["inline_string"] for f in files]
    assert all(v.startswith("Bearer ") and v[7:] and v[7:] not in proc.stdout for v in values)
    for f in files:
        assert str(f) in proc.stdout  # the config names the file, never its content
    cfg = tmp_path / "envoy.json"
    cfg.write_text(proc.stdout)
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(cfg), "--log-level", "error"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def _binding(**spec: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model": "m",
        "backends": [{"name": "a", "provider": "openai", "endpoint": "https://api.example.com/v1", "model": "gpt"}],
    }
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": "b", "namespace": "ns"}, "spec": {**base, **spec}}


def test_an_https_backend_gets_tls_with_sni_and_the_system_ca() -> None:
    result = render([parse_binding(_binding())], [], RenderSettings())
    cluster = next(c for c in result.envoy["static_resources"]["clusters"] if c["name"].startswith("crdgol-be."))
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 443


def test_fallback_priorities_become_priority_groups_with_one_retry_per_level() -> None:
    b = _binding(
        backends=[
            {"name": "a", "provider": "openai", "endpoint": "http://10.0.0.1:80", "model": "x", "weight": 3},
            {"name": "b", "provider": "openai", "endpoint": "http://10.0.0.2:80", "model": "y", "weight": 1},
            {"name": "c", "provider": "anthropic", "endpoint": "http://10.0.0.3:80", "model": "z", "priority": 1},
        ]
    )
    route = render([parse_binding(b)], [], RenderSettings()).envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    groups = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]["priority_groups"]
    assert [[c["weight"] for c in g["clusters"]] for g in groups] == [[3, 1], [1]]
    assert route["route"]["retry_policy"]["num_retries"] == 1
    assert route["route"]["retry_policy"]["refresh_cluster_on_retry"] is True


def test_a_missing_secret_refuses_only_that_binding_with_a_reason() -> None:
    bad = _binding(backends=[{"name": "a", "provider": "openai", "endpoint": "https://x.example/v1", "model": "g", "credentialsRef": {"name": "nope", "key": "k"}}])
    good = _binding(model="other")
    good["metadata"] = {"name": "good", "namespace": "ns"}
    result = render([parse_binding(bad), parse_binding(good)], [], RenderSettings())
    assert result.problems["ns/b"].reason == "SecretNotFound"
    assert [b.model for b in result.snapshot.bindings] == ["other"]


def test_two_bindings_claiming_one_model_conflict() -> None:
    one, two = _binding(), _binding()
    two["metadata"] = {"name": "c", "namespace": "ns"}
    result = render([parse_binding(one), parse_binding(two)], [], RenderSettings())
    assert result.problems["ns/c"].reason == "ModelConflict"


def test_an_issuers_jwks_url_reaches_extproc_in_the_policy() -> None:
    url = "https://login.example.com/.well-known/jwks.json"
    b = _binding(auth={"jwt": [{"issuer": "https://login.example.com", "jwksUri": url}]})
    (provider,) = render([parse_binding(b)], [], RenderSettings()).snapshot.jwt_providers
    assert (provider.jwks_uri, provider.jwks_json, provider.namespace) == (url, "", "ns")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"auth": {"jwt": [{"issuer": "i", "jwksUri": "http://idp.example.com/jwks"}]}}, "InvalidAuth"),
        ({"auth": {"jwt": [{"issuer": "i", "jwksUri": "https://idp/jwks", "jwks": "{}"}]}}, "InvalidAuth"),
        ({"backends": []}, "NoBackends"),
        ({"model": "bad model name!"}, "InvalidModel"),
        ({"backends": [{"name": "a", "provider": "azure", "endpoint": "https://x", "model": "g"}]}, "InvalidProvider"),
        ({"backends": [{"name": "a", "provider": "openai", "endpoint": "ftp://x", "model": "g"}]}, "InvalidEndpoint"),
        ({"context": {"systemPrompt": "hi ${nope}"}}, "InvalidTemplate"),
        ({"context": {"systemPrompt": "hi ${nope:-someone}"}}, "InvalidTemplate"),
        ({"timeouts": {"request": "soon"}}, "InvalidDuration"),
    ],
)
def test_invalid_specs_are_refused_with_an_actionable_reason(spec: dict[str, object], reason: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_binding(_binding(**spec))
    assert err.value.reason == reason


def test_a_broken_secret_file_is_reported_without_quoting_it(tmp_path: Path) -> None:
    (tmp_path / "secret.yaml").write_text("apiVersion: v1\nkind: Secret\nstringData:\n  key: sk-very-secret: [\n")
    m = load_folder(tmp_path)
    problem = m.problems[str(tmp_path / "secret.yaml")]
    assert problem.reason == "InvalidYAML" and "line" in problem.message
    assert "sk-very-secret" not in problem.message


@pytest.mark.parametrize(
    "spec",
    [
        {"model": "m\n"},
        {"context": {"systemPrompt": "${tenant\n}"}},
    ],
)
def test_a_trailing_newline_does_not_sneak_past_a_pattern(spec: dict[str, object]) -> None:
    with pytest.raises(SpecError):
        parse_binding(_binding(**spec))


def test_the_render_cache_changes_nothing_but_the_time() -> None:
    import json as _json

    from controller.models import parse_secret
    from controller.render import RenderCache

    def spec(i: int, model: str = "gpt") -> dict[str, object]:
        b = _binding(model=f"m{i}", backends=[{"name": "a", "provider": "openai", "endpoint": "https://api.example.com/v1", "model": model, "credentialsRef": {"name": "p", "key": "k"}}])
        b["metadata"] = {"name": f"b{i}", "namespace": "ns"}
        return b

    def secret(value: str) -> list[object]:
        return [parse_secret({"metadata": {"name": "p", "namespace": "ns"}, "stringData": {"k": value}})]

    cache = RenderCache()
    specs = [parse_binding(spec(i)) for i in range(20)]
    first = render(specs, secret("v1"), RenderSettings(), cache)
    changed = [*specs[:5], parse_binding(spec(5, "other")), *specs[6:]]
    for bindings, secrets in ((changed, secret("v1")), (changed, secret("v2"))):
        cached = render(bindings, secrets, RenderSettings(), cache)
        fresh = render(bindings, secrets, RenderSettings())
        assert _json.dumps(cached.envoy, sort_keys=True) == _json.dumps(fresh.envoy, sort_keys=True)
        assert cached.snapshot == fresh.snapshot
    assert cached.snapshot != first.snapshot
    # A rotated Secret reaches the snapshot even though no binding changed.
    assert {be.api_key for b in cached.snapshot.bindings for be in b.backends} == {"v2"}
