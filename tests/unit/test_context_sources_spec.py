"""spec.context.mcpServers / mcpSources: parsed into typed specs, rendered into the policy snapshot
(credential included, and only there), refused with a reason naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from controller.envoy_config import RenderSettings
from controller.models import SpecError, parse_binding, parse_secret
from controller.render import render
from extproc.policy import compile_policy
from tests.unit.test_crds import (
    ROOT,
    apply_defaults,
    load_crd,
    rules,
    schema_errors,
    version_schema,
)

TOKEN = "crm-token-0b5e"


def binding(**context: Any) -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "b", "namespace": "ns"},
        "spec": {
            "model": "m",
            "backends": [{"name": "a", "provider": "openai", "endpoint": "https://api.example.com/v1", "model": "gpt"}],
            "context": context,
        },
    }


SERVERS = [{"name": "crm", "url": "http://crm.internal:8000/mcp", "credentialsRef": {"name": "crm", "key": "token"}, "timeout": "300ms", "cacheTTL": "30s"}]
SOURCES = [
    {"server": "crm", "title": "Customer", "resource": "crm://customers/${user.customer}", "onFailure": "refuse", "maxTokens": 500},
    {"server": "crm", "prompt": {"name": "triage", "arguments": {"topic": "${model} for ${tenant}"}}},
]
SECRET = parse_secret({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "crm", "namespace": "ns"}, "stringData": {"token": TOKEN}})


def test_servers_and_sources_render_into_the_snapshot_with_the_credential_there_only() -> None:
    spec = parse_binding(binding(mcpServers=SERVERS, mcpSources=SOURCES))
    result = render([spec], [SECRET], RenderSettings())
    assert not result.problems
    ctx = result.snapshot.bindings[0].context
    (srv,) = ctx.mcp_servers
    assert (srv.name, srv.url, srv.auth_header, srv.auth_value) == ("crm", "http://crm.internal:8000/mcp", "authorization", f"Bearer {TOKEN}")
    assert (srv.timeout_ms, srv.cache_ttl_ms) == (300, 30000)
    first, second = ctx.mcp_sources
    assert (first.resource_uri, first.refuse_on_failure, first.max_tokens) == ("crm://customers/${user.customer}", True, 500)
    assert (second.prompt_name, dict(second.prompt_arguments), second.refuse_on_failure) == ("triage", {"topic": "${model} for ${tenant}"}, False)
    assert TOKEN not in json.dumps(result.envoy)
    # extproc compiles it; the credential is hidden from repr.
    policy = compile_policy(result.snapshot)
    (binding_,) = policy.models["m"]
    src = binding_.context.mcp_sources[0]
    assert src.server.auth_headers == (("authorization", f"Bearer {TOKEN}"),)
    assert TOKEN not in repr(src)
    assert binding_.context.active


def test_a_custom_credentials_header_carries_the_value_as_is() -> None:
    servers = [{**SERVERS[0], "credentialsHeader": "X-Api-Key"}]
    result = render([parse_binding(binding(mcpServers=servers, mcpSources=SOURCES))], [SECRET], RenderSettings())
    srv = result.snapshot.bindings[0].context.mcp_servers[0]
    assert (srv.auth_header, srv.auth_value) == ("x-api-key", TOKEN)


def test_defaults_are_one_second_a_minute_skip_and_2000_tokens() -> None:
    spec = parse_binding(binding(mcpServers=[{"name": "crm", "url": "https://crm.example/mcp"}], mcpSources=[{"server": "crm", "resource": "crm://x"}]))
    (srv,), (src,) = spec.context.mcp.servers, spec.context.mcp.sources
    assert (srv.timeout, srv.cache_ttl, srv.credentials) == (1.0, 60.0, None)
    assert (src.refuse_on_failure, src.max_tokens, src.title) == (False, 2000, "crm://x")


def test_a_missing_secret_refuses_the_binding_naming_the_field() -> None:
    result = render([parse_binding(binding(mcpServers=SERVERS, mcpSources=SOURCES))], [], RenderSettings())
    problem = result.problems["ns/b"]
    assert problem.reason == "SecretNotFound" and "spec.context.mcpServers[0].credentialsRef" in problem.message


def test_another_namespaces_secret_is_not_sent_to_a_server_its_owner_did_not_list() -> None:
    shared = parse_secret(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "crm", "namespace": "other", "annotations": {"crdgol.io/share-with": "ns"}},
            "stringData": {"token": TOKEN},
        }
    )
    servers = [{**SERVERS[0], "credentialsRef": {"name": "crm", "key": "token", "namespace": "other"}}]
    result = render([parse_binding(binding(mcpServers=servers, mcpSources=SOURCES))], [shared], RenderSettings())
    assert result.problems["ns/b"].reason == "CrossNamespaceReference"
    assert TOKEN not in result.problems["ns/b"].message


@pytest.mark.parametrize(
    ("context", "field"),
    [
        ({"mcpServers": [{"name": "crm", "url": "ftp://x/mcp"}]}, "spec.context.mcpServers[0].url"),
        ({"mcpServers": [{"name": "crm", "url": "http://user:pw@x/mcp"}]}, "spec.context.mcpServers[0].url"),
        ({"mcpServers": [{"name": "crm", "url": "http://169.254.169.254/mcp"}]}, "spec.context.mcpServers[0].url"),
        ({"mcpServers": [{"name": "Bad Name", "url": "http://x/mcp"}]}, "spec.context.mcpServers[0].name"),
        ({"mcpServers": [{"name": "crm", "url": "http://x/mcp", "timeout": "1600ms"}]}, "spec.context.mcpServers[0].timeout"),
        ({"mcpServers": [{"name": "crm", "url": "http://x/mcp", "cacheTTL": "25h"}]}, "spec.context.mcpServers[0].cacheTTL"),
        ({"mcpServers": [{"name": "crm", "url": "http://x/mcp", "credentialsHeader": "host"}]}, "spec.context.mcpServers[0].credentialsHeader"),
        ({"mcpServers": [{"name": "crm", "url": "http://x/mcp"}] * 2}, "spec.context.mcpServers[1].name"),
        ({"mcpSources": [{"server": "nope", "resource": "crm://x"}]}, "spec.context.mcpSources[0].server"),
        ({"mcpServers": SERVERS, "mcpSources": [{"server": "crm"}]}, "spec.context.mcpSources[0]"),
        ({"mcpServers": SERVERS, "mcpSources": [{"server": "crm", "resource": "crm://${secret}"}]}, "spec.context.mcpSources[0].resource"),
        ({"mcpServers": SERVERS, "mcpSources": [{"server": "crm", "prompt": {"name": "p", "arguments": {"a": "${x"}}}]}, "spec.context.mcpSources[0].prompt.arguments.a"),
        ({"mcpServers": SERVERS, "mcpSources": [{"server": "crm", "resource": "crm://x", "onFailure": "retry"}]}, "spec.context.mcpSources[0].onFailure"),
        ({"mcpServers": SERVERS, "mcpSources": [{"server": "crm", "resource": "crm://x", "maxTokens": 0}]}, "spec.context.mcpSources[0].maxTokens"),
        ({"mcpServers": [{"name": "crm", "url": "http://x/mcp", "token": "t"}]}, "spec.context.mcpServers[0].token"),
    ],
)
def test_bad_config_is_refused_with_a_reason_naming_the_field(context: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_binding(binding(**context))
    assert field in err.value.message
    assert "pw" not in err.value.message


def test_the_example_is_valid_against_the_crd_and_its_defaults_mean_what_the_controller_assumes() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "context-from-mcp" / "binding.yaml").read_text())
    assert schema_errors("aimodelbindings", obj) == []
    minimal = binding(mcpServers=[{"name": "crm", "url": "http://crm/mcp"}], mcpSources=[{"server": "crm", "resource": "crm://x"}])
    defaulted = apply_defaults(version_schema(load_crd("aimodelbindings")), minimal)
    assert defaulted != minimal
    assert parse_binding(defaulted) == parse_binding(minimal)
    # The schema refuses a source with both or neither of resource and prompt only by its CEL rule.
    assert "has(self.resource) != has(self.prompt)" in rules("aimodelbindings")
