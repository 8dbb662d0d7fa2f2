"""``/mcp``: MCP servers served through the gateway, with the callers' API keys and JWTs.

extproc makes every decision; Envoy's ``mcp_router`` does the fan-out federation (see
``controller.mcp_render``). A ``POST /mcp`` costs one ext_proc message (``crdgol.request_path``):
the body, with the headers read below as request attributes; the headers step then runs on those,
its header changes left to the route (the body answer names the route, the tenant, the list mark
and the sessions in dynamic metadata, ``_forward``). Other methods come with their headers:

* **headers**: the caller authenticates like any model caller (401 otherwise) and reaches its
  namespace's view; the client's credential and any ``x-crdgol-*`` header it sent are removed.
  A ``Mcp-Session-Id`` must be the caller's and not ended (``extproc.mcp_sessions``: 403, 404).
  ``DELETE`` ends the session on every server of it (``extproc.mcp_sessions``; Envoy's
  ``mcp_router`` does not). ``GET`` (a standalone server-to-client stream, which ``mcp_router``
  does not offer) gets 405 from Envoy itself (``controller.mcp_render``), as the MCP transport
  allows; any other method gets 405 here. Notifications a server sends while answering a request
  stream in that answer.
* **body** (one JSON-RPC message, forwarded re-written as extproc read it, so that Envoy's
  parser and the server cannot read another method or tool than extproc checked):
  ``tools/call`` names ``<prefix>__<tool>``; a tool of no server the caller may reach is an
  unknown tool (400, JSON-RPC -32602), a tool the caller's tenant may not call is 403, a spent
  tool-call quota is 429 with ``Retry-After``. An admitted call goes **straight to its server**
  (the server's own route, not the view's internal listener), with the server's own tool name and
  session; so do ``resources/read`` (``<prefix>+<scheme>://...``) and ``prompts/get``
  (``<prefix>__<name>``) of a server the tenant reaches. ``initialize``,
  ``notifications/initialized`` and the list methods (tools, resources, resource templates,
  prompts) go to the view, whose ``mcp_router`` fans them out to every server of it, with the
  tenant (which it binds the composite session to) in an internal header. A server's credential
  is set on its own requests by Envoy from an SDS secret (one-message path) or by
  ``ServerCredential`` (below). ``ping`` and ``logging/setLevel`` are answered here; other
  notifications are accepted (202) and dropped; any other method is -32601.
* **response**: extproc does not see answers on this path (they stream from the server or
  ``mcp_router`` to the client), except a merged list: the request carries
  ``LIST_FILTER_HEADER``, whose route in the view enables a second ext_proc filter
  (``ToolListFilter``) that reads the merged list and removes every tool the tenant may not call
  and every resource, template and prompt of a server it does not reach (an answer that cannot be
  read is replaced by an error: never passed through unfiltered). Tool calls are counted when
  they are decided, by tenant, server, tool and outcome.

Refusals are JSON-RPC errors in MCP's shape, ``{"jsonrpc": "2.0", "id", "error": {"code",
"message", "data": {"type", "code"}}}``, with the HTTP status that says the same (the MCP SDKs
read the JSON-RPC error from a 4xx body).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from crdgol import tenancy
from crdgol.mcp_contract import (
    CLIENT_SESSION_KEY,
    LIST_FILTER_HEADER,
    LIST_KEY,
    MCP_PATH,
    SERVER_SESSION_KEY,
    TENANT_HEADER,
    TENANT_KEY,
    quota_key,
    server_route,
)
from crdgol.replies import INTERNAL_HEADER_PREFIX
from crdgol.request_path import NO_OP_HEADER, ROUTE_HEADER, ROUTE_KEY, ROUTE_NAMESPACE
from extproc.admission import QuotaExceeded, ratelimit_headers
from extproc.auth import credential_from_headers
from extproc.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unavailable,
    UnsupportedMediaType,
)
from extproc.mcp_metrics import UNKNOWN
from extproc.mcp_policy import ToolServer, View
from extproc.mcp_sessions import PROTOCOL_HEADER, SESSION_HEADER, entry_key, parse_session_id
from extproc.phases import PASS, Continue, Handler, Headers, Reply, Respond
from extproc.quota import Demand, quota_scope
from extproc.quota_store import check
from extproc.services import Services

log = logging.getLogger(__name__)

# JSON-RPC error codes: the spec's own, and the server-error range for what HTTP says by status.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
UNAUTHENTICATED = -32001
FORBIDDEN = -32003
RATE_LIMITED = -32029
SERVER_ERROR = -32000

# Forwarded to every server of the view by mcp_router.
# The list methods among them: their merged answer is filtered by the tenant (``ToolListFilter``).
_LISTS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list"})
_FAN_OUT = frozenset({"initialize", "notifications/initialized"}) | _LISTS


def handles(path: str) -> bool:
    return path == MCP_PATH


def choose(services: Services, method: str) -> Handler:
    return ToolGateway(services, method)


class UnknownTool(BadRequest):
    code = "unknown_tool"


class MethodNotFound(BadRequest):
    code = "method_not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


def _rpc_code(exc: GatewayError) -> int:
    if exc.code == "invalid_json":
        return PARSE_ERROR
    if isinstance(exc, UnknownTool) or exc.code == "invalid_params":
        return INVALID_PARAMS
    if isinstance(exc, MethodNotFound):
        return METHOD_NOT_FOUND
    if isinstance(exc, SessionNotFound):
        return INVALID_REQUEST
    return {400: INVALID_REQUEST, 401: UNAUTHENTICATED, 403: FORBIDDEN, 405: INVALID_REQUEST, 415: INVALID_REQUEST, 429: RATE_LIMITED}.get(
        exc.status, SERVER_ERROR
    )


def rpc_error(request_id: object, code: int, message: str, data: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data:
        error["data"] = data
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "error": error})


def rpc_result(request_id: object, result: dict[str, Any]) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": request_id, "result": result})


def _dumps(msg: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(msg)
    except orjson.JSONEncodeError:  # orjson reads 1024 levels of nesting but writes only 254
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from None


def _request_id(msg: dict[str, Any]) -> object:
    rid = msg.get("id")
    return rid if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)) else None


class ToolGateway(Handler):
    """One HTTP request to /mcp (one JSON-RPC message)."""

    def __init__(self, services: Services, http_method: str) -> None:
        self.services = services
        self.http_method = http_method
        self.request_id: object = None
        self.method = ""
        self.view: View | None = None
        self.tenant = ""
        self.tool_label = ""
        self.session_id = ""  # the client's Mcp-Session-Id
        self.server_sessions: dict[str, str] = {}  # toolPrefix -> that server's session behind it
        self.metrics = services.metrics.mcp
        # One message (``crdgol.request_path``): the headers came as attributes with the body,
        # the answer to which can set no header; the view's route sets them from the metadata.
        self.one_message = False

    @property
    def tenant_label(self) -> str:
        """The tenant as a metrics label: bounded by the policy (``Policy.metric_tenant``)."""
        return self.services.current.metric_tenant(self.tenant)

    # --- refusals ------------------------------------------------------------------------------

    def error_reply(self, exc: GatewayError) -> Respond:
        self.services.metrics.rejections.labels(exc.code).inc()
        self.metrics.messages.labels(self.metrics.method_label(self.method), str(exc.status)).inc()
        headers = {"content-type": "application/json", **exc.headers()}
        if exc.status == 401:
            headers["www-authenticate"] = 'Bearer realm="crdgol"'
        if exc.status == 405:
            headers["allow"] = "POST, DELETE"
        body = rpc_error(self.request_id, _rpc_code(exc), exc.message, {"type": exc.type, "code": exc.code})
        return Respond(exc.status, body, headers)

    def _answer(self, status: int, body: bytes) -> Respond:
        self.metrics.messages.labels(self.metrics.method_label(self.method), str(status)).inc()
        return Respond(status, body, {"content-type": "application/json"} if body else {})

    # --- request -------------------------------------------------------------------------------

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        credential = credential_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        identity = await self.services.authenticate(credential)  # waits for remote keys when due
        if self.http_method not in ("POST", "DELETE"):
            self.method = self.http_method
            raise MethodNotAllowed(
                f"{MCP_PATH} accepts POST (one JSON-RPC message per request) and DELETE (to end a session); "
                "the gateway opens no standalone server-to-client stream (GET)"
            )
        policy = self.services.current.mcp
        view, tenant, ambiguous = policy.view_for(identity.tenants) if policy is not None else (None, "", False)
        if ambiguous:
            raise Forbidden("this credential acts as tenants of several namespaces that serve MCP tools: use a credential of one", code="ambiguous_tenant")
        if view is None:
            raise Forbidden(f"no MCP server is served to tenant {' or '.join(identity.tenants)}", code="no_mcp_servers")
        self.view, self.tenant = view, tenant
        self.session_id = headers.get(SESSION_HEADER, "")
        if self.http_method == "DELETE":
            self.method = "DELETE"
            if not self.session_id:
                raise BadRequest(f"DELETE {MCP_PATH} ends a session: send its Mcp-Session-Id")
            return await self._end(await self._session(view), headers.get(PROTOCOL_HEADER, ""))
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("application/json"):
            raise UnsupportedMediaType(f"send the JSON-RPC message as application/json, not {ctype or 'no content type'!r}")
        if end_of_stream:
            raise BadRequest("the request body is empty: send one JSON-RPC message")
        # The client's credential stays here; so does anything it sent in the gateway's own headers.
        remove = [h for h in headers if h in ("authorization", "x-api-key") or h.startswith(INTERNAL_HEADER_PREFIX)]
        return Continue(remove_headers=remove)

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if isinstance(msg, list):
            raise BadRequest("send one JSON-RPC message per request (batches are not part of MCP)")
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            raise BadRequest('the body must be a JSON-RPC 2.0 message: {"jsonrpc": "2.0", "method": ...}')
        self.request_id = _request_id(msg)
        method = msg.get("method")
        if not isinstance(method, str):
            raise BadRequest("the gateway relays requests and notifications, not answers to a server's requests")
        self.method = method
        is_request = "id" in msg
        assert self.view is not None
        # Checked here, where a refusal can carry the request's id.
        self.server_sessions = {server.prefix: sid for server, sid in await self._session(self.view)}
        match method:
            case "tools/call":
                return await self._tool_call(msg, self.view)
            case "ping":
                return self._answer(200, rpc_result(self.request_id, {}))
            case "logging/setLevel":
                return self._answer(200, rpc_result(self.request_id, {}))
            case _ if method in _FAN_OUT:
                # Re-written like a tool call (below): Envoy's parser must not read another method.
                return self._forward(self.view, _dumps(msg))
            case "resources/read" | "prompts/get":
                return self._server_item(msg, self.view)
            case _ if not is_request:
                return self._answer(202, b"")  # a notification no server needs (cancelled, progress, roots)
            case _:
                raise MethodNotFound(
                    f"the gateway does not serve the method {method!r}: it federates tools, resources and prompts "
                    "(tools/list, tools/call, resources/list, resources/templates/list, resources/read, prompts/list, prompts/get)"
                )

    async def _session(self, view: View) -> list[tuple[ToolServer, str]]:
        """The servers' sessions behind the client's ``Mcp-Session-Id`` (none without one), once
        it is known to be the caller's and not ended (``extproc.mcp_sessions``)."""
        if not self.session_id:
            return []
        parsed = parse_session_id(self.session_id)
        if parsed is None:
            raise SessionNotFound("no MCP session has this Mcp-Session-Id: initialize a new session")
        if parsed.subject != self.tenant:
            raise Forbidden("this MCP session belongs to another caller", code="session_not_yours")
        sessions = [(view.by_prefix[p], sid) for p, sid in parsed.servers if p in view.by_prefix]
        keys = [entry_key(server, sid) for server, sid in sessions]
        match await self.services.mcp_sessions.claim(keys, self.tenant, self.services.wall()):
            case "ended":
                raise SessionNotFound("this MCP session has ended: initialize a new session")
            case "foreign":
                raise Forbidden("this MCP session belongs to another caller", code="session_not_yours")
        return sessions

    async def _end(self, sessions: list[tuple[ToolServer, str]], protocol: str) -> Respond:
        """DELETE: the session is ended here first (any later request with its id gets 404), then
        on each of its servers."""
        mcp = self.services.mcp_sessions
        await mcp.end([entry_key(server, sid) for server, sid in sessions], self.services.wall())
        await mcp.end_on_servers(sessions, protocol)
        return self._answer(200, b"")

    def _forward(self, view: View, body: bytes, server: ToolServer | None = None) -> Continue:
        """Send ``body`` (the message as extproc read it, re-written) on to the caller's view, or
        with ``server`` (a tools/call) straight to that server.

        The route, the tenant, the list mark and the sessions go as dynamic metadata (the
        gateway's own config routes on it, and its route sets the headers from it, replacing any
        a client sent) and, when extproc saw the headers, as headers too (a config that routes on
        the header)."""
        self.metrics.messages.labels(self.metrics.method_label(self.method), "forwarded").inc()
        name = view.route if server is None else server_route(view.namespace, server.prefix)
        route: dict[str, str | float] = {ROUTE_KEY: name, TENANT_KEY: self.tenant}
        if self.method in _LISTS:
            route[LIST_KEY] = "1"
        server_session = self.server_sessions.get(server.prefix, "") if server is not None else ""
        if server is not None:
            route[SERVER_SESSION_KEY] = server_session
            route[CLIENT_SESSION_KEY] = self.session_id
        metadata = {ROUTE_NAMESPACE: route}
        if self.one_message:
            # Envoy honours clear_route_cache in a body reply only with a header mutation in it.
            return Continue(body=body, remove_headers=[NO_OP_HEADER], clear_route_cache=True, dynamic_metadata=metadata)
        set_headers = {ROUTE_HEADER: name, TENANT_HEADER: self.tenant, "content-length": str(len(body))}
        if self.method in _LISTS:
            set_headers[LIST_FILTER_HEADER] = "1"
        remove: list[str] = []
        if server is not None:
            if server_session:
                set_headers[SESSION_HEADER] = server_session
            else:
                remove.append(SESSION_HEADER)
        return Continue(set_headers=set_headers, remove_headers=remove, body=body, clear_route_cache=True, dynamic_metadata=metadata)

    async def _tool_call(self, msg: dict[str, Any], view: View) -> Reply:
        params = msg.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str):
            raise BadRequest("tools/call needs params.name, the tool to call", code="invalid_params")
        found = view.tool(name)
        if found is None or not found[0].visible_to(self.tenant):
            self.metrics.calls.labels(self.tenant_label, UNKNOWN, UNKNOWN, "unknown_tool").inc()
            raise UnknownTool(f"unknown tool {name!r}: tools/list names the tools you may call")
        server, tool = found
        self.tool_label = self.metrics.tool_label(server.key, tool, server.named_tools)
        if not server.may_call(self.tenant, tool):
            self.metrics.calls.labels(self.tenant_label, server.key, self.tool_label, "forbidden").inc()
            raise Forbidden(f"tenant {self.tenant} may not call the tool {name!r}", code="tool_not_allowed")
        await self._admit(server)
        self.metrics.calls.labels(self.tenant_label, server.key, self.tool_label, "allowed").inc()
        assert isinstance(params, dict)
        # What goes on, straight to the server, is the message checked here, re-written with the
        # server's own name for the tool: a body with a key twice (parsers disagree on which
        # wins) cannot name one tool to extproc and another to the server.
        checked = {"jsonrpc": "2.0", "id": msg.get("id"), "method": "tools/call", "params": {**params, "name": tool}}
        return self._forward(view, _dumps(checked), server)

    def _server_item(self, msg: dict[str, Any], view: View) -> Reply:
        """``resources/read`` (``params.uri``, ``<prefix>+<scheme>://...``) or ``prompts/get``
        (``params.name``, ``<prefix>__<name>``): straight to the server, which the tenant must
        reach, re-written with the server's own URI or name. A server's resources and prompts
        are open to every tenant it admits (its tool permissions are about tools)."""
        params = msg.get("params")
        field = "uri" if self.method == "resources/read" else "name"
        value = params.get(field) if isinstance(params, dict) else None
        if not isinstance(value, str):
            raise BadRequest(f"{self.method} needs params.{field}", code="invalid_params")
        found = view.resource(value) if field == "uri" else view.tool(value)
        if found is None or not found[0].visible_to(self.tenant):
            what = "resource" if field == "uri" else "prompt"
            raise UnknownTool(f"unknown {what} {value!r}: {self.method.split('/')[0]}/list names the ones you may use", code=f"unknown_{what}")
        server, own = found
        assert isinstance(params, dict)
        checked = {"jsonrpc": "2.0", "id": msg.get("id"), "method": self.method, "params": {**params, field: own}}
        return self._forward(view, _dumps(checked), server)

    async def _admit(self, server: ToolServer) -> None:
        """One tool call against the tenant's quota on this server (QuotaExceeded: 429)."""
        rule = server.quotas.rule_for(self.tenant)
        if rule is None or not rule.limits:
            return
        decision, _ = await check(
            self.services.quotas,
            quota_scope(self.tenant, quota_key(server.key)),
            rule.limits,
            Demand(requests=1),
            self.services.wall(),
            server.quotas.fail,
            self._store_error,
        )
        if not decision.allowed:
            self.metrics.calls.labels(self.tenant_label, server.key, self.tool_label, "rate_limited").inc()
            raise QuotaExceeded(decision.limit, decision.retry_after, ratelimit_headers(decision))

    def _store_error(self, exc: Exception) -> None:
        self.services.metrics.quota_store_errors.inc()
        now = self.services.clock()
        if now - self.services.store_warned_at >= 10.0:
            self.services.store_warned_at = now
            log.warning("quota store unavailable (%s): applying the MCP servers' fail policies", type(exc).__name__)


class ToolListFilter(Handler):
    """A ``tools/list`` answer in the caller's view (the view's ext_proc filter, enabled on that
    request only): every tool the tenant may not call is removed."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.view: View | None = None
        self.tenant = ""

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        # Set by the gateway filter on this request (a client's copy was removed there).
        self.tenant = headers.get(TENANT_HEADER, "")
        policy = self.services.current.mcp
        self.view = policy.views.get(tenancy.namespace_of(self.tenant)) if policy is not None else None
        return PASS

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        return Continue(remove_headers=["content-length"])

    async def response_body(self, body: bytes, end_of_stream: bool) -> Reply:
        return Continue(body=filter_tool_list(body, self.view, self.tenant))


def filter_tool_list(body: bytes, view: View | None, tenant: str) -> bytes:
    """A merged list answer (JSON or SSE) of tools, resources, resource templates or prompts
    without what ``tenant`` may not use in ``view``; an answer that cannot be read becomes a
    JSON-RPC error (never passed on unfiltered)."""
    text = body.lstrip()
    try:
        if view is None:
            raise ValueError("no view for this tenant")
        if text.startswith(b"{"):
            return orjson.dumps(_filter_message(orjson.loads(text), view, tenant))
        out, events = [], 0
        for line in body.split(b"\n"):
            if line.startswith(b"data:"):
                line = b"data: " + orjson.dumps(_filter_message(orjson.loads(line[5:]), view, tenant))
                events += 1
            out.append(line)
        if not events:
            raise ValueError("neither a JSON-RPC message nor an event stream")
        return b"\n".join(out)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        log.warning("a tools/list answer could not be read; the client gets an error instead")
        return rpc_error(None, SERVER_ERROR, "the tool list could not be read", {"type": "server_error", "code": "bad_tool_list"})


def _filter_message(msg: object, view: View, tenant: str) -> object:
    if not isinstance(msg, dict):
        raise ValueError("not a JSON-RPC message")
    result = msg.get("result")
    if not isinstance(result, dict):
        return msg  # an error, or a notification
    listed = [(key, field) for key, field in _LISTED if isinstance(result.get(key), list)]
    if len(listed) != 1:
        raise ValueError("a list result without exactly one of tools, resources, resourceTemplates, prompts")
    key, field = listed[0]
    kept = []
    for item in result[key]:
        name = item.get(field) if isinstance(item, dict) else None
        if isinstance(name, str) and _may_use(view, tenant, key, name):
            kept.append(item)
    return {**msg, "result": {**result, key: kept}}


# The list results the gateway filters, and the field that names each item.
_LISTED = (("tools", "name"), ("prompts", "name"), ("resources", "uri"), ("resourceTemplates", "uriTemplate"))


def _may_use(view: View, tenant: str, key: str, name: str) -> bool:
    found = view.tool(name) if key in ("tools", "prompts") else view.resource(name)
    if found is None or not found[0].visible_to(tenant):
        return False
    return key != "tools" or found[0].may_call(tenant, found[1])


class ServerCredential(Handler):
    """One request from Envoy's mcp_router to a server with a credential (the upstream ext_proc
    of its cluster): set the credential, from the policy in force or the one before it."""

    def __init__(self, services: Services, server_key: str) -> None:
        self.services = services
        self.server_key = server_key

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        for policy in (self.services.policy.current, self.services.policy.previous):
            server = policy.mcp.servers.get(self.server_key) if policy.mcp is not None else None
            if server is not None and server.credential_header:
                return Continue(set_headers={server.credential_header: server.credential_value})
        raise Unavailable(f"the MCP server {self.server_key} is not in the policy in force")


__all__ = ["ServerCredential", "ToolGateway", "ToolListFilter", "choose", "filter_tool_list", "handles", "rpc_error", "rpc_result"]
