"""The gateway's access log: one JSON line per request, written by Envoy.

Envoy knows the transport facts (request id, status, durations, retries); extproc knows the rest
(tenant, binding, backend, models, tokens, cost, policy version) and hands it to Envoy as dynamic
metadata in the namespace ``NAMESPACE``, under the keys of ``EXTPROC_FIELDS``. Both the controller
(which renders Envoy's log format) and extproc (which fills the metadata) import this module, so
no key is spelled twice.

What the line never holds: headers (credentials travel there), the path and query string (the
path Envoy holds at log time is the provider's, after extproc rewrote it; ``api`` and
``operation`` say which endpoint the client called), bodies (prompts and completions). Only the fields below, each a fact about the request.
"""

from __future__ import annotations

from typing import Any

from crdgol.usage_log import INPUT_TOKENS, OUTPUT_TOKENS, USAGE_NAMESPACE

# Dynamic metadata namespace extproc writes and Envoy's access log reads.
NAMESPACE = "crdgol"

# Keys extproc sets in NAMESPACE (see extproc.access_metadata), with what each means.
EXTPROC_FIELDS: dict[str, str] = {
    "tenant": "qualified tenant the request acted as (namespace/name)",
    "binding": "AIModelBinding that served it (namespace/name)",
    "backend": "stable id of the backend that answered",
    "provider": "API the backend speaks (openai | anthropic)",
    "operation": "chat | embeddings",
    "api": "the client's API: openai (/v1/chat/completions, /v1/embeddings) | anthropic (/v1/messages)",
    "model_requested": "model name the client asked for",
    "model_served": "upstream model name of the backend that answered",
    "input_tokens": "prompt tokens the provider reported",
    "output_tokens": "completion tokens the provider reported",
    "cost": "money, from the binding's pricing table (currency units; 0 without a price)",
    "policy_version": "version of the policy snapshot extproc decided with",
    "error": "the gateway's error code when extproc refused the request",
}

# Fields Envoy fills itself: (log key, Envoy command operator, meaning).
ENVOY_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("time", "%START_TIME%", "when the request started (UTC, ISO 8601)"),
    ("request_id", "%REQ(X-REQUEST-ID)%", "the x-request-id Envoy generated or kept"),
    ("method", "%REQ(:METHOD)%", "HTTP method"),
    ("protocol", "%PROTOCOL%", "HTTP/1.1 | HTTP/2"),
    ("status", "%RESPONSE_CODE%", "status sent to the client"),
    ("response_flags", "%RESPONSE_FLAGS%", "Envoy's short codes for what went wrong (UF, UT, ...)"),
    ("details", "%RESPONSE_CODE_DETAILS%", "why Envoy (or extproc) answered as it did"),
    ("attempts", "%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "upstream attempts: more than 1 means retries or fallback"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%", "Envoy cluster of the last attempt"),
    ("duration_ms", "%DURATION%", "from the first request byte to the last response byte"),
    ("ttfb_ms", "%RESPONSE_DURATION%", "from the first request byte to the first upstream response byte"),
    ("bytes_received", "%BYTES_RECEIVED%", "request body bytes"),
    ("bytes_sent", "%BYTES_SENT%", "response body bytes"),
)


# Token counts Envoy's own usage filters read from the response (``crdgol.usage_log``), when
# the listener has them: they see every answer, including those extproc settles from the usage
# log without reading the body, whose line would otherwise have no tokens.
USAGE_FIELDS = (INPUT_TOKENS, OUTPUT_TOKENS)


# Fields the answering cluster's own metadata carries (``CLUSTER_NAMESPACE``): known to Envoy
# whichever way the request went, also when extproc never learnt which backend answered (a call
# settled from the usage log on the one-message path).
CLUSTER_NAMESPACE = "crdgol.cluster"
CLUSTER_FIELDS = ("backend", "provider", "model_served")


def json_format(*, usage_filters: bool = False) -> dict[str, Any]:
    """Envoy's ``json_format`` for the access log: Envoy's fields, then extproc's metadata.

    With ``usage_filters`` (the listener runs Envoy's usage filters), the token fields read the
    usage namespace those filters write, whoever settled the request.
    """
    fmt: dict[str, Any] = {key: op for key, op, _ in ENVOY_FIELDS}
    for key in EXTPROC_FIELDS:
        namespace = USAGE_NAMESPACE if usage_filters and key in USAGE_FIELDS else NAMESPACE
        fmt[key] = f"%DYNAMIC_METADATA({namespace}:{key})%"
    for key in CLUSTER_FIELDS:
        fmt[key] = f"%CLUSTER_METADATA({CLUSTER_NAMESPACE}:{key})%"
    return fmt
