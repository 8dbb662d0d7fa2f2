"""What every handler shares: the policy in force, the stores, metrics, and injected clocks.

Built once at the entry point and passed down; nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from crdgol.request_path import ROUTE_HEADER
from extproc.auth import Authenticator, Identity, KeysPending
from extproc.cache import ResponseCache
from extproc.capacity import Capacity
from extproc.history import HistoryStore, MemoryHistoryStore
from extproc.jwks import JwksCache
from extproc.mcp_sessions import McpSessions
from extproc.mcp_sources import ContextSources
from extproc.metrics import Metrics
from extproc.oidc_discovery import DiscoveringFetcher
from extproc.policy import Policy, PolicyHolder
from extproc.quota_store import MemoryQuotaStore, QuotaStore
from extproc.tracing import CallTracer

log = logging.getLogger(__name__)

# Internal request headers: set by the downstream filter for the upstream one, never by clients.
CLIENT_API_HEADER = "x-crdgol-client-api"
# The API the request body is in when it reaches a fallback attempt (the first backend's, when the
# downstream filter already rewrote it for that backend).
BODY_API_HEADER = "x-crdgol-body-api"
# Response header the upstream filter sets so the downstream one knows which backend answered.
BACKEND_HEADER = "x-crdgol-backend"
INTERNAL_HEADERS = (ROUTE_HEADER, CLIENT_API_HEADER, BODY_API_HEADER, BACKEND_HEADER)


@dataclass
class Services:
    policy: PolicyHolder = field(default_factory=PolicyHolder)
    history: HistoryStore = field(default_factory=MemoryHistoryStore)
    metrics: Metrics = field(default_factory=Metrics)
    quotas: QuotaStore = field(default_factory=MemoryQuotaStore)
    capacity: Capacity = field(default_factory=Capacity)
    clock: Callable[[], float] = time.monotonic
    # Wall-clock time for quota windows (aligned to the epoch, the same on every replica).
    wall: Callable[[], float] = time.time
    today: Callable[[], date] = date.today
    # Work that outlives the stream that started it (settling a quota after a cancel).
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # When the last "quota store unavailable" line was logged (they are rate limited).
    store_warned_at: float = float("-inf")
    history_warned_at: float = float("-inf")
    # Remote JWT keys, fetched and cached for the life of the process (policy versions share them).
    jwks: JwksCache = field(default_factory=lambda: JwksCache(fetch=DiscoveringFetcher().fetch))
    # Spans for model calls; None = tracing off (the request path then builds none).
    tracer: CallTracer | None = None
    _auth: tuple[int, Authenticator] | None = None
    cache: ResponseCache = field(default_factory=ResponseCache)
    # Who owns each MCP session at /mcp, and which have ended (``extproc.mcp_sessions``).
    mcp_sessions: McpSessions = field(default_factory=McpSessions)
    # MCP sessions and cached reads for context policies (built from metrics and clock).
    context_sources: ContextSources = field(init=False)

    def __post_init__(self) -> None:
        self.cache.attach(self.metrics.registry)
        self.context_sources = ContextSources(self.metrics, self.clock)
        self.mcp_sessions.on_store_error = self.metrics.mcp.session_store_errors.inc
        self.policy.on_change.append(self.context_sources.policy_changed)
        self.context_sources.policy_changed(self.policy.current)

    def history_store_error(self, exc: BaseException) -> None:
        """History is best effort (fail open): count it, and say so at most every 10 s."""
        self.metrics.history_store_errors.inc()
        now = self.clock()
        if now - self.history_warned_at >= 10.0:
            self.history_warned_at = now
            log.warning("session history store unavailable (%s): requests go on without history", type(exc).__name__)

    @property
    def current(self) -> Policy:
        return self.policy.current

    def authenticator(self) -> Authenticator:
        """The authenticator of the policy in force, built once per policy version."""
        policy = self.policy.current
        cached = self._auth
        if cached is None or cached[0] != policy.version:
            cached = (policy.version, Authenticator(policy, jwks=self.jwks))
            self._auth = cached
            self.jwks.prefetch(cached[1].remote_jwks())
        return cached[1]

    async def authenticate(self, credential: str) -> Identity:
        """The caller's identity; waits (bounded) only when a JWT needs remote keys refreshed."""
        auth = self.authenticator()
        try:
            return auth.authenticate(credential)
        except KeysPending as pending:
            # Together: each waits at most the request wait, and other namespaces declaring the
            # caller's issuer with slow key servers must not add theirs up (past Envoy's 2 s).
            await asyncio.gather(*(self.jwks.refresh(uri, kid=kid) for uri, kid in pending.wanted))
            return auth.authenticate(credential, final=True)
