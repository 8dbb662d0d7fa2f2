"""MCPServer: the typed spec, its render (views, conflicts, secrets), and extproc's /mcp decisions
driven through the real phase machinery without Envoy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from controller.mcp_servers import CRD, McpServerSpec, fields_module_text, parse_mcp_server
from controller.models import SpecError, parse_secret
from controller.render import RenderSettings, render
from crdgol.mcp_contract import LIST_FILTER_HEADER, TENANT_HEADER
from crdgol.request_path import ROUTE_HEADER
from extproc import phases
from extproc.gateway import Downstream
from extproc.mcp_gateway import filter_tool_list
from extproc.policy import PolicyHolder, compile_policy
from extproc.services import Services

ROOT = Path(__file__).resolve().parents[2]


def server(name: str = "crm", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"url": "http://crm.tools.svc:8000/mcp", "toolPrefix": name, **spec},
    }


def key_secret(tenant: str, key: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{tenant}-key", "namespace": namespace, "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": tenant}},
        "stringData": {"key": key},
    }


TOKEN = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "crm-token"}, "stringData": {"token": "tok-3141592653"}}


# --- the typed spec ------------------------------------------------------------------------------


def test_a_full_spec_parses_into_its_typed_form() -> None:
    spec = parse_mcp_server(
        server(
            credentialsRef={"name": "crm-token", "key": "token"},
            tenants=["*", "team-b/bot"],
            tools={"default": ["lookup"], "tenants": {"analyst": ["*"]}},
            quotas={"default": {"requests": [{"amount": 5, "per": "minute"}]}},
            timeout="30s",
        )
    )
    assert isinstance(spec, McpServerSpec)
    assert (spec.endpoint.host, spec.endpoint.port, spec.path, spec.prefix) == ("crm.tools.svc", 8000, "/mcp", "crm")
    assert spec.tenants == ("default/*", "team-b/bot")
    assert spec.default_tools == ("lookup",) and spec.tenant_tools == (("default/analyst", ("*",)),)
    assert spec.credentials_header == "authorization" and spec.timeout == 30.0
    assert spec.quotas.default is not None and spec.quotas.default.limits[0].window_seconds == 60


@pytest.mark.parametrize(
    ("spec", "reason", "says"),
    [
        ({"toolPrefix": "Bad_Prefix"}, "InvalidToolPrefix", "lowercase"),
        ({"toolPrefix": "a--b"}, "InvalidToolPrefix", "single '-'"),
        ({"toolPrefx": "x"}, "UnknownField", "did you mean toolPrefix?"),
        ({"url": "ftp://x/mcp"}, "InvalidEndpoint", "http(s)"),
        ({"url": "http://user:pw@x/mcp"}, "InvalidEndpoint", "credentialsRef"),
        ({"credentialsHeader": "x-crdgol-mcp-tenant"}, "InvalidSpec", "cannot carry a credential"),
        ({"tools": {"default": ["rm -rf"]}}, "InvalidTools", "not a tool name"),
        ({"quotas": {"default": {"tokens": [{"amount": 5, "per": "minute"}]}}}, "UnknownField", "quotas.default.tokens"),
        ({"tenants": ["a/b/c"]}, "InvalidTenant", "namespace"),
    ],
)
def test_a_bad_spec_is_refused_with_a_reason_and_what_to_fix(spec: dict[str, Any], reason: str, says: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_mcp_server(server(**spec))
    assert refused.value.reason == reason and says in refused.value.message


def test_the_field_list_is_generated_from_the_crd() -> None:
    assert (ROOT / "controller" / "mcp_server_fields.py").read_text() == fields_module_text(yaml.safe_load(CRD.read_text()))


# --- the render ----------------------------------------------------------------------------------


def rendered(*objs: dict[str, Any], secrets: tuple[dict[str, Any], ...] = (TOKEN,)) -> Any:
    return render([], [parse_secret(s) for s in secrets], RenderSettings(), mcp_servers=[parse_mcp_server(o) for o in objs])


def test_each_namespace_reaching_servers_gets_one_view_and_its_own_prefixes_win() -> None:
    accepting = key_secret("analyst", "sk-u-analyst")
    accepting["metadata"]["annotations"]["crdgol.io/accept-from"] = "team-b"  # default takes team-b's grants
    result = rendered(
        server("crm", credentialsRef={"name": "crm-token", "key": "token"}),
        server("search", namespace="team-b", tenants=["*", "default/*"]),
        server("crm", namespace="team-b", tenants=["*", "default/*"]),  # its prefix is taken in default's view
        secrets=(TOKEN, accepting),
    )
    views = {v.namespace: list(v.servers) for v in result.snapshot.mcp_tool_views}
    assert views == {"default": ["default/crm", "team-b/search"], "team-b": ["team-b/crm", "team-b/search"]}
    assert result.mcp.reach["team-b/crm"] == ("team-b",) and not result.mcp.problems
    assert {ln["name"] for ln in result.listeners} >= {"crdgol-mcp.default", "crdgol-mcp.team-b"}
    assert result.envoy["bootstrap_extensions"][0]["name"] == "envoy.bootstrap.internal_listener"


def test_a_prefix_used_twice_in_a_namespace_refuses_the_second_server() -> None:
    result = rendered(server("a", toolPrefix="kb"), server("b", toolPrefix="kb"))
    assert result.mcp.problems["default/b"].reason == "PrefixConflict"
    assert [s.key for s in result.snapshot.mcp_tool_servers] == ["default/a"]


def test_a_missing_credential_secret_refuses_the_server() -> None:
    result = rendered(server(credentialsRef={"name": "nope", "key": "token"}))
    assert result.mcp.problems["default/crm"].reason == "SecretNotFound"
    assert not result.snapshot.mcp_tool_views


def test_the_credential_is_never_in_the_config_and_its_cluster_injects_it() -> None:
    result = rendered(server(credentialsRef={"name": "crm-token", "key": "token"}))
    assert "tok-3141592653" not in json.dumps(result.envoy)
    (s,) = result.snapshot.mcp_tool_servers
    assert (s.credential_header, s.credential_value) == ("authorization", "Bearer tok-3141592653")
    (cluster,) = [c for c in result.clusters if c["name"].startswith("crdgol-mcp.default.default.crm.")]
    filters = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    # One message per request: Envoy injects it from an SDS secret, served apart from the config.
    injected = filters[1]["typed_config"]["credential"]["typed_config"]
    assert injected["header"] == "authorization" and injected["credential"]["name"] == "crdgol-mcp-credential.default.crm"
    (secret,) = [x for x in result.secrets if x["name"] == "crdgol-mcp-credential.default.crm"]
    assert secret["generic_secret"]["secret"]["inline_string"] == "Bearer tok-3141592653"


def test_a_server_route_sends_the_servers_own_session_and_hides_it_from_the_client() -> None:
    result = rendered(server(credentialsRef={"name": "crm-token", "key": "token"}))
    (route,) = [r for r in result.mcp.routes if r["name"] == "crdgol-mcp.default~crm"]
    assert route["match"]["dynamic_metadata"][0]["value"]["string_match"]["exact"] == "crdgol-mcp.default~crm"
    assert route["route"]["cluster"].startswith("crdgol-mcp.default.default.crm.")
    assert {"authorization", "x-api-key", "mcp-session-id", TENANT_HEADER} <= set(route["request_headers_to_remove"])
    (added,) = route["request_headers_to_add"]
    assert added["header"] == {"key": "mcp-session-id", "value": "%DYNAMIC_METADATA(crdgol.route:mcp_server_session)%"}
    # The client gets back its own id; never the server's, nor a server's credential challenge.
    assert set(route["response_headers_to_remove"]) == {"mcp-session-id", "www-authenticate"}
    assert route["response_headers_to_add"][0]["header"]["value"] == "%DYNAMIC_METADATA(crdgol.route:mcp_client_session)%"


def test_without_one_message_the_credential_cluster_asks_extproc_for_it() -> None:
    objs = [server(credentialsRef={"name": "crm-token", "key": "token"})]
    result = render([], [parse_secret(TOKEN)], RenderSettings(one_message=False), mcp_servers=[parse_mcp_server(o) for o in objs])
    assert "tok-3141592653" not in json.dumps(result.envoy) and not result.secrets
    (cluster,) = [c for c in result.clusters if c["name"].startswith("crdgol-mcp.default.default.crm.")]
    filters = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
    meta = filters[1]["typed_config"]["grpc_service"]["initial_metadata"]
    assert meta == [{"key": "x-crdgol-mcp-server", "value": "default/crm"}]


# --- extproc's decisions -------------------------------------------------------------------------


KEYS = {"analyst": "sk-u-analyst", "intern": "sk-u-intern", "bot": "sk-u-bot"}


@pytest.fixture
def services() -> Services:
    result = rendered(
        server(
            credentialsRef={"name": "crm-token", "key": "token"},
            tools={"default": ["lookup"], "tenants": {"analyst": ["*"]}},
            quotas={"tenants": {"bot": {"requests": [{"amount": 1, "per": "day"}]}}},
        ),
        secrets=(TOKEN, *(key_secret(t, k) for t, k in KEYS.items())),
    )
    return Services(policy=PolicyHolder(compile_policy(result.snapshot)))


def headers_msg(method: str, key: str | None, extra: dict[str, str] | None = None) -> ep.ProcessingRequest:
    hs = {":method": method, ":path": "/mcp", "content-type": "application/json", **(extra or {})}
    if key:
        hs["authorization"] = f"Bearer {key}"
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]))
    )


def body_msg(doc: object) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=orjson.dumps(doc), end_of_stream=True))


async def drive(services: Services, *msgs: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    async def feed() -> AsyncIterator[ep.ProcessingRequest]:
        for m in msgs:
            yield m

    return [r async for r in phases.run(feed(), Downstream(services), capacity=services.capacity)]


def call(tool: str, rid: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": {}}}


def refusal(out: list[ep.ProcessingResponse]) -> tuple[int, dict[str, Any]]:
    imm = out[-1].immediate_response
    return imm.status.code, orjson.loads(imm.body)


def set_headers(resp: ep.ProcessingResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in resp.request_body.response.header_mutation.set_headers}


async def test_an_allowed_call_goes_straight_to_its_server_with_the_tenant_and_no_client_credential(services: Services) -> None:
    out = await drive(services, headers_msg("POST", KEYS["intern"], {"x-crdgol-mcp-tenant": "default/analyst"}), body_msg(call("crm__lookup")))
    removed = set(out[0].request_headers.response.header_mutation.remove_headers)
    assert {"authorization", "x-crdgol-mcp-tenant"} <= removed  # a spoofed tenant is dropped too
    assert {k: v for k, v in set_headers(out[1]).items() if k != "content-length"} == {ROUTE_HEADER: "crdgol-mcp.default~crm", TENANT_HEADER: "default/intern"}
    # Not through the view's mcp_router: the server gets its own name for the tool.
    assert orjson.loads(out[1].request_body.response.body_mutation.body)["params"]["name"] == "lookup"
    # A tools/list goes to the view (mcp_router fans it out).
    out = await drive(services, headers_msg("POST", KEYS["intern"]), body_msg({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
    assert set_headers(out[1])[ROUTE_HEADER] == "crdgol-mcp.default"


def body_first(doc: object, key: str | None) -> ep.ProcessingRequest:
    """A /mcp body as Envoy sends it on the one-message path: the headers as request attributes."""
    values = {"request.headers['content-type']": "application/json", "request.path": "/mcp", "request.method": "POST"}
    if key:
        values["request.headers['authorization']"] = f"Bearer {key}"
    req = body_msg(doc)
    req.attributes["envoy.filters.http.ext_proc"].update(values)
    return req


async def test_one_message_names_the_view_and_tenant_in_metadata_and_sets_no_header(services: Services) -> None:
    (out,) = await drive(services, body_first({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, KEYS["intern"]))
    mutation = out.request_body.response.header_mutation
    # Envoy drops header changes from a body reply here: the view's route sets them from this.
    assert not mutation.set_headers and out.request_body.response.clear_route_cache
    route = dict(out.dynamic_metadata.fields["crdgol.route"].struct_value)
    assert route == {"route": "crdgol-mcp.default", "mcp_tenant": "default/intern", "mcp_list": "1"}
    (out,) = await drive(services, body_first(call("crm__lookup"), KEYS["intern"]))
    route = dict(out.dynamic_metadata.fields["crdgol.route"].struct_value)
    assert route == {"route": "crdgol-mcp.default~crm", "mcp_tenant": "default/intern", "mcp_server_session": "", "mcp_client_session": ""}
    status, body = refusal(await drive(services, body_first(call("crm__delete", rid=5), KEYS["intern"])))
    assert status == 403 and body["id"] == 5
    status, body = refusal(await drive(services, body_first(call("crm__lookup"), None)))
    assert status == 401 and body["error"]["code"] == -32001


async def test_a_tool_the_tenant_may_not_call_is_a_403_json_rpc_error_with_its_id(services: Services) -> None:
    status, body = refusal(await drive(services, headers_msg("POST", KEYS["intern"]), body_msg(call("crm__delete", rid=42))))
    assert status == 403 and body["id"] == 42 and body["error"]["code"] == -32003
    assert body["error"]["data"] == {"type": "permission_error", "code": "tool_not_allowed"}


async def test_a_tool_of_no_server_is_unknown_not_forbidden(services: Services) -> None:
    status, body = refusal(await drive(services, headers_msg("POST", KEYS["analyst"]), body_msg(call("billing__charge"))))
    assert status == 400 and body["error"]["code"] == -32602 and "unknown tool" in body["error"]["message"]


async def test_the_second_call_over_a_quota_of_one_is_a_429(services: Services) -> None:
    assert not (await drive(services, headers_msg("POST", KEYS["bot"]), body_msg(call("crm__lookup"))))[-1].HasField("immediate_response")
    out = await drive(services, headers_msg("POST", KEYS["bot"]), body_msg(call("crm__lookup")))
    status, body = refusal(out)
    headers = {h.header.key: h.header.raw_value.decode() for h in out[-1].immediate_response.headers.set_headers}
    assert status == 429 and body["error"]["code"] == -32029 and int(headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("method", "key", "body", "status", "code"),
    [
        ("POST", None, None, 401, -32001),
        ("POST", "sk-wrong", None, 401, -32001),
        ("GET", KEYS["intern"], None, 405, -32600),
        ("DELETE", KEYS["intern"], None, 400, -32600),  # ends a session: names none
        ("POST", KEYS["intern"], b"{not json", 400, -32700),
        ("POST", KEYS["intern"], [call("crm__lookup")], 400, -32600),
        ("POST", KEYS["intern"], {"jsonrpc": "2.0", "id": 3, "method": "sampling/createMessage"}, 400, -32601),
    ],
)
async def test_bad_requests_get_json_rpc_errors_with_the_right_status(
    services: Services, method: str, key: str | None, body: object, status: int, code: int
) -> None:
    msgs = [headers_msg(method, key)]
    if body is not None:
        msgs.append(ep.ProcessingRequest(request_body=ep.HttpBody(body=body if isinstance(body, bytes) else orjson.dumps(body), end_of_stream=True)))
    got_status, got = refusal(await drive(services, *msgs))
    assert (got_status, got["error"]["code"]) == (status, code) and got["error"]["message"]


async def test_a_tools_list_is_marked_for_filtering_and_ping_is_answered_here(services: Services) -> None:
    out = await drive(services, headers_msg("POST", KEYS["intern"]), body_msg({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
    assert set_headers(out[1])[LIST_FILTER_HEADER] == "1"
    status, body = refusal(await drive(services, headers_msg("POST", KEYS["intern"]), body_msg({"jsonrpc": "2.0", "id": 9, "method": "ping"})))
    assert status == 200 and body == {"jsonrpc": "2.0", "id": 9, "result": {}}


def test_the_tool_list_keeps_only_what_the_tenant_may_call(services: Services) -> None:
    policy = services.current.mcp
    assert policy is not None
    view = policy.views["default"]
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": n} for n in ("crm__lookup", "crm__delete", "other__x")]}}
    kept = orjson.loads(filter_tool_list(orjson.dumps(answer), view, "default/intern"))
    assert [t["name"] for t in kept["result"]["tools"]] == ["crm__lookup"]
    sse = b"event: message\ndata: " + orjson.dumps(answer) + b"\n\n"
    assert b"crm__delete" in filter_tool_list(sse, view, "default/analyst") and b"crm__delete" not in filter_tool_list(sse, view, "default/intern")
    broken = orjson.loads(filter_tool_list(b"<html>oops</html>", view, "default/intern"))
    assert broken["error"]["data"]["code"] == "bad_tool_list"  # never passed on unfiltered


async def test_the_call_forwarded_is_the_one_checked_with_the_servers_tool_name(services: Services) -> None:
    # A key given twice: parsers disagree on which wins, so only the checked message goes on.
    raw = b'{"id":"crm__delete","params":{"arguments":{"q":"crm__delete"},"name":"crm__delete","name":"crm__lookup"},"jsonrpc":"2.0","method":"tools/call"}'
    out = await drive(services, headers_msg("POST", KEYS["intern"]), ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))
    forwarded = out[1].request_body.response.body_mutation.body
    assert forwarded.count(b'"name"') == 1
    assert orjson.loads(forwarded) == {"params": {"name": "lookup", "arguments": {"q": "crm__delete"}}, "jsonrpc": "2.0", "id": "crm__delete", "method": "tools/call"}
    assert set_headers(out[1])["content-length"] == str(len(forwarded))


async def test_a_method_given_twice_cannot_fetch_an_unfiltered_tool_list(services: Services) -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"initialize","params":{}}'
    out = await drive(services, headers_msg("POST", KEYS["intern"]), ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))
    assert orjson.loads(out[1].request_body.response.body_mutation.body)["method"] == "initialize"
    assert out[1].request_body.response.body_mutation.body.count(b"method") == 1


def test_merged_resource_and_prompt_lists_keep_only_the_servers_the_tenant_reaches() -> None:
    result = rendered(server("crm"), server("hr", tenants=["analyst"]), secrets=(TOKEN, *(key_secret(t, k) for t, k in KEYS.items())))
    policy = compile_policy(result.snapshot).mcp
    assert policy is not None
    view = policy.views["default"]
    for key, field, items in (
        ("resources", "uri", ["crm+note://a", "hr+note://b", "other+note://c", "note://no-server"]),
        ("resourceTemplates", "uriTemplate", ["crm+note://items/{id}", "hr+note://items/{id}"]),
        ("prompts", "name", ["crm__review", "hr__review", "review"]),
    ):
        answer = {"jsonrpc": "2.0", "id": 1, "result": {key: [{field: i} for i in items]}}
        kept = {t: [x[field] for x in orjson.loads(filter_tool_list(orjson.dumps(answer), view, t))["result"][key]] for t in ("default/intern", "default/analyst")}
        assert kept == {"default/intern": [items[0]], "default/analyst": items[:2]}, key
    # Two lists in one answer cannot be read as either: an error, never an unfiltered list.
    both = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [], "prompts": [{"name": "hr__review"}]}}
    assert orjson.loads(filter_tool_list(orjson.dumps(both), view, "default/intern"))["error"]["data"]["code"] == "bad_tool_list"


async def test_a_resource_or_prompt_goes_straight_to_its_server_with_its_own_name(services: Services) -> None:
    read = {"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": "crm+note://items/7"}}
    out = await drive(services, headers_msg("POST", KEYS["intern"]), body_msg(read))
    assert set_headers(out[1])[ROUTE_HEADER] == "crdgol-mcp.default~crm"
    assert orjson.loads(out[1].request_body.response.body_mutation.body)["params"] == {"uri": "note://items/7"}
    get = {"jsonrpc": "2.0", "id": 5, "method": "prompts/get", "params": {"name": "crm__review", "arguments": {"code": "x"}}}
    out = await drive(services, headers_msg("POST", KEYS["intern"]), body_msg(get))
    assert orjson.loads(out[1].request_body.response.body_mutation.body)["params"] == {"name": "review", "arguments": {"code": "x"}}
    for unknown in ({"uri": "hr+note://x"}, {"uri": "note://x"}, {"uri": "crm+:no-authority"}):
        status, body = refusal(await drive(services, headers_msg("POST", KEYS["intern"]), body_msg({**read, "params": unknown})))
        assert (status, body["error"]["code"], body["error"]["data"]["code"]) == (400, -32602, "unknown_resource"), unknown
