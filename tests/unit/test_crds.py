"""The CRDs in deploy/crds accept exactly what the controller's typed parse accepts.

Each CRD's openAPIV3Schema is translated to JSON Schema and checked with ``jsonschema``: objects
get ``additionalProperties: false`` unless they preserve unknown fields, which mirrors the API
server's pruning and ``kubectl``'s strict field validation, so a field the controller reads but the
schema lacks is caught. Defaults are applied the way the API server applies them (into every object
that is present, recursively) so the CRD's defaults can be compared with ``parse_binding``'s.

The ``x-kubernetes-validations`` rules are CEL, which needs an API server (or cel-go) to evaluate;
neither is available here, so their presence and intent are asserted and their evaluation is left
to a real cluster (``kubectl apply --dry-run=server -f deploy/crds``).
"""

from __future__ import annotations

import ast
import copy
import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import models
from controller.models import SpecError, parse_binding

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy" / "crds"
Json = dict[str, Any]


# --- the CRDs as JSON Schema ------------------------------------------------------------------


@functools.cache
def load_crd(plural: str) -> Json:
    """The parsed CRD, shared between tests: read it, never change it."""
    crd: Json = yaml.safe_load((CRDS / f"{plural}.yaml").read_text())
    return crd


def version_schema(crd: Json) -> Json:
    (version,) = crd["spec"]["versions"]
    schema: Json = version["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: Json) -> Json:
    """OpenAPI v3 (Kubernetes structural dialect) -> JSON Schema; x-kubernetes-* keys dropped."""
    out: Json = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "format", "default"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def apply_defaults(node: Json, value: Any) -> Any:
    """Default ``value`` as the API server does: into objects that exist, then recurse."""
    if isinstance(value, dict):
        value = dict(value)
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            known = node.get("properties", {})
            value = {k: (v if k in known else apply_defaults(extra, v)) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [apply_defaults(node["items"], v) for v in value]
    return value


def as_kubectl_sends(value: Any) -> Any:
    """YAML -> the JSON kubectl sends: YAML 1.1 booleans used as keys become "true"/"false"."""
    if isinstance(value, dict):
        return {(str(k).lower() if isinstance(k, bool) else str(k)): as_kubectl_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v) for v in value]
    return value


def schema_errors(plural: str, obj: Json) -> list[str]:
    schema = version_schema(load_crd(plural))
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    defaulted = apply_defaults(schema, as_kubectl_sends(obj))
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(defaulted))


def walk(node: Json) -> list[Json]:
    """Every schema node, depth first."""
    found = [node]
    for sub in node.get("properties", {}).values():
        found += walk(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            found += walk(node[key])
    return found


def rules(plural: str) -> list[str]:
    return [" ".join(r["rule"].split()) for n in walk(version_schema(load_crd(plural))) for r in n.get("x-kubernetes-validations", [])]


def binding(**spec: Any) -> Json:
    base: Json = {
        "model": "chat",
        "backends": [{"name": "a", "provider": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4o"}],
    }
    base.update(spec)
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": "chat", "namespace": "team"}, "spec": base}


FULL_BINDING: Json = binding(
    model="org/chat-1.5:latest",
    tenants=["acme", "globex"],
    backends=[
        {
            "name": "primary",
            "provider": "openai",
            "endpoint": "https://api.openai.com/v1",
            "model": "gpt-4o",
            "credentialsRef": {"name": "openai", "key": "apiKey", "namespace": "team"},
            "weight": 3,
            "priority": 0,
            "pricing": {"inputPerMillion": "2.50", "outputPerMillion": "10.00"},
        },
        {
            "name": "secondary",
            "provider": "openai-compatible",
            "endpoint": "http://vllm.models.svc:8000/proxy/v1",
            "model": "llama-3",
            "weight": 1,
            "priority": 1,
            "pricing": {"inputPerMillion": "0", "outputPerMillion": "0.075"},
        },
        {
            "name": "claude",
            "provider": "anthropic",
            "endpoint": "https://api.anthropic.com",
            "model": "claude-sonnet",
            "credentialsRef": {"name": "anthropic", "key": "apiKey"},
            "priority": 16,
            "weight": 10000,
            "pricing": {"inputPerMillion": "3", "outputPerMillion": "15"},
        },
    ],
    auth={
        "jwt": [
            {"name": "corp", "issuer": "https://idp.example.com", "audiences": ["crdgol"], "tenantClaim": "org", "hs256SecretRef": {"name": "jwt", "key": "secret"}},
            {"issuer": "https://other.example.com", "jwks": {"keys": [{"kty": "RSA", "kid": "1", "n": "abc", "e": "AQAB"}]}},
            {"issuer": "https://third.example.com", "jwks": '{"keys": []}'},
            {"issuer": "https://fourth.example.com", "jwksUri": "https://fourth.example.com/.well-known/jwks.json"},
            {"issuer": "https://fifth.example.com", "discovery": True},
        ]
    },
    quotas={
        "default": {
            "requests": [{"amount": 60, "per": "minute"}, {"amount": 1000, "per": "day"}],
            "tokens": [{"amount": 100000, "per": "hour", "type": "input"}, {"amount": 1000000, "per": "day"}],
            "concurrent": 8,
            "budget": {"amount": "10.00", "per": "day"},
            "defaultMaxTokens": 2048,
        },
        "tenants": {"acme": {"requests": [{"amount": 1, "per": "second"}], "budget": {"amount": "250", "per": "month"}}},
        "failPolicy": {"rateLimits": "closed", "budgets": "open"},
    },
    context={
        "systemPrompt": "You help ${tenant} on ${date} with ${model}; team ${user.team}.",
        "profile": [{"name": "team", "header": "X-User-Team"}, {"name": "email", "claim": "email"}],
        "history": {"enabled": True, "maxTurns": 1000, "maxTokens": 1000000, "ttl": "90m"},
        "knowledge": [{"title": "Gateway", "text": "crdgol routes model calls."}, {"text": "untitled"}],
        "maxContextTokens": 2000000,
    },
    timeouts={"request": "1.5m", "perTry": "500ms"},
    retry={"on": list(models.RETRY_CONDITIONS), "attempts": 10},
)


# --- the CRDs' shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plural", "kind", "short", "columns"),
    [
        ("aimodelbindings", "AIModelBinding", "aimb", ["Model", "Backends", "Ready", "Age"]),
        ("workflowspecs", "WorkflowSpec", "wfs", ["Steps", "Age"]),
        ("workflowruns", "WorkflowRun", "wfr", ["Spec", "Phase", "Age"]),
    ],
)
def test_each_crd_is_a_namespaced_v1alpha1_resource_with_status_printer_columns_and_a_short_name(
    plural: str, kind: str, short: str, columns: list[str]
) -> None:
    crd = load_crd(plural)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.crdgol.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("crdgol.io", "Namespaced")
    assert spec["names"]["kind"] == kind and spec["names"]["plural"] == plural
    assert short in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert [n for n in names if n in columns] == columns
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["observedGeneration"]["type"] == "integer"
    condition = status["conditions"]["items"]
    assert condition["required"] == ["type", "status", "lastTransitionTime", "reason", "message"]
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert condition["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


@pytest.mark.parametrize("plural", ["aimodelbindings", "workflowspecs", "workflowruns"])
def test_each_crd_schema_is_structural(plural: str) -> None:
    """Every node has a type (or preserves unknown fields); `not` branches carry only value checks."""
    for node in walk(version_schema(load_crd(plural))):
        untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        if "type" not in node:
            assert untyped_ok or set(node) <= {"pattern"}, node
        if "not" in node:
            assert set(node["not"]) == {"pattern"}, node
        if "default" in node:
            assert not jsonschema.Draft7Validator(to_json_schema(node)).is_valid(None)  # typed
            assert jsonschema.Draft7Validator(to_json_schema(node)).is_valid(node["default"]), node


@pytest.mark.parametrize("plural", ["aimodelbindings", "workflowspecs", "workflowruns"])
def test_lists_and_strings_read_by_cel_rules_are_bounded(plural: str) -> None:
    """The API server refuses a CRD whose CEL cost it cannot bound; lists under rules carry maxItems."""
    for node in walk(version_schema(load_crd(plural))):
        for r in node.get("x-kubernetes-validations", []):
            for name in re.findall(r"self\.(\w+)\.(?:all|exists|exists_one)\(", r["rule"]):
                sub = node["properties"][name]
                assert "maxItems" in sub or "maxProperties" in sub, (plural, name)


# --- AIModelBinding: the same language as controller/models.py ----------------------------------


def binding_spec_schema() -> Json:
    spec: Json = version_schema(load_crd("aimodelbindings"))["properties"]["spec"]
    return spec


def test_the_enums_are_the_controllers_enums() -> None:
    backend = binding_spec_schema()["properties"]["backends"]["items"]["properties"]
    assert tuple(backend["provider"]["enum"]) == models.PROVIDERS
    retry_on = binding_spec_schema()["properties"]["retry"]["properties"]["on"]
    assert tuple(retry_on["items"]["enum"]) == models.RETRY_CONDITIONS
    assert tuple(retry_on["default"]) == models.RetrySpec().on


def test_the_patterns_are_the_controllers_patterns() -> None:
    props = binding_spec_schema()["properties"]
    assert props["model"]["pattern"] == models._MODEL.pattern
    assert props["backends"]["items"]["properties"]["name"]["pattern"] == models._NAME.pattern
    assert "self.metadata.name.matches('" + models._NAME.pattern + "')" in rules("aimodelbindings")


def test_the_quickstart_binding_is_valid_once_its_yaml_1_1_keys_are_quoted() -> None:
    # `on:` unquoted is the boolean true in YAML 1.1 (PyYAML and kubectl), and `429` an integer;
    # quoted, the same manifest is what the schema accepts.
    text = (ROOT / "examples" / "quickstart" / "binding.yaml").read_text()
    text = text.replace("    on: [connect-failure, 5xx, 429, reset]", '    "on": [connect-failure, 5xx, "429", reset]')
    obj = yaml.safe_load(text)
    assert obj["spec"]["retry"]["on"] == ["connect-failure", "5xx", "429", "reset"]
    assert schema_errors("aimodelbindings", obj) == []
    parse_binding(obj)


def test_the_quickstart_binding_is_valid_as_written() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "quickstart" / "binding.yaml").read_text())
    assert schema_errors("aimodelbindings", obj) == []


def test_a_binding_using_every_field_is_accepted_by_both_the_schema_and_the_controller() -> None:
    assert schema_errors("aimodelbindings", FULL_BINDING) == []
    parsed = parse_binding(FULL_BINDING)
    assert [b.name for b in parsed.backends] == ["primary", "secondary", "claude"]
    assert parsed.jwt[0].hs256_secret is not None and parsed.jwt[1].jwks
    assert parsed.jwt[3].jwks_uri == "https://fourth.example.com/.well-known/jwks.json" and not parsed.jwt[3].jwks
    assert parsed.retry.attempts == 10 and parsed.per_try_timeout == 0.5


def test_a_minimal_binding_is_accepted_by_both() -> None:
    obj = binding()
    assert schema_errors("aimodelbindings", obj) == []
    parse_binding(obj)


def test_a_backend_without_a_name_is_accepted_by_both() -> None:
    obj = binding(backends=[{"provider": "anthropic", "endpoint": "https://api.anthropic.com", "model": "claude"}])
    assert schema_errors("aimodelbindings", obj) == []
    assert parse_binding(obj).backends[0].name == "backend-0"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({}, id="nothing-optional"),
        pytest.param({"context": {"history": {"enabled": True}}, "timeouts": {}, "retry": {}}, id="empty-sections"),
        pytest.param({"context": {"systemPrompt": "hi", "history": {"ttl": "2h"}}}, id="partial-history"),
        pytest.param({"timeouts": {"request": "30s"}, "retry": {"attempts": 2}}, id="partial-timeouts"),
    ],
)
def test_the_crd_defaults_mean_what_the_controller_assumes_when_a_field_is_absent(spec: Json) -> None:
    obj = binding(**spec)
    defaulted = apply_defaults(version_schema(load_crd("aimodelbindings")), obj)
    assert defaulted != obj or not spec
    assert parse_binding(defaulted) == parse_binding(obj)


def test_an_empty_history_object_means_the_same_before_and_after_defaulting() -> None:
    obj = binding(context={"history": {}})
    defaulted = apply_defaults(version_schema(load_crd("aimodelbindings")), obj)
    assert parse_binding(defaulted) == parse_binding(obj)


def test_the_defaults_are_the_documented_ones() -> None:
    d = apply_defaults(version_schema(load_crd("aimodelbindings")), binding(context={"history": {"enabled": True}}, timeouts={}, quotas={"default": {"tokens": [{"amount": 1, "per": "day"}]}, "tenants": {"a": {}}, "failPolicy": {}}))["spec"]
    assert (d["backends"][0]["weight"], d["backends"][0]["priority"]) == (1, 0)
    assert d["context"]["history"] == {"enabled": True, "maxTurns": 20, "maxTokens": 4000, "ttl": "1h"}
    assert d["timeouts"] == {"request": "120s", "perTry": "60s"}
    assert d["quotas"]["default"]["tokens"][0]["type"] == "total"
    assert d["quotas"]["default"]["defaultMaxTokens"] == 1024
    assert d["quotas"]["tenants"]["a"]["defaultMaxTokens"] == 1024
    assert d["quotas"]["failPolicy"] == {"rateLimits": "open", "budgets": "closed"}


def _backend(**overrides: Any) -> Json:
    return {"name": "a", "provider": "openai", "endpoint": "https://api.openai.com/v1", "model": "gpt-4o", **overrides}


# (spec overrides, the schema path that must be refused, whether models.py refuses it too:
#  quotas and pricing are not parsed by models.py yet).
INVALID: list[tuple[str, Json, str, bool]] = [
    ("bad-provider", {"backends": [_backend(provider="azure")]}, "backends.0.provider", True),
    ("model-pattern", {"model": "-chat"}, "model", True),
    ("model-too-long", {"model": "m" * 129}, "model", True),
    ("model-space", {"model": "my model"}, "model", True),
    ("missing-backends", {"backends": None}, "spec: 'backends' is a required property", True),
    ("empty-backends", {"backends": []}, "backends", True),
    ("negative-weight", {"backends": [_backend(weight=-1)]}, "backends.0.weight", True),
    ("zero-weight", {"backends": [_backend(weight=0)]}, "backends.0.weight", True),
    ("huge-weight", {"backends": [_backend(weight=10001)]}, "backends.0.weight", True),
    ("priority-17", {"backends": [_backend(priority=17)]}, "backends.0.priority", True),
    ("string-weight", {"backends": [_backend(weight="2")]}, "backends.0.weight", True),
    ("backend-name", {"backends": [_backend(name="Primary")]}, "backends.0.name", True),
    ("no-upstream-model", {"backends": [_backend(model="")]}, "backends.0.model", True),
    ("endpoint-scheme", {"backends": [_backend(endpoint="ftp://x")]}, "backends.0.endpoint", True),
    ("endpoint-userinfo", {"backends": [_backend(endpoint="https://u:p@x.com")]}, "backends.0.endpoint", True),
    ("endpoint-query", {"backends": [_backend(endpoint="https://x.com/v1?k=1")]}, "backends.0.endpoint", True),
    ("credentials-no-key", {"backends": [_backend(credentialsRef={"name": "s"})]}, "backends.0.credentialsRef", True),
    ("duration-words", {"timeouts": {"request": "30 seconds"}}, "timeouts.request", True),
    ("duration-unit", {"timeouts": {"perTry": "30"}}, "timeouts.perTry", True),
    ("duration-zero", {"timeouts": {"request": "0s"}}, "timeouts.request", True),
    ("duration-zero-decimal", {"context": {"history": {"ttl": "0.0h"}}}, "context.history.ttl", True),
    ("duration-days", {"timeouts": {"request": "1d"}}, "timeouts.request", True),
    ("retry-on", {"retry": {"on": ["502"]}}, "retry.on.0", True),
    ("retry-attempts", {"retry": {"attempts": 11}}, "retry.attempts", True),
    ("max-turns", {"context": {"history": {"maxTurns": 0}}}, "context.history.maxTurns", True),
    ("max-tokens", {"context": {"history": {"maxTokens": 1000001}}}, "context.history.maxTokens", True),
    ("max-context", {"context": {"maxContextTokens": -1}}, "context.maxContextTokens", True),
    ("knowledge-text", {"context": {"knowledge": [{"title": "x"}]}}, "context.knowledge.0", True),
    ("profile-name", {"context": {"profile": [{"header": "x-team"}]}}, "context.profile.0", True),
    ("jwt-issuer", {"auth": {"jwt": [{"jwks": "{}"}]}}, "auth.jwt.0", True),
    ("jwks-uri-scheme", {"auth": {"jwt": [{"issuer": "i", "jwksUri": "ftp://idp/keys"}]}}, "auth.jwt.0.jwksUri", True),
    ("tenants-type", {"tenants": "acme"}, "tenants", True),
    ("unknown-field", {"backend": []}, "spec: Additional properties", False),
    ("pricing-decimal", {"backends": [_backend(pricing={"inputPerMillion": "2,50", "outputPerMillion": "1"})]}, "backends.0.pricing.inputPerMillion", False),
    ("pricing-number", {"backends": [_backend(pricing={"inputPerMillion": 2.5, "outputPerMillion": "1"})]}, "backends.0.pricing.inputPerMillion", False),
    ("quota-per", {"quotas": {"default": {"requests": [{"amount": 1, "per": "week"}]}}}, "quotas.default.requests.0.per", False),
    ("quota-amount", {"quotas": {"default": {"requests": [{"amount": 0, "per": "day"}]}}}, "quotas.default.requests.0.amount", False),
    ("quota-token-type", {"quotas": {"default": {"tokens": [{"amount": 5, "per": "day", "type": "cached"}]}}}, "quotas.default.tokens.0.type", False),
    ("quota-concurrent", {"quotas": {"tenants": {"a": {"concurrent": 0}}}}, "quotas.tenants.a.concurrent", False),
    ("budget-zero", {"quotas": {"default": {"budget": {"amount": "0.00", "per": "day"}}}}, "quotas.default.budget.amount", False),
    ("budget-per", {"quotas": {"default": {"budget": {"amount": "5", "per": "week"}}}}, "quotas.default.budget.per", False),
    ("budget-amount-number", {"quotas": {"tenants": {"a": {"budget": {"amount": 5, "per": "day"}}}}}, "quotas.tenants.a.budget.amount", False),
    ("fail-policy", {"quotas": {"failPolicy": {"budgets": "ignore"}}}, "quotas.failPolicy.budgets", False),
]


@pytest.mark.parametrize(("overrides", "where", "models_refuses"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_an_invalid_binding_is_refused_by_the_schema_and_the_controller(overrides: Json, where: str, models_refuses: bool) -> None:
    obj = binding(**overrides)
    obj["spec"] = {k: v for k, v in obj["spec"].items() if v is not None}
    errors = schema_errors("aimodelbindings", obj)
    assert any(e.startswith(f"spec.{where}") or e.startswith(where) for e in errors), errors
    if models_refuses:
        with pytest.raises(SpecError):
            parse_binding(obj)


def _keys_read(function: ast.FunctionDef) -> set[str]:
    """String keys a parse function reads with ``x.get("key")`` or ``x["key"]``."""
    keys: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                keys.add(arg.value)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            keys.add(node.slice.value)
    return keys


def test_every_field_the_controller_reads_is_in_the_schema() -> None:
    functions = {
        n.name: n
        for module in ("models.py", "health.py")
        for n in ast.parse((ROOT / "controller" / module).read_text()).body
        if isinstance(n, ast.FunctionDef)
    }
    read = set().union(*(_keys_read(functions[f]) for f in ("parse_binding", "_backend", "_context", "_jwt", "_secret_ref", "parse_health")))
    read -= {"metadata", "spec", "name", "namespace", "generation"}  # object metadata, not spec
    in_schema = {name for node in walk(binding_spec_schema()) for name in node.get("properties", {})}
    assert read, "the AST scan found nothing: models.py changed shape"
    assert read <= in_schema, sorted(read - in_schema)


def test_cel_rules_state_what_the_schema_alone_cannot() -> None:
    got = rules("aimodelbindings")
    assert "size(self.backends) >= 1" in got
    assert "self.backends.all(b, !has(b.name) || self.backends.exists_one(o, has(o.name) && o.name == b.name))" in got
    assert "(has(self.claim) && self.claim != '') != (has(self.header) && self.header != '')" in got
    assert "[has(self.hs256SecretRef), has(self.jwks), has(self.jwksUri), has(self.discovery) && self.discovery].filter(x, x).size() == 1" in got
    assert any("self.backends.all(b, has(b.pricing))" in r and "budget" in r for r in got)
    assert any(r.startswith("self.matches(") and "tenant|date|model|user" in r for r in got)


def _template_pattern() -> str:
    (rule,) = [r for r in rules("aimodelbindings") if "tenant|date|model|user" in r]
    found = re.fullmatch(r"self\.matches\('(.+)'\)", rule)
    assert found, rule
    return found.group(1)


def _controller_accepts_template(template: str) -> bool:
    try:
        models._check_template(template)
    except SpecError:
        return False
    return True


@pytest.mark.parametrize(
    "template",
    ["", "plain", "${tenant} ${date} ${model} ${user.team-1}", "${nope}", "${tenant", "cost $5", "$$", "$${tenant}",
     "$${nope}", "${}", "${user.}", "${a${tenant}", "}${tenant}}", "$\n${date}", "${\ntenant}", "end $"],
)
def test_the_system_prompt_rule_accepts_the_templates_the_controller_accepts(template: str) -> None:
    # The CEL rule is one RE2 match; RE2 and Python's re agree on this pattern (no backreferences
    # or lookarounds), so Python stands in for CEL, which cannot run here.
    assert bool(re.match(_template_pattern(), template)) == _controller_accepts_template(template)


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(["$", "{", "}", "${", "tenant", "date", "model", "user.", "user", ".", "team", "-", "x", " ", "\n"]), max_size=12).map("".join))
def test_the_system_prompt_rule_agrees_with_the_controller_on_any_text(template: str) -> None:
    assert bool(re.match(_template_pattern(), template)) == _controller_accepts_template(template)


def test_a_binding_status_as_the_controller_writes_it_is_valid() -> None:
    obj = binding()
    obj["status"] = {
        "observedGeneration": 3,
        "model": "chat",
        "backends": 1,
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Valid", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 3},
            {"type": "Ready", "status": "False", "reason": "SecretNotFound", "message": "secret team/openai has no key apiKey", "lastTransitionTime": "2025-01-01T00:00:00Z"},
        ],
    }
    assert schema_errors("aimodelbindings", obj) == []
    obj["status"]["conditions"][0]["status"] = "Yes"
    obj["status"]["conditions"][1]["reason"] = "secret not found"
    assert len(schema_errors("aimodelbindings", obj)) == 2


# --- WorkflowSpec and WorkflowRun ---------------------------------------------------------------


def workflow(*steps: Json) -> Json:
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "WorkflowSpec", "metadata": {"name": "wf"}, "spec": {"steps": list(steps)}}


FULL_WORKFLOW = workflow(
    {
        "name": "fetch",
        "type": "http-request",
        "httpRequest": {"url": "https://example.com/items/${inputs.id}", "method": "POST", "headers": {"accept": "application/json"}, "body": '{"q": 1}'},
        "retry": {"limit": 3, "backoff": {"initial": "500ms", "factor": 1.5, "max": "10s"}},
        "timeout": "30s",
    },
    {
        "name": "summarise",
        "type": "ai-inference",
        "dependsOn": ["fetch"],
        "when": "steps.fetch.outputs.status == 200",
        "inputs": {"body": "${steps.fetch.outputs.body}"},
        "aiInference": {
            "binding": "quickstart-chat",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "${inputs.body}"}],
            "outputSchema": {"type": "object", "properties": {"summary": {"type": "string"}}},
            "maxTokens": 256,
        },
        "onFailure": "continue",
    },
    {"name": "ask", "type": "ai-inference", "aiInference": {"model": "quickstart-chat", "prompt": "Say hi to ${inputs.name}"}},
    {"name": "shape", "type": "transform", "dependsOn": ["summarise", "ask"], "transform": {"expression": "{'s': steps.summarise.outputs.summary}"}},
    {"name": "archive", "type": "container", "dependsOn": ["shape"], "container": {"image": "busybox:1.36", "command": ["sh", "-c"], "args": ["echo done"], "env": [{"name": "MODE", "value": "x"}]}},
)


def test_a_workflow_using_every_field_is_valid() -> None:
    assert schema_errors("workflowspecs", FULL_WORKFLOW) == []


def test_workflow_step_defaults() -> None:
    d = apply_defaults(version_schema(load_crd("workflowspecs")), workflow({"name": "a", "type": "http-request", "httpRequest": {"url": "http://x"}, "retry": {"backoff": {}}}))
    step = d["spec"]["steps"][0]
    assert step["onFailure"] == "fail" and step["httpRequest"]["method"] == "GET"
    assert step["retry"] == {"limit": 0, "backoff": {"initial": "1s", "factor": 2, "max": "60s"}}


STEP = {"name": "a", "type": "transform", "transform": {"expression": "1"}}
INVALID_WORKFLOWS: list[tuple[str, Json, str]] = [
    ("no-steps", {"spec": {}}, "spec: 'steps' is a required property"),
    ("empty-steps", {"spec": {"steps": []}}, "spec.steps"),
    ("step-type", {"spec": {"steps": [{**STEP, "type": "shell"}]}}, "spec.steps.0.type"),
    ("step-name", {"spec": {"steps": [{**STEP, "name": "Step_1"}]}}, "spec.steps.0.name"),
    ("retry-limit", {"spec": {"steps": [{**STEP, "retry": {"limit": 11}}]}}, "spec.steps.0.retry.limit"),
    ("backoff-factor", {"spec": {"steps": [{**STEP, "retry": {"backoff": {"factor": 0.5}}}]}}, "spec.steps.0.retry.backoff.factor"),
    ("backoff-initial", {"spec": {"steps": [{**STEP, "retry": {"backoff": {"initial": "soon"}}}]}}, "spec.steps.0.retry.backoff.initial"),
    ("timeout", {"spec": {"steps": [{**STEP, "timeout": "0ms"}]}}, "spec.steps.0.timeout"),
    ("on-failure", {"spec": {"steps": [{**STEP, "onFailure": "retry"}]}}, "spec.steps.0.onFailure"),
    ("method", {"spec": {"steps": [{"name": "a", "type": "http-request", "httpRequest": {"url": "http://x", "method": "FETCH"}}]}}, "spec.steps.0.httpRequest.method"),
    ("role", {"spec": {"steps": [{"name": "a", "type": "ai-inference", "aiInference": {"model": "m", "messages": [{"role": "tool", "content": "x"}]}}]}}, "spec.steps.0.aiInference.messages.0.role"),
    ("image", {"spec": {"steps": [{"name": "a", "type": "container", "container": {"command": ["x"]}}]}}, "spec.steps.0.container"),
    ("inputs", {"spec": {"steps": [{**STEP, "inputs": {"n": 1}}]}}, "spec.steps.0.inputs.n"),
]


@pytest.mark.parametrize(("override", "where"), [c[1:] for c in INVALID_WORKFLOWS], ids=[c[0] for c in INVALID_WORKFLOWS])
def test_an_invalid_workflow_is_refused(override: Json, where: str) -> None:
    obj = {**workflow(), **override}
    errors = schema_errors("workflowspecs", obj)
    assert any(e.startswith(where) for e in errors), errors


def test_workflow_cel_rules_state_what_the_schema_alone_cannot() -> None:
    got = rules("workflowspecs")
    assert "self.steps.all(s, self.steps.exists_one(o, o.name == s.name))" in got
    assert any("dependsOn" in r and "self.steps.exists(o, o.name == d)" in r for r in got)
    for type_, block in [("ai-inference", "aiInference"), ("http-request", "httpRequest"), ("transform", "transform"), ("container", "container")]:
        assert f"(self.type == '{type_}') == has(self.{block})" in got
    assert "has(self.binding) != has(self.model)" in got
    assert "has(self.messages) != has(self.prompt)" in got
    step_types = version_schema(load_crd("workflowspecs"))["properties"]["spec"]["properties"]["steps"]["items"]["properties"]["type"]["enum"]
    assert len(step_types) == 4


def run(**status: Any) -> Json:
    obj: Json = {"apiVersion": "crdgol.io/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "r1"}, "spec": {"workflowRef": {"name": "wf"}, "inputs": {"id": 7, "tags": ["a"], "nested": {"x": None}}}}
    if status:
        obj["status"] = status
    return obj


def test_a_workflow_run_and_its_status_are_valid() -> None:
    assert schema_errors("workflowruns", run()) == []
    status = {
        "observedGeneration": 1,
        "phase": "Running",
        "startedAt": "2025-01-01T00:00:00Z",
        "steps": [
            {"name": "fetch", "phase": "Succeeded", "attempts": 2, "startedAt": "2025-01-01T00:00:00Z", "finishedAt": "2025-01-01T00:00:01Z", "outputs": {"status": 200, "body": "x"}},
            {"name": "summarise", "phase": "Running", "attempts": 1, "tokens": {"input": 10, "output": 5, "total": 15}, "outputs": "text"},
            {"name": "skipped", "phase": "Skipped", "message": "when was false"},
        ],
        "tokens": {"input": 10, "output": 5, "total": 15},
        "conditions": [{"type": "Succeeded", "status": "Unknown", "reason": "Running", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
    }
    assert schema_errors("workflowruns", run(**status)) == []


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        ({**run(), "spec": {"inputs": {}}}, "spec: 'workflowRef' is a required property"),
        (run(phase="Done"), "status.phase"),
        (run(steps=[{"name": "a", "phase": "Waiting"}]), "status.steps.0.phase"),
        (run(steps=[{"name": "a", "phase": "Running", "attempts": -1}]), "status.steps.0.attempts"),
    ],
    ids=["no-workflow-ref", "run-phase", "step-phase", "attempts"],
)
def test_an_invalid_workflow_run_is_refused(obj: Json, where: str) -> None:
    errors = schema_errors("workflowruns", obj)
    assert any(e.startswith(where) for e in errors), errors


def test_a_runs_spec_is_immutable() -> None:
    assert "self == oldSelf" in rules("workflowruns")
