"""What Envoy and extproc agree on for the one-message request path.

A model call (``POST /v1/chat/completions``, ``/v1/messages``, ``/v1/embeddings``) costs extproc
one ext_proc message when nothing but the decision needs it: Envoy holds the request (the buffer
filter) and sends extproc only the body, with the request header values it reads as ext_proc
request attributes (``ATTRIBUTES``; ``attribute_headers`` turns them back into headers). extproc
answers with the rewritten body and ``ROUTE_NAMESPACE`` dynamic metadata naming the binding's
route; Envoy then does the rest natively, per binding, from the rendered config:

* the route (matched on ``ROUTE_KEY``) rewrites host and path for the binding's first backend,
  removes the caller's credential and sets the internal headers a fallback attempt's filter reads
  from the metadata; the first backend's cluster injects the provider credential from an SDS
  secret (``credential_secret``), so no secret is in the config and none crosses the body reply;
* the rate-limit headers (and the cache's ``x-crdgol-cache``) come from the same metadata
  (``ROUTE_RESPONSE_HEADERS``);
* usage is read by the native filters and settled from the access log (``crdgol.usage_log``).

The response is extproc's business only when the request needs it (a translated answer, a
stream whose usage chunk is stripped, an answer to store): extproc then picks the binding's
second route (``ROUTE_KEY`` with ``RESPONSE_SUFFIX``), on which the response filter
(``RESPONSE_FILTER``) sends the response headers, with the request's state as forwarded metadata
(``STATE_NAMESPACE``). On every other route that filter runs only for a response that is not a
2xx (a provider error to map and sanitize, or Envoy's own reply for a request extproc admitted).

A call that names a session (``SESSION_HEADER``: its answer joins the history) costs two
messages on one stream: its path route (``model-call-session``) sends the body the same way and
then the response body, STREAMED, on the same stream (the response headers are skipped; what
extproc reads of them comes as ``RESPONSE_ATTRIBUTES`` with the first body message), and
extproc names the binding's session route (``SESSION_SUFFIX``) or its plain one.
"""

from __future__ import annotations

from collections.abc import Mapping

ROUTE_NAMESPACE = "crdgol.route"
ROUTE_KEY = "route"
RESPONSE_SUFFIX = "~r"
# A call that names a session (``SESSION_HEADER``) keeps its stream open for the response body:
# extproc names the binding's route with this suffix (a chat call; an embeddings call takes the
# plain route), which rewrites the path for a translated answer.
SESSION_SUFFIX = "~s"
SESSION_HEADER = "x-session-id"
# The internal request header that names a binding's route (set by extproc or the route itself,
# never by a client: the gateway listener removes it), and the ext_proc gRPC initial metadata key
# that names the backend a fallback attempt's filter serves.
ROUTE_HEADER = "x-crdgol-route"
BACKEND_METADATA = "x-crdgol-backend"
# Route metadata keys the route turns into the internal request headers for a fallback attempt.
CLIENT_API_KEY = "client_api"
BODY_API_KEY = "body_api"
# The request state the response filter's stream starts from (a request on a response route).
STATE_NAMESPACE = "crdgol.state"
RESPONSE_FILTER = "crdgol.response"
# gRPC initial metadata of the response filter's streams (so extproc knows what a stream is).
RESPONSE_STREAM_METADATA = "x-crdgol-response"
# Header extproc removes in a body reply so Envoy honours its clear_route_cache (Envoy ignores
# clear_route_cache in a body reply that carries no header mutation; the headers are not there).
NO_OP_HEADER = "x-crdgol-reroute"

# The headers Envoy sends as attributes with the body (the rest of the request's headers are
# not sent). Profile fields read from headers add their header names (``attributes``).
# The response cache's request directive (extproc.cache_key reads it, with cache-control).
BYPASS_HEADER = "x-crdgol-cache"
READ_HEADERS = (
    "authorization", "x-api-key", SESSION_HEADER, "content-type", "anthropic-version", "cache-control", BYPASS_HEADER,
    "mcp-session-id",  # /mcp: extproc checks the MCP session is the caller's (extproc.mcp_sessions)
)
_PATH, _METHOD, _ID = "request.path", "request.method", "request.id"
# request.total_size - request.size: the request's header bytes, and how many headers it has
# (the header limit check: extproc sees only a few of them).
_TOTAL, _SIZE, _COUNT = "request.total_size", "request.size", "size(request.headers)"
HEADER_BYTES = "x-crdgol-header-bytes"
HEADER_COUNT = "x-crdgol-header-count"

RATELIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")
)
# Response headers the binding's routes set from the route metadata (empty: not set), so a call
# needs no response side for them: the rate-limit headers and the cache's hit/miss/bypass.
ROUTE_RESPONSE_HEADERS = (*RATELIMIT_HEADERS, BYPASS_HEADER)

MODEL_PATHS = ("/v1/chat/completions", "/v1/messages", "/v1/embeddings")


def header_attribute(name: str) -> str:
    return f"request.headers['{name}']"


def attributes(extra_headers: tuple[str, ...] = ()) -> list[str]:
    """The CEL attribute expressions the downstream filter sends with the first message."""
    names = dict.fromkeys([*READ_HEADERS, *(h.lower() for h in extra_headers)])
    return [*(header_attribute(h) for h in names), _PATH, _METHOD, _ID, _TOTAL, _SIZE, _COUNT]


def attribute_headers(values: Mapping[str, str | float]) -> dict[str, str]:
    """Attribute values (expression -> value) as the request headers they stand for."""
    out: dict[str, str] = {}
    prefix, suffix = "request.headers['", "']"
    for expr, value in values.items():
        if expr.startswith(prefix) and expr.endswith(suffix):
            out[expr[len(prefix) : -len(suffix)]] = str(value)
    if _PATH in values:
        out[":path"] = str(values[_PATH])
    if _METHOD in values:
        out[":method"] = str(values[_METHOD])
    if _ID in values:
        out["x-request-id"] = str(values[_ID])
    total, size, count = values.get(_TOTAL), values.get(_SIZE), values.get(_COUNT)
    if isinstance(total, float) and isinstance(size, float):
        out[HEADER_BYTES] = str(int(total - size))
    if isinstance(count, float):
        out[HEADER_COUNT] = str(int(count))
    return out


# What extproc reads of a response whose headers it skips (a session call's, which it reads on
# the stream of its request): sent with the first response body message. ``CLUSTER_ATTRIBUTE``
# names the backend that answered (the policy knows its clusters), as the access log's does.
# (``response.headers[...]`` arrives empty here when the response headers were skipped.)
STATUS_ATTRIBUTE = "response.code"
CLUSTER_ATTRIBUTE = "xds.cluster_name"
RESPONSE_ATTRIBUTES = (STATUS_ATTRIBUTE, CLUSTER_ATTRIBUTE)


def response_status(values: Mapping[str, str | float]) -> int:
    """The response status from the response attributes (0: not there)."""
    status = values.get(STATUS_ATTRIBUTE)
    try:
        return int(status) if status is not None else 0
    except ValueError:
        return 0


def credential_secret(backend_id: str) -> str:
    """The SDS secret name of a backend's provider credential (the header value to inject)."""
    return f"crdgol-credential.{backend_id}"


# The native path (``controller.native_path``): a model call Envoy decides alone, with no
# ext_proc message, names the binding's fourth route, on which the ext_proc filter is off. The
# Lua filter that decides (named ``NATIVE_FILTER``; its program and tables travel as their own
# xDS resource of that name, ECDS) writes the same metadata extproc's body reply would.
NATIVE_SUFFIX = "~n"
NATIVE_FILTER = "crdgol.native"
