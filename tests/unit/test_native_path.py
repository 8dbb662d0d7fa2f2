"""The native path's render: which bindings qualify, and what Envoy is given (keys as digests only).

The program itself runs in Envoy: ``tests/dataplane/test_native_lua.py`` (SHA-256, JSON reader)
and ``tests/dataplane/test_native_path.py`` (the whole decision, through the real gateway).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from controller.envoy_config import ATTEMPT_FILTER, RenderSettings
from controller.manifests import load_folder
from controller.native_path import lua_program, native_binding, versioned
from controller.render import RenderResult, render
from controller.xds import ECDS, Encoder
from crdgol.pb import policy_pb2 as pb
from crdgol.request_path import NATIVE_FILTER, NATIVE_SUFFIX
from crdgol.tracing import TracingSettings

KEY = "sk-unit-native-key"
SHARED = "sk-unit-shared-key"
ODD_MODEL = 'odd]] os.exit() --[[ "model"\n'


def _binding(name: str, backends: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": name, "namespace": "ns"}, "spec": {"model": name, "backends": backends, **spec}}


def _be(name: str = "p", priority: int = 0, provider: str = "openai-compatible", model: str = "up") -> dict[str, Any]:
    return {"name": name, "provider": provider, "endpoint": "http://127.0.0.1:9/v1", "model": model, "priority": priority, "credentialsRef": {"name": "provider", "key": "k"}}


def _secret(name: str, ns: str, data: dict[str, str], tenant: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if tenant:
        meta |= {"labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": tenant}}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": data}


BINDINGS = [
    _binding("plain", [_be()]),
    _binding("with-fallback", [_be(), _be("rescue", 1, "anthropic")]),
    _binding("claude", [_be(provider="anthropic")]),
    _binding("split", [_be("a"), _be("b")]),  # two first-priority backends: no direct one
    _binding("quota", [_be()], quotas={"default": {"requests": [{"amount": 5, "per": "minute"}]}}),
    _binding("tenant-quota", [_be()], quotas={"tenants": {"t": {"requests": [{"amount": 5, "per": "minute"}]}}}),
    _binding("context", [_be()], context={"systemPrompt": "hi"}),
    _binding("history", [_be()], context={"history": {"enabled": True, "maxTurns": 2, "maxTokens": 100, "ttl": "1h"}}),
    _binding("cached", [_be()], cache={"ttl": "10m"}),
    _binding("odd", [_be(model=ODD_MODEL)], tenants=["t", "other/*"]),
]
NATIVE = {"plain", "with-fallback", "claude", "odd"}


def render_folder(tmp_path: Path, **settings: Any) -> RenderResult:
    secrets = [
        _secret("provider", "ns", {"k": "sk-provider"}),
        _secret("key", "ns", {"key": KEY}, "t"),
        # The same key in two namespaces acts as two tenants: extproc's to resolve.
        _secret("shared", "ns", {"key": SHARED}, "t"),
        _secret("shared", "other", {"key": SHARED}, "u"),
    ]
    (tmp_path / "all.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in [*BINDINGS, *secrets]))
    m = load_folder(tmp_path)
    result = render(m.bindings, m.secrets, RenderSettings(sds_dir="sds", **settings))
    assert not m.problems and not result.problems, (m.problems, result.problems)
    return result


def _filters(result: RenderResult) -> list[dict[str, Any]]:
    hcm = result.envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def test_only_bindings_that_need_no_extproc_decision_get_a_native_route(tmp_path: Path) -> None:
    result = render_folder(tmp_path)
    assert {b.key.split("/")[1] for b in result.snapshot.bindings if native_binding(b)} == NATIVE
    native = {str(r["name"]).split(".")[1]: r for r in result.routes if str(r["name"]).endswith(NATIVE_SUFFIX)}
    assert set(native) == NATIVE
    for r in native.values():
        off = r["typed_per_filter_config"]
        assert off["envoy.filters.http.ext_proc"]["disabled"] is True and off["envoy.filters.http.buffer"]["disabled"] is True
        assert r["request_headers_to_remove"] == ["authorization", "x-api-key"]
        assert "response_headers_to_add" not in r  # no rate-limit headers on a binding without quotas
    # A fallback attempt's filter reads the APIs as constants; it has a name of its own, so the
    # native route's "ext_proc off" does not reach it.
    fallback = {h["header"]["key"]: h["header"]["value"] for h in native["with-fallback"]["request_headers_to_add"]}
    assert fallback == {"x-crdgol-client-api": "openai", "x-crdgol-body-api": "openai"}
    rescue = next(c for c in result.clusters if ".with-fallback.rescue." in c["name"])
    upstream = rescue["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    assert upstream[0]["name"] == ATTEMPT_FILTER
    assert native["claude"]["request_headers_to_add"][0]["header"]["key"] == "anthropic-version"


def test_the_lua_filter_goes_first_and_holds_key_digests_never_keys(tmp_path: Path) -> None:
    result = render_folder(tmp_path)
    first = _filters(result)[0]
    assert first["name"] == NATIVE_FILTER and _filters(result)[1]["name"] == "envoy.filters.http.ext_proc"
    program = first["typed_config"]["default_source_code"]["inline_string"]
    assert program == versioned(result.native, 1)  # the static config's: knows its policy version
    config = json.dumps(result.envoy)
    assert KEY not in config and SHARED not in config and "sk-provider" not in config
    assert hashlib.sha256(KEY.encode()).hexdigest() in program
    # A key that acts as two tenants is left to extproc (an ambiguous caller).
    assert hashlib.sha256(SHARED.encode()).hexdigest() not in program


def test_names_from_specs_are_data_never_code(tmp_path: Path) -> None:
    program = render_folder(tmp_path).native
    # The data sits in two long strings that nothing in it can close ("]" is percent-encoded).
    data = program.split("local BINDING_DATA = [[\n", 1)[1].split("\n]]", 1)[0]
    assert "]" not in data and "\n" not in data.replace("\n", "") and ODD_MODEL.strip() not in program
    line = next(x for x in program.splitlines() if x.startswith("odd\t"))
    fields = line.split("\t")
    assert fields[1] == "ns/odd" and fields[3].endswith(NATIVE_SUFFIX)
    assert json.loads(unquote(fields[5])) == ODD_MODEL  # the body's new model value, a JSON string
    # The tenant patterns are the served ones: namespace "other" did not accept the grant.
    assert [unquote(p) for p in fields[7].split(" ")] == ["ns/t"]


def test_two_renders_of_one_policy_compare_equal_whatever_their_versions(tmp_path: Path) -> None:
    # The controller publishes a new version only when the render changed (controller.state).
    one, two = render_folder(tmp_path, version=1), render_folder(tmp_path, version=2)
    assert one.native == two.native and one.listeners == two.listeners
    assert one.envoy != two.envoy  # the static config's program says which version it is


@pytest.mark.parametrize(
    "settings",
    [{"native_path": False}, {"one_message": False}, {"tracing": TracingSettings(endpoint="http://127.0.0.1:4317")}],
    ids=["--no-native-path", "no one-message path", "tracing on"],
)
def test_the_native_path_can_be_off(tmp_path: Path, settings: dict[str, Any]) -> None:
    result = render_folder(tmp_path, **settings)
    assert result.native == ""
    assert all(f["name"] != NATIVE_FILTER for f in _filters(result))
    assert not any(str(r["name"]).endswith(NATIVE_SUFFIX) for r in result.routes)


def test_over_xds_the_program_is_its_own_ecds_resource() -> None:
    program = versioned(lua_program(pb.PolicySnapshot(version=3), RenderSettings()), 3)
    snap = Encoder().snapshot(3, [], [], extensions=[{"name": NATIVE_FILTER, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua", "default_source_code": {"inline_string": program}}}])
    [resource] = snap.resources[ECDS]
    assert resource.type_url.endswith("TypedExtensionConfig") and b"local VERSION = 3" in resource.value
    assert Encoder().snapshot(3, [], []).resources[ECDS] == ()
