"""What Envoy and extproc agree on for usage that travels off the request path.

When extproc does not need a response's body, it does not ask Envoy for it: Envoy's native
``json_to_metadata`` / ``sse_to_metadata`` filters read the token usage into dynamic metadata
(``USAGE_NAMESPACE``), and Envoy's gRPC access-log service brings every finished request's entry,
aborted ones included, back to extproc in batches. extproc marks such a request in its answer to
the response headers with the reservation to settle (``SETTLE_NAMESPACE``). The downstream
ext_proc filter tells extproc that this path exists with ``USAGE_LOG_METADATA`` in its gRPC
initial metadata (a config without the access log, such as the Istio one, does not send it, and
extproc then reads every body as before).
"""

from __future__ import annotations

USAGE_NAMESPACE = "crdgol.usage"
SETTLE_NAMESPACE = "crdgol.settle"
USAGE_LOG_METADATA = "x-crdgol-usage-log"
ACCESS_LOG_NAME = "crdgol-usage"

# Keys the native filters write into USAGE_NAMESPACE (numbers arrive as floats).
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
CACHE_CREATION_TOKENS = "cache_creation_input_tokens"
CACHE_READ_TOKENS = "cache_read_input_tokens"
RESPONSE_MODEL = "model"
# The type of the last Anthropic stream event seen: "message_stop" when the stream completed.
LAST_EVENT = "last_event"
STREAM_COMPLETE = "message_stop"
