"""The Envoy side of the one-message request path (``crdgol.request_path``), as Python data.

Pieces ``controller.envoy_config`` puts into the gateway listener, its routes and the first
backend's cluster when ``RenderSettings.one_message`` is on: the buffer filter that holds a
request until extproc has answered its body, the per-route override that sends a model call's
body alone, the binding's two routes matched on the route extproc names in dynamic metadata, the
response filter that sees a response only when something needs it, and the credential injector
that sets the provider credential from an SDS secret. Each was checked against Envoy 1.40 (``envoy
--mode validate`` and live requests; ``tests/dataplane``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.envoy_json import Json, typed
from controller.models import BackendSpec
from crdgol.access_log import NAMESPACE as ACCESS_NAMESPACE
from crdgol.request_path import (
    BODY_API_KEY,
    CLIENT_API_KEY,
    RESPONSE_FILTER,
    RESPONSE_STREAM_METADATA,
    RESPONSE_SUFFIX,
    ROUTE_KEY,
    ROUTE_NAMESPACE,
    ROUTE_RESPONSE_HEADERS,
    SESSION_HEADER,
    SESSION_SUFFIX,
    STATE_NAMESPACE,
)
from crdgol.usage_log import SETTLE_NAMESPACE

if TYPE_CHECKING:
    from controller.envoy_config import RenderSettings


def one_message(settings: RenderSettings) -> bool:
    return settings.one_message and settings.usage_log


def response_filter(settings: RenderSettings, extproc_cluster: str) -> Json:
    """The response side of a request extproc admitted, on a stream of its own.

    It sends extproc the response headers (and the body if extproc asks) of a request on a
    binding's response route, and a provider's error on any route (to map and sanitize); on any
    other route a 2xx, or a reply of Envoy's own, skips it: nothing is sent, no stream is opened
    (the access log settles those). The request's state comes with it as forwarded metadata.
    """
    inner = typed(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service={
            "envoy_grpc": {"cluster_name": extproc_cluster},
            "timeout": f"{settings.extproc_timeout_ms / 1000:.3f}s",
            "initial_metadata": [{"key": RESPONSE_STREAM_METADATA, "value": "1"}],
        },
        failure_mode_allow=False,
        status_on_error={"code": 503},
        message_timeout=f"{settings.extproc_timeout_ms / 1000:.3f}s",
        stat_prefix="response",
        processing_mode={
            "request_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_header_mode": "SEND",
            "response_body_mode": "NONE",
            "response_trailer_mode": "SKIP",
        },
        allow_mode_override=True,
        metadata_options={
            "forwarding_namespaces": {"untyped": [STATE_NAMESPACE, SETTLE_NAMESPACE]},
            "receiving_namespaces": {"untyped": [SETTLE_NAMESPACE, ACCESS_NAMESPACE]},
        },
    )
    return {
        "name": RESPONSE_FILTER,
        "typed_config": typed(
            "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            extension_config={"name": RESPONSE_FILTER, "typed_config": inner},
            xds_matcher=_skip_unless_upstream_error(),
        ),
    }


def _response_header(name: str) -> Json:
    return {"name": name, "typed_config": typed("envoy.type.matcher.v3.HttpResponseHeaderMatchInput", header_name=name)}


def _skip_unless_upstream_error() -> Json:
    """Skip a 2xx, and any reply of Envoy's own (it has no upstream timing header: a refusal by
    extproc, a failed connection; the access log settles an admitted one)."""
    any_value = {"safe_regex": {"google_re2": {}, "regex": ".*"}}
    return {
        "matcher_list": {
            "matchers": [
                {
                    "predicate": {
                        "or_matcher": {
                            "predicate": [
                                {"single_predicate": {"input": _response_header(":status"), "value_match": {"prefix": "2"}}},
                                {
                                    "not_matcher": {
                                        "single_predicate": {
                                            "input": _response_header("x-envoy-upstream-service-time"),
                                            "value_match": any_value,
                                        }
                                    }
                                },
                            ]
                        }
                    },
                    "on_match": {"action": _SKIP},
                }
            ]
        }
    }


_SKIP: Json = {"name": "skip", "typed_config": typed("envoy.extensions.filters.common.matcher.action.v3.SkipFilter")}


def _skip_when_status(how: str, value: object) -> Json:
    return {
        "matcher_list": {
            "matchers": [
                {
                    "predicate": {
                        "single_predicate": {
                            "input": {
                                "name": "status",
                                "typed_config": typed("envoy.type.matcher.v3.HttpResponseHeaderMatchInput", header_name=":status"),
                            },
                            "value_match": {how: value},
                        }
                    },
                    "on_match": {"action": _SKIP},
                }
            ]
        }
    }


# On a response route the response filter sees every response: its matcher never skips.
_SEE_EVERY_RESPONSE = typed(
    "envoy.extensions.common.matching.v3.ExtensionWithMatcherPerRoute", xds_matcher=_skip_when_status("exact", "never")
)


# On a route extproc did not pick (a refusal stays on the path's route, an unknown path gets the
# 404) there is nothing for the response side: the filter never runs there.
NO_RESPONSE_SIDE = {
    RESPONSE_FILTER: typed(
        "envoy.extensions.common.matching.v3.ExtensionWithMatcherPerRoute",
        xds_matcher=_skip_when_status("safe_regex", {"google_re2": {}, "regex": ".*"}),
    )
}


def buffer_filter(settings: RenderSettings) -> Json:
    """Holds a request until its whole body is in: nothing reaches the router (or a provider)
    before extproc has answered the body (the headers are not sent to extproc first)."""
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": typed("envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=settings.max_request_bytes),
    }


def _body_first(response_body_mode: str) -> Json:
    """A per-route override of the gateway's ext_proc filter: the request body alone (with the
    request attributes), and of the response its body in ``response_body_mode``."""
    return typed(
        "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        overrides={
            "processing_mode": {
                "request_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SKIP",
                "response_body_mode": response_body_mode,
                "response_trailer_mode": "SKIP",
            }
        },
    )


# The request body alone, nothing of the response.
BODY_ONLY = _body_first("NONE")
# A call that names a session: the body alone as above, then its response body on the same
# stream, chunk by chunk as it comes (a stream is never held whole); the response headers are
# skipped (what extproc reads of them comes as response attributes with the first chunk).
SESSION_BODY_AND_RESPONSE = _body_first("STREAMED")


def model_path_routes() -> list[Json]:
    """The model-call paths before extproc has answered: extproc gets the body alone (one message).

    A request still on one of these routes when it reaches the router was never answered by
    extproc: it had no body to send. It gets a 400, never a provider.
    """
    body_only = BODY_ONLY
    paths = {"safe_regex": {"regex": "/v1/(chat/completions|messages|embeddings)/?"}}
    post = {"name": ":method", "string_match": {"exact": "POST"}}
    empty = {"status": 400, "body": {"inline_string": "the request body is empty: send a JSON object"}}
    return [
        {
            # A call that names a session most likely keeps history, whose answer extproc reads:
            # its body and then its response body go to extproc on one stream, two messages
            # (cheaper, measured, than one message plus the response filter's own stream).
            "name": "model-call-session",
            "match": {**paths, "headers": [post, {"name": SESSION_HEADER, "present_match": True}]},
            "direct_response": empty,
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": SESSION_BODY_AND_RESPONSE, **NO_RESPONSE_SIDE},
        },
        {
            "name": "model-call",
            # POST only: another method goes the usual way (extproc answers 405 from the headers).
            "match": {**paths, "headers": [post]},
            "direct_response": empty,
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": body_only, **NO_RESPONSE_SIDE},
        },
    ]


def _metadata_header(key: str) -> str:
    return f"%DYNAMIC_METADATA({ROUTE_NAMESPACE}:{key})%"


def metadata_routes(base: Json, direct: BackendSpec | None) -> list[Json]:
    """The binding's routes on the one-message path, chosen by the route extproc names.

    Both send the request to the binding's backends as its header-matched route ``base`` does
    (``envoy_config.binding_route``), pointed at the first backend ``direct`` (host, path, no
    caller credential; its cluster injects the provider's); the second also hands the response to
    extproc (``response_filter``); the third serves a chat call that names a session, whose
    response extproc reads on the request's own stream.
    """
    rid = base["name"]
    action: Json = dict(base["route"])
    chat_path = ""
    if direct is not None:
        ep = direct.endpoint
        action["host_rewrite_literal"] = ep.host if ep.port == (443 if ep.tls else 80) else f"{ep.host}:{ep.port}"
        if ep.path_prefix:
            action["prefix_rewrite"] = ep.path_prefix.rstrip("/") + "/"
        chat_path = ep.path_prefix.rstrip("/") + ("/v1/messages" if direct.provider == "anthropic" else "/v1/chat/completions")
    add = [
        {"header": {"key": h, "value": _metadata_header(k)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for h, k in (("x-crdgol-client-api", CLIENT_API_KEY), ("x-crdgol-body-api", BODY_API_KEY))
    ]
    if direct is not None and direct.provider == "anthropic":
        add.append({"header": {"key": "anthropic-version", "value": "2023-06-01"}, "append_action": "ADD_IF_ABSENT"})
    common: Json = {
        # The caller's credential never goes on; the provider's is injected per cluster.
        "request_headers_to_remove": ["authorization", "x-api-key"],
        "request_headers_to_add": add,
        "response_headers_to_add": [
            {"header": {"key": h, "value": _metadata_header(h)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for h in ROUTE_RESPONSE_HEADERS
        ],
    }

    def match(key: str) -> Json:
        return {
            "prefix": "/",
            "dynamic_metadata": [{"filter": ROUTE_NAMESPACE, "path": [{"key": ROUTE_KEY}], "value": {"string_match": {"exact": key}}}],
        }

    lean = {"name": rid, "match": match(rid), "route": action, **common}
    full_action = dict(action)
    if chat_path:
        # Only chat calls take the response route; a translated one changes API, and path.
        full_action.pop("prefix_rewrite", None)
        full_action["regex_rewrite"] = {"pattern": {"regex": "^.*$"}, "substitution": chat_path}
    full = {
        "name": rid + RESPONSE_SUFFIX,
        "match": match(rid + RESPONSE_SUFFIX),
        "route": full_action,
        **common,
        "typed_per_filter_config": {RESPONSE_FILTER: _SEE_EVERY_RESPONSE},
    }
    # A fallback attempt's own filter tags its answer with the backend; on the plain route nobody
    # else reads that tag, so it is removed before the client sees it.
    lean["response_headers_to_remove"] = ["x-crdgol-backend"]
    # A chat call that names a session (``model-call-session``): extproc reads its response on the
    # request's own stream, so the response filter runs only for a provider's error, as on the
    # plain route; the path is the chat path, as on the response route (a translated answer).
    session = {
        "name": rid + SESSION_SUFFIX,
        "match": match(rid + SESSION_SUFFIX),
        "route": full_action,
        **common,
        "response_headers_to_remove": ["x-crdgol-backend"],
    }
    return [lean, full, session]


def credential_injector(secret: str, be: BackendSpec, sds_dir: str) -> Json:
    """Sets the provider credential on every request to backend ``be``, from the SDS secret
    ``secret``: over ADS, or from its file in ``sds_dir``."""
    sds: Json = (
        {"path_config_source": {"path": f"{sds_dir}/{secret}.json"}, "resource_api_version": "V3"}
        if sds_dir
        else {"ads": {}, "resource_api_version": "V3"}
    )
    return {
        "name": "envoy.filters.http.credential_injector",
        "typed_config": typed(
            "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            overwrite=True,
            credential={
                "name": "envoy.http.injected_credentials.generic",
                "typed_config": typed(
                    "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                    credential={"name": secret, "sds_config": sds},
                    header="x-api-key" if be.provider == "anthropic" else "authorization",
                ),
            },
        ),
    }


def credential_value(be: BackendSpec, api_key: str) -> str:
    """The header value the credential injector sets for ``be`` (what the SDS secret holds)."""
    return api_key if be.provider == "anthropic" else f"Bearer {api_key}"
