"""Prometheus metrics of extproc, named after the OpenTelemetry GenAI semantic conventions.

``gen_ai_client_token_usage`` and ``gen_ai_server_request_duration`` follow the GenAI names
(dots become underscores in Prometheus); the ``crdgol_*`` series are the gateway's own. Labels
carry tenant, binding and backend ids, never credentials. Each ``Metrics`` owns its registry so
tests and several servers in one process do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.capacity import Capacity
from extproc.mcp_metrics import ToolCallMetrics

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# The GenAI semantic conventions' advised buckets, with a finer start for fast local upstreams.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


@dataclass(frozen=True, slots=True)
class RequestLabels:
    tenant: str
    binding: str
    backend: str
    operation: str  # "chat" | "embeddings"
    request_model: str
    response_model: str


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        common = ["gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model", "tenant", "binding", "backend"]
        self.token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Tokens used per request, by token type (input/output).",
            [*common, "gen_ai_token_type"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration",
            "Seconds from the request's arrival at the gateway to the end of its response.",
            [*common, "http_response_status_code"],
            buckets=DURATION_BUCKETS,
            unit="seconds",
            registry=r,
        )
        self.tokens_total = Counter(
            "crdgol_tokens", "Tokens used, by tenant, binding, backend and type.", ["tenant", "binding", "backend", "type"], registry=r
        )
        self.requests = Counter(
            "crdgol_requests", "Requests finished, by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.rejections = Counter(
            "crdgol_rejections", "Requests refused by the gateway, by reason.", ["reason"], registry=r
        )
        self.context_tokens = Counter(
            "crdgol_context_tokens_injected", "Estimated tokens of context injected into prompts by the context policy.", ["binding"], registry=r
        )
        self.history_dropped = Counter(
            "crdgol_context_history_turns_dropped", "History turns dropped to fit the context budget.", ["binding"], registry=r
        )
        self.policy_version = Gauge("crdgol_policy_version", "Version of the policy snapshot in force.", registry=r)
        # Context policy sources read from MCP servers (extproc.mcp_sources).
        self.context_source_reads = Counter(
            "crdgol_context_source_reads",
            "Reads of MCP context sources, by outcome (cached, fetched, timeout, unreachable, error).",
            ["binding", "server", "outcome"],
            registry=r,
        )
        self.context_source_failures = Counter(
            "crdgol_context_source_failures",
            "MCP context sources that could not be read, by the source's fail policy (skip or refuse).",
            ["binding", "server", "fail_policy"],
            registry=r,
        )
        self.context_source_sessions = Gauge(
            "crdgol_context_source_sessions", "MCP client sessions extproc holds open for context sources.", registry=r
        )
        self.handler_errors = Counter("crdgol_extproc_errors", "Unexpected errors inside extproc handlers.", registry=r)
        self.quota_remaining = Gauge(
            "crdgol_quota_remaining", "What is left of each quota limit after the last check.", ["tenant", "binding", "limit"], registry=r
        )
        self.quota_store_errors = Counter(
            "crdgol_quota_store_errors", "Quota checks that could not reach the store (the fail policy applied).", registry=r
        )
        self.quota_store_seconds = Histogram(
            "crdgol_quota_store_seconds",
            "Time to reserve a quota in the store.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
            registry=r,
        )
        self.history_store_errors = Counter(
            "crdgol_history_store_errors", "Session-history reads or writes that failed (requests went on without).", registry=r
        )
        self.charged_estimates = Counter(
            "crdgol_charged_estimates",
            "Requests charged at least their reservation: cut short, without a usage block, or abandoned before any response.",
            registry=r,
        )
        self.streams = Gauge("crdgol_extproc_open_streams", "ext_proc gRPC streams open now.", ["role"], registry=r)
        # Operating figures (extproc.access_metadata): money, and where a streamed answer's time went.
        self.spend = Counter(
            "crdgol_spend",
            "Money spent, in the currency of the binding's pricing table, by tenant, binding and backend.",
            ["tenant", "binding", "backend"],
            registry=r,
        )
        latency_labels = ["gen_ai_operation_name", "gen_ai_request_model", "binding", "backend"]
        self.time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token",
            "Seconds from the request's arrival to the first chunk of a streamed answer (successful streams).",
            latency_labels,
            buckets=TTFT_BUCKETS,
            unit="seconds",
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token",
            "Seconds per output token after the first, for successful streamed answers.",
            latency_labels,
            buckets=TPOT_BUCKETS,
            unit="seconds",
            registry=r,
        )
        self.quota_limit = Gauge(
            "crdgol_quota_limit",
            "Each quota limit's size (headroom = crdgol_quota_remaining / crdgol_quota_limit).",
            ["tenant", "binding", "limit"],
            registry=r,
        )
        # MCP tool calls through /mcp (extproc.mcp_gateway).
        self.mcp = ToolCallMetrics(r)
        self._children: dict[RequestLabels, tuple[Any, Any, Any, Any]] = {}
        self._duration_children: dict[tuple[RequestLabels, int], tuple[Any, Any]] = {}
        self._spend_children: dict[tuple[str, str, str], Any] = {}
        self._capacity_watched = False

    def watch_capacity(self, capacity: Capacity) -> None:
        """Expose what extproc holds now (read at scrape time); once per registry."""
        if self._capacity_watched:
            return
        self._capacity_watched = True
        r = self.registry
        Gauge("crdgol_extproc_body_bytes_in_flight", "Request and response body bytes being processed.", registry=r).set_function(
            lambda: capacity.body_bytes
        )
        Gauge("crdgol_extproc_event_loop_lag_seconds", "How late extproc's event loop runs its timers.", registry=r).set_function(
            lambda: capacity.lag
        )
        Gauge("crdgol_extproc_shed_requests", "Requests refused for capacity (503 gateway_overloaded) since start.", registry=r).set_function(
            lambda: capacity.shed
        )

    def _usage_children(self, labels: RequestLabels) -> tuple[Any, Any, Any, Any]:
        # Label look-ups cost more than the observation; the label sets are bounded by the
        # policy (tenants x bindings x backends), so they are cached.
        children = self._children.get(labels)
        if children is None:
            base = (labels.operation, labels.request_model, labels.response_model, labels.tenant, labels.binding, labels.backend)
            children = (
                self.token_usage.labels(*base, "input"),
                self.token_usage.labels(*base, "output"),
                self.tokens_total.labels(labels.tenant, labels.binding, labels.backend, "input"),
                self.tokens_total.labels(labels.tenant, labels.binding, labels.backend, "output"),
            )
            self._children[labels] = children
        return children

    def record_usage(self, labels: RequestLabels, input_tokens: int, output_tokens: int) -> None:
        hist_in, hist_out, total_in, total_out = self._usage_children(labels)
        hist_in.observe(input_tokens)
        if labels.operation != "embeddings":
            hist_out.observe(output_tokens)
        total_in.inc(input_tokens)
        total_out.inc(output_tokens)

    def add_spend(self, tenant: str, binding: str, backend: str, amount: float) -> None:
        child = self._spend_children.get((tenant, binding, backend))
        if child is None:
            child = self._spend_children[tenant, binding, backend] = self.spend.labels(tenant, binding, backend)
        child.inc(amount)

    def record_duration(self, labels: RequestLabels, status: int, seconds: float) -> None:
        """The request's duration and its count by endpoint and status (both children cached,
        as ``_usage_children``: the access log settles every call through here)."""
        key = (labels, status)
        children = self._duration_children.get(key)
        if children is None:
            code = str(status)
            base = (labels.operation, labels.request_model, labels.response_model, labels.tenant, labels.binding, labels.backend)
            children = (self.duration.labels(*base, code), self.requests.labels(labels.operation, code))
            self._duration_children[key] = children
        children[0].observe(seconds)
        children[1].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
