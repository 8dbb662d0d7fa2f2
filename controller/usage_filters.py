"""Usage off the request path: the native filters that read token usage from responses into
dynamic metadata, and the gRPC access log that brings every finished request's entry to extproc
(``crdgol.usage_log`` holds the names both sides share; ``extproc.usage_log`` settles them)."""

from __future__ import annotations

from controller.envoy_json import Json, duration, typed, typed_struct
from crdgol.mcp_contract import TENANT_KEY as MCP_TENANT_KEY
from crdgol.request_path import ROUTE_NAMESPACE
from crdgol.usage_log import (
    ACCESS_LOG_NAME,
    CACHE_CREATION_TOKENS,
    CACHE_READ_TOKENS,
    INPUT_TOKENS,
    LAST_EVENT,
    OUTPUT_TOKENS,
    RESPONSE_MODEL,
    USAGE_NAMESPACE,
)


def _usage_rule(path: list[str], key: str, kind: str = "NUMBER") -> Json:
    return {"selectors": [{"key": p} for p in path], "on_present": {"metadata_namespace": USAGE_NAMESPACE, "key": key, "type": kind}}


# The usage filters' names (MCP routes turn them off by name: controller.mcp_render).
USAGE_FILTER_NAMES = ("envoy.filters.http.json_to_metadata", "envoy.filters.http.sse_to_metadata")


def usage_filters() -> list[Json]:
    """Native filters that read token usage from responses (JSON and SSE, both APIs) into
    dynamic metadata, so extproc needs no response body for usage (``crdgol.usage_log``)."""
    json_rules = [
        _usage_rule(["usage", "prompt_tokens"], INPUT_TOKENS),  # OpenAI
        _usage_rule(["usage", "completion_tokens"], OUTPUT_TOKENS),
        _usage_rule(["usage", "input_tokens"], INPUT_TOKENS),  # Anthropic
        _usage_rule(["usage", "output_tokens"], OUTPUT_TOKENS),
        _usage_rule(["usage", "cache_creation_input_tokens"], CACHE_CREATION_TOKENS),
        _usage_rule(["usage", "cache_read_input_tokens"], CACHE_READ_TOKENS),
        _usage_rule(["model"], RESPONSE_MODEL, "STRING"),
    ]
    sse_rules = [
        {"rule": _usage_rule(["usage", "prompt_tokens"], INPUT_TOKENS)},  # OpenAI's final chunk
        {"rule": _usage_rule(["usage", "completion_tokens"], OUTPUT_TOKENS)},
        {"rule": _usage_rule(["message", "usage", "input_tokens"], INPUT_TOKENS)},  # Anthropic message_start
        {"rule": _usage_rule(["message", "usage", "cache_creation_input_tokens"], CACHE_CREATION_TOKENS)},
        {"rule": _usage_rule(["message", "usage", "cache_read_input_tokens"], CACHE_READ_TOKENS)},
        {"rule": _usage_rule(["usage", "output_tokens"], OUTPUT_TOKENS)},  # Anthropic message_delta
        # Anthropic events carry a type; the last one is message_stop only if the stream ended whole.
        {"rule": _usage_rule(["type"], LAST_EVENT, "STRING")},
        {"rule": _usage_rule(["model"], RESPONSE_MODEL, "STRING"), "stop_processing_after_matches": 1},
        {"rule": _usage_rule(["message", "model"], RESPONSE_MODEL, "STRING"), "stop_processing_after_matches": 1},
    ]
    return [
        {
            "name": USAGE_FILTER_NAMES[0],
            "typed_config": typed(
                "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                response_rules={"rules": json_rules, "allow_content_types": ["application/json"]},
            ),
        },
        {
            "name": USAGE_FILTER_NAMES[1],
            "typed_config": typed_struct(
                "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                response_rules={
                    "content_parser": {
                        "name": "envoy.content_parsers.json",
                        "typed_config": typed_struct("envoy.extensions.content_parsers.json.v3.JsonContentParser", rules=sse_rules),
                    }
                },
            ),
        },
    ]


# A batch is sent when this many bytes of entries are buffered, or at the flush interval. Large
# enough that the interval decides at the load one Envoy worker carries (a native call's entry is
# ~800 bytes: ~3,500 calls/s fill 64 KiB in ~23 ms, past the 20 ms interval), so the settle delay
# is unchanged; each batch costs extproc a gRPC message, and 16 KiB (~20 entries) cost it 5-8 µs
# more per request (benchmarks/RESULTS.md, 2026-12-03 "nativelog").
USAGE_LOG_BUFFER_BYTES = 64 * 1024


def usage_access_log(extproc_cluster: str, flush_ms: int) -> Json:
    """Every finished request's entry (aborted ones included) to extproc, batched per worker;
    except MCP messages extproc forwarded to a tool server (their ``crdgol.route`` metadata names
    an MCP tenant): nothing in them to settle, and their entries cost extproc CPU per tool call."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                # Logged when the key is absent; when present (a string), only if it were null:
                # never (Envoy's access-log metadata filter ignores a matcher's ``invert``).
                "matcher": {"filter": ROUTE_NAMESPACE, "path": [{"key": MCP_TENANT_KEY}], "value": {"null_match": {}}},
                "match_if_key_not_found": True,
            }
        },
        "typed_config": typed(
            "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            common_config={
                "log_name": ACCESS_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": extproc_cluster}},
                "buffer_flush_interval": duration(flush_ms / 1000),
                "buffer_size_bytes": USAGE_LOG_BUFFER_BYTES,
            },
        ),
    }
