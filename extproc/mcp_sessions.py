"""MCP sessions across the gateway: who owns one, ending one, and refusing it once ended.

Envoy's ``mcp_router`` keeps one MCP session per server behind one composite ``Mcp-Session-Id``:
standard base64 of ``<route>@<base64 subject>@<server>:<base64 server session>,...``, where the
subject is the tenant extproc named on ``initialize`` and ``<server>`` a server's ``toolPrefix``.
It refuses an id whose subject is not the caller's tenant (403), but the id carries no integrity
check: anyone holding another tenant's id can re-encode its server sessions under their own
subject. And ``mcp_router`` does nothing for ``DELETE`` (it answers 400: no body). So extproc:

* reads the id on every ``/mcp`` request (``parse_session_id``) and checks the subject is the
  caller's tenant (403 otherwise; an id it cannot read is 404, the spec's "no such session");
* binds each **server session** to the tenant that first used it, in a registry shared like the
  quotas (memory, or Redis for several replicas): a server session presented by another tenant,
  whatever id it came in, is refused (403). The first use is the client's own next request after
  ``initialize`` (``notifications/initialized`` for the SDKs), so another tenant would need the
  id before its owner used it once;
* ends a session on ``DELETE /mcp``: an HTTP DELETE with its own session id to every server of the
  caller's view the session names (``end_on_servers``), and the server sessions are marked ended,
  so any later request with the id gets 404 (the spec's answer for a terminated session).

Registry entries live ``ENTRY_TTL`` seconds after their last use. If Redis fails, requests go on
without these checks (the fail policy; counted and logged): ``mcp_router``'s subject check still
refuses an id used as is by another tenant.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from extproc.mcp_policy import ToolServer
from extproc.quota_store import StoreUnavailable, bounded
from extproc.redis_client import RedisClient, Script

log = logging.getLogger(__name__)

SESSION_HEADER = "mcp-session-id"
PROTOCOL_HEADER = "mcp-protocol-version"
# A server session's registry entry outlives its last use by this long (a day).
ENTRY_TTL = 86_400
# The in-memory registry's bound: beyond it, the entries least recently used go first.
MEMORY_ENTRIES = 200_000
# How long ending a session on one server may take (extproc must answer Envoy within 2 s).
END_TIMEOUT = 1.0
_ENDED = "\x00ended"

Verdict = Literal["ok", "foreign", "ended"]


@dataclass(frozen=True, slots=True)
class GatewaySession:
    """A composite session id, read: the tenant it was opened for and each server's session."""

    subject: str
    servers: tuple[tuple[str, str], ...]  # (toolPrefix, the server's own session id), by prefix


def _b64(text: str) -> str:
    return base64.b64decode(text, validate=True).decode()


# A server's own session id, as the MCP specification allows it: visible ASCII (it goes back to
# that server in a header, and into a registry key).
_SERVER_SESSION = re.compile(r"[\x21-\x7e]{0,256}")  # empty: a server that keeps no session


@functools.lru_cache(maxsize=4096)  # a session's id comes with each of its requests: read it once
def parse_session_id(encoded: str) -> GatewaySession | None:
    """The composite id ``mcp_router`` issued, or None when it is not one.

    The id is plain base64 that any caller can write, so it is read strictly: each server at
    most once (one request naming a server thousands of times would claim thousands of registry
    keys, or fan out as many DELETEs), and each server session visible ASCII of at most 256 (or empty)
    characters (it is sent on to that server in a header)."""
    try:
        _route, subject, servers = _b64(encoded).split("@")
        parts = [p.split(":", 1) for p in servers.split(",")] if servers else []
        pairs = tuple(sorted((name, _b64(session)) for name, session in parts if name))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if len({name for name, _ in pairs}) != len(pairs) or not all(_SERVER_SESSION.fullmatch(s) for _, s in pairs):
        return None
    return GatewaySession(_b64(subject), pairs)


@functools.lru_cache(maxsize=8192)
def _entry_key(server_key: str, session: str) -> str:
    return hashlib.sha256(f"{server_key}\n{session}".encode()).hexdigest()


def entry_key(server: ToolServer, session: str) -> str:
    """A server session's registry key (hashed: bounded, and no session id in a store key)."""
    return _entry_key(server.key, session)


class SessionRegistry(Protocol):
    async def claim(self, keys: Sequence[str], tenant: str, now: float) -> Verdict:
        """Bind every key to ``tenant`` unless one is another tenant's (foreign) or ended."""
        ...

    async def end(self, keys: Sequence[str], now: float) -> None: ...


class MemorySessionRegistry:
    def __init__(self, limit: int = MEMORY_ENTRIES) -> None:
        self.limit = limit
        self.entries: dict[str, tuple[str, float]] = {}  # key -> (owner or _ENDED, expiry); in use order

    async def claim(self, keys: Sequence[str], tenant: str, now: float) -> Verdict:
        for key in keys:
            found = self.entries.get(key)
            if found is not None and found[1] > now:
                if found[0] == _ENDED:
                    return "ended"
                if found[0] != tenant:
                    return "foreign"
        for key in keys:
            self._put(key, tenant, now)
        return "ok"

    async def end(self, keys: Sequence[str], now: float) -> None:
        for key in keys:
            self._put(key, _ENDED, now)

    def _put(self, key: str, value: str, now: float) -> None:
        self.entries.pop(key, None)  # re-inserted last: the dict's order is the use order
        self.entries[key] = (value, now + ENTRY_TTL)
        while len(self.entries) > self.limit:
            del self.entries[next(iter(self.entries))]


_CLAIM = Script("""
local tenant, ttl = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[3] then return 2 end
  if owner and owner ~= tenant then return 1 end
end
for i, key in ipairs(KEYS) do redis.call('SET', key, tenant, 'EX', ttl) end
return 0
""")
_END = Script("""
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[1], 'EX', tonumber(ARGV[2])) end
return 0
""")


class RedisSessionRegistry:
    """The registry in Redis, shared by every extproc replica (one script call per request)."""

    def __init__(self, client: RedisClient, timeout: float, prefix: str = "crdgol:mcp-session:") -> None:
        self.client, self.timeout, self.prefix = client, timeout, prefix

    async def claim(self, keys: Sequence[str], tenant: str, now: float) -> Verdict:
        got = await bounded(self.client.run(_CLAIM, [self.prefix + k for k in keys], [tenant, ENTRY_TTL, _ENDED]), self.timeout, "MCP session claim")
        return "ended" if got == 2 else "foreign" if got == 1 else "ok"

    async def end(self, keys: Sequence[str], now: float) -> None:
        await bounded(self.client.run(_END, [self.prefix + k for k in keys], [_ENDED, ENTRY_TTL]), self.timeout, "MCP session end")


class McpSessions:
    """The registry and the HTTP client that ends sessions on the servers."""

    def __init__(self, registry: SessionRegistry | None = None) -> None:
        self.registry: SessionRegistry = registry or MemorySessionRegistry()
        self._http: aiohttp.ClientSession | None = None
        self.warned_at = float("-inf")
        # Counts a store failure (``Services`` points it at its metric).
        self.on_store_error: Callable[[], None] = lambda: None

    async def claim(self, keys: Sequence[str], tenant: str, now: float) -> Verdict:
        if not keys:
            return "ok"
        try:
            return await self.registry.claim(keys, tenant, now)
        except StoreUnavailable as exc:
            self._store_failed(exc, now)
            return "ok"

    async def end(self, keys: Sequence[str], now: float) -> None:
        try:
            await self.registry.end(keys, now)
        except StoreUnavailable as exc:
            self._store_failed(exc, now)

    def _store_failed(self, exc: Exception, now: float) -> None:
        self.on_store_error()
        if now - self.warned_at >= 10.0:
            self.warned_at = now
            log.warning("MCP session registry unavailable (%s): requests go on without its checks", exc)

    async def end_on_servers(self, sessions: Sequence[tuple[ToolServer, str]], protocol: str) -> dict[str, int]:
        """DELETE each server's session at the server, at once; its status by server key (0: no
        answer). A server that does not hear it ends the session on its own timeout."""
        if self._http is None:
            # No environment proxies; no redirects (below: a server cannot send the credential elsewhere).
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=END_TIMEOUT), trust_env=False)
        http = self._http

        async def one(server: ToolServer, session: str) -> int:
            headers = {SESSION_HEADER: session}
            if protocol:
                headers[PROTOCOL_HEADER] = protocol
            if server.credential_header:
                headers[server.credential_header] = server.credential_value
            try:
                async with http.delete(server.url, headers=headers, allow_redirects=False) as response:
                    return response.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a header aiohttp refuses
                log.info("ending an MCP session on %s failed: %s", server.key, type(exc).__name__)
                return 0

        codes = await asyncio.gather(*(one(s, sid) for s, sid in sessions))
        return {s.key: code for (s, _), code in zip(sessions, codes, strict=True)}

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


__all__ = [
    "GatewaySession",
    "McpSessions",
    "MemorySessionRegistry",
    "RedisSessionRegistry",
    "SessionRegistry",
    "entry_key",
    "parse_session_id",
]
