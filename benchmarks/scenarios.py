"""The benchmark matrix as data: setups, prompt sizes, connection counts, streaming checks.

Nothing here starts a process; ``benchmarks.run`` walks the matrix. A *setup* is one deployment
started once (bare Envoy, gateway pass-through, gateway with the full policy); a *scenario* is
one load run against a setup (prompt size x connections, or the streaming check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests"
POST_LUA = HERE / "wrk" / "post.lua"

API_KEY = "sk-crdgol-bench"
MODEL = "bench-chat"
CHAT_PATH = "/v1/chat/completions"
# The port the manifests name for the mock upstream; rewritten to the real one at run time.
MANIFEST_MOCK_PORT = 8081


@dataclass(frozen=True)
class Setup:
    name: str
    kind: str  # "upstream" (wrk straight to the mock), "bare" (Envoy, no ext_proc), "gateway"
    title: str
    manifests: Path | None = None
    # Extra request headers this setup's clients send (beyond content-type and authorization).
    headers: dict[str, str] = field(default_factory=dict)
    # Rotate x-session-id over this many ids (0 = none).
    sessions: int = 0
    # Whether the derived figures compare it against bare Envoy.
    compare: bool = True
    # Quotas and history in a real redis-server (started for the run) instead of extproc's memory.
    redis: bool = False
    # Calls that need no extproc decision are decided by Envoy alone (controller.native_path).
    native_path: bool = True


SETUPS: dict[str, Setup] = {
    "upstream": Setup(
        "upstream",
        "upstream",
        "mock upstream direct (reference ceiling, no proxy)",
        compare=False,
    ),
    "bare": Setup(
        "bare", "bare", "bare Envoy proxying the mock upstream, no ext_proc", compare=False
    ),
    "passthrough": Setup(
        "passthrough",
        "gateway",
        "gateway pass-through: API key, routing, usage accounting; no context",
        manifests=MANIFESTS / "passthrough",
    ),
    "passthrough-extproc": Setup(
        "passthrough-extproc",
        "gateway",
        "gateway pass-through with the native path off: every call is one ext_proc message",
        manifests=MANIFESTS / "passthrough",
        native_path=False,
    ),
    "full": Setup(
        "full",
        "gateway",
        "gateway full policy: API key, tenant check, routing, context (template, profile, knowledge, "
        "history), usage accounting",
        manifests=MANIFESTS / "full",
        headers={"x-user-team": "platform"},
        sessions=512,
    ),
    "full-redis": Setup(
        "full-redis",
        "gateway",
        "gateway full policy with quotas and history in Redis (what several replicas share)",
        manifests=MANIFESTS / "full",
        headers={"x-user-team": "platform"},
        sessions=512,
        redis=True,
    ),
}

# Setups start in this order; "upstream" runs on the bare setup's mock (no extra processes).
SETUP_ORDER = ("bare", "upstream", "passthrough", "passthrough-extproc", "full")

PROMPT_SIZES = {"1k": 1024, "16k": 16 * 1024}


@dataclass(frozen=True)
class Scenario:
    setup: str
    kind: str  # "load" (wrk) or "stream" (async client)
    size: str  # key of PROMPT_SIZES
    connections: int = 1
    duration: float = 10.0  # seconds, load scenarios
    requests: int = 0  # stream scenarios: sequential streamed requests
    chunk_delay_ms: float = 0.0  # stream scenarios: mock delay between SSE chunks

    @property
    def name(self) -> str:
        if self.kind == "stream":
            return f"{self.setup}-{self.size} stream"
        return f"{self.setup}-{self.size} c{self.connections}"

    @property
    def key(self) -> str:
        return self.name.replace(" ", "-")


@dataclass(frozen=True)
class Plan:
    name: str  # results file stem
    setups: tuple[str, ...]
    scenarios: tuple[Scenario, ...]
    warmup: float  # seconds of discarded load per setup before its first scenario
    memory_requests: int
    memory_sessions: int
    memory_connections: int = 16

    def for_setup(self, setup: str) -> list[Scenario]:
        return [s for s in self.scenarios if s.setup == setup]


def plan(quick: bool) -> Plan:
    if quick:
        sizes, conns, duration = ("1k",), (1, 16), 5.0
        stream_requests, warmup = 40, 1.5
        memory = (5_000, 500)
    else:
        sizes, conns, duration = ("1k", "16k"), (1, 16, 64), 10.0
        stream_requests, warmup = 200, 3.0
        memory = (100_000, 10_000)
    scenarios: list[Scenario] = []
    # The native path's A/B (pass-through with it off) only in the full run: the quick one stays
    # under two minutes.
    order = tuple(s for s in (*SETUP_ORDER, "full-redis") if not (quick and s == "passthrough-extproc"))
    for setup in order:
        for size in sizes if setup != "full-redis" else ("1k",):
            # The Redis store is compared with the memory store at c16 (the quick run's one point).
            for c in conns if not (quick and setup == "full-redis") else (16,):
                scenarios.append(Scenario(setup, "load", size, c, duration))
        if setup in ("bare", "full"):
            scenarios.append(
                Scenario(setup, "stream", "1k", 1, requests=stream_requests, chunk_delay_ms=5.0)
            )
    return Plan(
        name="quick" if quick else "bench",
        setups=order,
        scenarios=tuple(scenarios),
        warmup=warmup,
        memory_requests=memory[0],
        memory_sessions=memory[1],
    )


# --- request bodies -------------------------------------------------------------------------

_WORDS = [
    "gateway",
    "envoy",
    "tenant",
    "quota",
    "stream",
    "token",
    "budget",
    "context",
    "history",
    "profile",
    "knowledge",
    "route",
    "backend",
    "fallback",
    "latency",
    "throughput",
    "upstream",
    "session",
    "policy",
    "snapshot",
    "usage",
]


def prompt_text(size: int) -> str:
    """Deterministic English-ish text of exactly ``size`` bytes."""
    out: list[str] = []
    n, i = 0, 0
    while n < size:
        w = _WORDS[(i * 7 + i // 3) % len(_WORDS)]
        out.append(w)
        n += len(w) + 1
        i += 1
    return " ".join(out)[:size]


def chat_body(size: int, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt_text(size)}],
        "max_tokens": 256,
    }
    if stream:
        body["stream"] = True
    return body


def request_headers(setup: Setup) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    if setup.kind == "gateway":
        h.update(setup.headers)
    return h


# --- bare Envoy -----------------------------------------------------------------------------


def bare_envoy_config(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """One listener proxying every path to the mock upstream: the same Envoy, no ext_proc.

    Kept comparable to the gateway's listener (HTTP/1.1 upstream, request ids, same timeouts).
    """
    any_ = "type.googleapis.com/"
    hcm = {
        "@type": any_
        + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bare",
        "codec_type": "AUTO",
        "generate_request_id": True,
        "route_config": {
            "name": "bare",
            "virtual_hosts": [
                {
                    "name": "bare",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {
                                "cluster": "mock",
                                "timeout": "60.000s",
                                "idle_timeout": "30.000s",
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": any_ + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    addr = lambda port: {"socket_address": {"address": "127.0.0.1", "port_value": port}}  # noqa: E731
    return {
        "node": {"id": "crdgol-bench-bare", "cluster": "crdgol-bench"},
        "admin": {"address": addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "bare",
                    "address": addr(listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "mock",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "mock",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": addr(upstream_port)}}]}
                        ],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": any_
                            + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http_protocol_options": {}},
                        }
                    },
                }
            ],
        },
    }


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path
