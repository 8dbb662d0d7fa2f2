"""Context read from MCP servers: the part of the context policy that speaks the real Model
Context Protocol (streamable HTTP, through the official ``mcp`` SDK's client).

Contract
--------
``ContextSources.read(sources, variables, binding)`` returns one ``FetchedSource`` per source that
could be read, in order, for ``extproc.context.build_injection`` to place (untrusted, user role):

* a resource source reads ``resources/read`` of its URI template rendered with ``variables``
  (each value percent-encoded, so a value cannot add a path segment or a query); a prompt source
  reads ``prompts/get`` with its argument templates rendered (plain text);
* text contents are kept (binary contents are named, not included), cut to the source's
  ``max_tokens`` (about four bytes a token); a response body over ``MAX_RESPONSE_BYTES`` (4 MiB)
  fails the read as it arrives, so a server cannot make extproc buffer more;
* a result is reused for ``cache_ttl`` seconds by every request that makes the same read on the
  same server with the same credential (one entry per read; the cache holds at most
  ``max_entries`` entries and ``max_bytes`` of text, least recently used out first); concurrent
  identical reads share one fetch;
* each read (connecting included) gets the server's ``timeout``. A read that fails or times out is
  skipped, or with ``refuse_on_failure`` the whole request is refused: ``ContextSourceFailed``
  (502, the server answered with an error) or ``ContextSourceUnavailable`` (503, unreachable or too
  slow). Either way it is counted, and logged without the credential.

Cost: one client session per server (endpoint and credential), opened on first use and kept open
across requests; a broken one is reopened on the next read, at most once a second while the server
stays unreachable (reads in between fail at once). A session no read used for ten minutes (a
server the policy no longer names, say) is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

from extproc.context import FetchedSource, render_template
from extproc.errors import GatewayError, Unavailable
from extproc.metrics import Metrics
from extproc.policy import McpServer, McpSource, Policy

log = logging.getLogger(__name__)

__all__ = ["ContextSourceFailed", "ContextSourceUnavailable", "ContextSources"]

RECONNECT_PAUSE = 1.0  # seconds between attempts to open a session with an unreachable server
IDLE_CLOSE = 600.0  # a session no read used for this long is closed
SWEEP_EVERY = 60.0
BYTES_PER_TOKEN = 4
MAX_SOURCE_TOKENS = 100_000  # the largest maxTokens a source may have (the CRD's maximum)
# One response of a server, JSON framing included: room for the largest source, and no more than
# a bounded amount of memory for an answer that is cut anyway.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
CLIENT_NAME = "crdgol-gateway"


class ContextSourceFailed(GatewayError):
    status = 502
    type = "server_error"
    code = "context_source_failed"


class ContextSourceUnavailable(Unavailable):
    code = "context_source_unavailable"


class _Unreachable(Exception):
    """The session could not be opened or broke: reopen it on the next read."""


class _ResponseTooLarge(Exception):
    """A server's response body passed ``MAX_RESPONSE_BYTES``."""


class _ServerError(Exception):
    """The server answered with an error (its own text is not kept: it goes to no one)."""


@cache
def load_sdk() -> Any:
    """The MCP SDK. Imported only once a policy names MCP sources (``ContextSources.policy_changed``,
    in a thread): it adds ~30 MB and a second or so of import to a process, which only extproc
    replicas serving such a binding should pay, and never on the request path's event loop."""
    import httpx2
    import mcp
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED

    class CappedBody(httpx2.AsyncByteStream):
        """A response body that fails past ``MAX_RESPONSE_BYTES``: a server's answer is untrusted."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __aiter__(self) -> Any:
            seen = 0
            async for chunk in self.inner:
                seen += len(chunk)
                if seen > MAX_RESPONSE_BYTES:
                    raise _ResponseTooLarge()
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    class CappedTransport(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            response = await self.inner.handle_async_request(request)
            response.stream = CappedBody(response.stream)
            return response

        async def aclose(self) -> None:
            await self.inner.aclose()

    return SimpleNamespace(
        httpx2=httpx2,
        transport=CappedTransport,
        Client=mcp.Client,
        client_info=mcp.Implementation(name=CLIENT_NAME, version="0.1.0"),
        streamable_http_client=streamable_http_client,
        MCPError=MCPError,
        CONNECTION_CLOSED=CONNECTION_CLOSED,
    )


def _translate(exc: BaseException) -> Exception:
    """An SDK or transport failure as ``_ServerError`` (the server answered with an error) or
    ``_Unreachable`` (anything else). The SDK's task groups wrap errors in exception groups."""
    sdk = load_sdk()
    if isinstance(exc, sdk.MCPError) and exc.error.code != sdk.CONNECTION_CLOSED:
        return _ServerError()
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if isinstance(_translate(inner), _ServerError):
                return _ServerError()
    return _Unreachable()


_ReadKey = tuple[tuple[str, tuple[tuple[str, str], ...]], str, str, tuple[tuple[str, str], ...]]


class _Session:
    """One MCP client session with one server, owned by a task that keeps it open until closed.

    The SDK's client lives in anyio task groups, which must be entered and left by one task: that
    task is ``_run``; reads from request tasks go through the client it publishes.
    """

    def __init__(self, server: McpServer) -> None:
        self.url = server.url
        self.headers = dict(server.auth_headers)
        self.name = server.name
        self._ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    @property
    def alive(self) -> bool:
        return not self._task.done()

    async def client(self) -> Any:
        """The SDK's ``mcp.Client``, once the session is open; ``_Unreachable`` or ``_ServerError``."""
        return await asyncio.shield(self._ready)

    async def _run(self) -> None:
        sdk = load_sdk()
        try:
            async with (
                sdk.httpx2.AsyncClient(headers=self.headers, timeout=sdk.httpx2.Timeout(30.0), transport=sdk.transport()) as http,
                sdk.Client(sdk.streamable_http_client(self.url, http_client=http), cache=None, client_info=sdk.client_info) as client,
            ):
                self._ready.set_result(client)
                await self._stop.wait()
        except Exception as exc:  # any failure ends the session the same way
            failure = _translate(exc)
            log.warning("MCP server %s: session ended (%s)", self.name, "error answer" if isinstance(failure, _ServerError) else "unreachable")
            if not self._ready.done():
                # The server answered the handshake with an error (a refused credential, say): that
                # is an error answer, not an unreachable server.
                self._ready.set_exception(failure)
        finally:
            if not self._ready.done():
                self._ready.set_exception(_Unreachable())
            else:
                # A session that broke after opening: reads waiting on it fail now, not at their timeout.
                self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5.0)


@dataclass(slots=True)
class _Entry:
    expires: float
    text: str


class ContextSources:
    """Every MCP session and cached read of one extproc process."""

    def __init__(
        self,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        # The SDK's HTTP client logs every request line at INFO, and the MCP client every message at
        # DEBUG: resource URIs and prompt arguments carry callers' profile values, which stay out of
        # the logs like the rest of a prompt.
        for name in ("httpx2", "mcp"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._sessions: dict[tuple[str, tuple[tuple[str, str], ...]], _Session] = {}
        self._paused_until: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._cache: OrderedDict[_ReadKey, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[_ReadKey, asyncio.Future[str]] = {}
        self._used_at: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._swept_at = clock()
        self._closing: set[asyncio.Future[None]] = set()
        self._sdk_loading: threading.Thread | None = None
        metrics.context_source_sessions.set_function(lambda: self.open_sessions)

    def policy_changed(self, policy: Policy) -> None:
        """Start importing the SDK in a thread when ``policy`` first names an MCP source."""
        if self._sdk_loading is not None:
            return
        if any(b.context.mcp_sources for bindings in policy.models.values() for b in bindings):
            self._sdk_loading = threading.Thread(target=load_sdk, name="mcp-sdk-import", daemon=True)
            self._sdk_loading.start()

    async def sdk_ready(self, *, only_if_started: bool = False) -> None:
        """Wait, without blocking the event loop, for the import ``policy_changed`` started (or
        start it). extproc waits for it before it opens its socket, so reads right after a start
        do not; a policy that adds the first MCP source later makes its first reads wait once."""
        loading = self._sdk_loading
        if loading is None and only_if_started:
            return
        if loading is None:
            self._sdk_loading = loading = threading.Thread(target=load_sdk, name="mcp-sdk-import", daemon=True)
            loading.start()
        while loading.is_alive():
            await asyncio.sleep(0.01)

    # --- the request path ---------------------------------------------------------------------

    async def read(self, sources: Sequence[McpSource], variables: Mapping[str, str], binding: str) -> list[FetchedSource]:
        """The sources' texts for one request, in order; see the module docstring."""
        self._sweep()
        encoded: dict[str, str] | None = None
        texts: list[str | None] = []
        keys: list[_ReadKey] = []
        for source in sources:
            if source.resource_uri:
                encoded = encoded if encoded is not None else {k: quote(v, safe="") for k, v in variables.items()}
                key: _ReadKey = (source.server.session_key, "resource", render_template(source.resource_uri, encoded), ())
            else:
                args = tuple((k, render_template(v, variables)) for k, v in source.prompt_arguments)
                key = (source.server.session_key, "prompt", source.prompt_name, args)
            keys.append(key)
            texts.append(self._cached(key))
        reads = self.metrics.context_source_reads
        misses = [i for i, t in enumerate(texts) if t is None]
        if misses:  # the cached ones are answered without a task or an await
            await self.sdk_ready()  # once per process, outside the reads' timeouts
            fetched = await asyncio.gather(*(self._read_one(sources[i], keys[i], binding) for i in misses))
            for i, text in zip(misses, fetched, strict=True):
                texts[i] = text
        out = []
        for i, (source, text) in enumerate(zip(sources, texts, strict=True)):
            if text is None:
                continue  # skipped (a refusal has raised already)
            if i not in misses:
                reads.labels(binding, source.server.name, "cached").inc()
            out.append(FetchedSource(source.server.name, source.title, _cut(text, source.max_tokens)))
        return out

    async def _read_one(self, source: McpSource, key: _ReadKey, binding: str) -> str | None:
        """Fetch one source not in the cache; None when it is skipped."""
        server = source.server
        reads = self.metrics.context_source_reads
        try:
            text = await asyncio.wait_for(self._fetch_shared(key, server), server.timeout)
            reads.labels(binding, server.name, "fetched").inc()
        except (TimeoutError, _Unreachable) as exc:
            outcome = "timeout" if isinstance(exc, TimeoutError) else "unreachable"
            self._failed(source, binding, outcome, ContextSourceUnavailable(_refusal(server, outcome)))
            return None
        except _ServerError:
            self._failed(source, binding, "error", ContextSourceFailed(_refusal(server, "error")))
            return None
        return text

    def _failed(self, source: McpSource, binding: str, outcome: str, refusal: GatewayError) -> None:
        """Count a failed read; raise ``refusal`` when the source's fail policy is refuse."""
        server = source.server.name
        self.metrics.context_source_reads.labels(binding, server, outcome).inc()
        policy = "refuse" if source.refuse_on_failure else "skip"
        self.metrics.context_source_failures.labels(binding, server, policy).inc()
        log.info("context source %r of %s not read (%s; fail policy %s)", source.title, binding, outcome, policy)
        if source.refuse_on_failure:
            raise refusal

    # --- cache and single flight --------------------------------------------------------------

    def _cached(self, key: _ReadKey) -> str | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._evict(key)
            return None
        self._cache.move_to_end(key)
        return entry.text

    def _store(self, key: _ReadKey, text: str, ttl: float) -> None:
        if ttl <= 0 or len(text) > self.max_bytes:
            return
        if key in self._cache:
            self._evict(key)
        self._cache[key] = _Entry(self.clock() + ttl, text)
        self._cached_bytes += len(text)
        while len(self._cache) > self.max_entries or self._cached_bytes > self.max_bytes:
            self._evict(next(iter(self._cache)))

    def _evict(self, key: _ReadKey) -> None:
        entry = self._cache.pop(key)
        self._cached_bytes -= len(entry.text)

    async def _fetch_shared(self, key: _ReadKey, server: McpServer) -> str:
        """One fetch for concurrent identical reads: later readers wait on the first one's."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(key, server))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(key, None))
        # Shielded: one reader's timeout must not cancel the fetch the others (and the cache) wait for.
        return await asyncio.shield(pending)

    async def _fetch(self, key: _ReadKey, server: McpServer) -> str:
        _, kind, target, args = key
        client = await self._client(server)
        try:
            if kind == "resource":
                text = _resource_text(await client.read_resource(target))
            else:
                text = _prompt_text(await client.get_prompt(target, dict(args)))
        except Exception as exc:
            failure = _translate(exc)
            if isinstance(failure, _Unreachable):  # the session broke: reopen it next time
                self._drop(server)
            raise failure from None
        # No source injects more than MAX_SOURCE_TOKENS: keep no more than that (and a character
        # to show it was cut) of a large answer, in the cache or in flight.
        text = text[: MAX_SOURCE_TOKENS * BYTES_PER_TOKEN + 1]
        self._store(key, text, server.cache_ttl)
        return text

    # --- sessions -------------------------------------------------------------------------------

    async def _client(self, server: McpServer) -> Any:
        key = server.session_key
        self._used_at[key] = self.clock()
        session = self._sessions.get(key)
        if session is None or not session.alive:
            if self.clock() < self._paused_until.get(key, float("-inf")):
                raise _Unreachable()
            session = self._sessions[key] = _Session(server)
        try:
            return await session.client()
        except (_Unreachable, _ServerError):
            self._paused_until[key] = self.clock() + RECONNECT_PAUSE
            self._sessions.pop(key, None)
            raise

    def _drop(self, server: McpServer) -> None:
        session = self._sessions.pop(server.session_key, None)
        if session is not None:
            self._close_later(session)

    def _close_later(self, session: _Session) -> None:
        task = asyncio.ensure_future(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _sweep(self) -> None:
        """Close sessions no read used for ``IDLE_CLOSE`` seconds (a server the policy no longer
        names, or one nobody calls): at most once a minute, from the request path."""
        now = self.clock()
        if now - self._swept_at < SWEEP_EVERY:
            return
        self._swept_at = now
        for key in [k for k, used in self._used_at.items() if now - used > IDLE_CLOSE]:
            del self._used_at[key]
            self._paused_until.pop(key, None)
            session = self._sessions.pop(key, None)
            if session is not None:
                self._close_later(session)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions))

    @property
    def open_sessions(self) -> int:
        return sum(1 for s in self._sessions.values() if s.alive)


def _refusal(server: McpServer, outcome: str) -> str:
    what = {"timeout": "did not answer in time", "unreachable": "could not be reached", "error": "answered with an error"}[outcome]
    return f"the context source {server.name!r} {what}, and this model's context policy requires it"


def _resource_text(result: Any) -> str:
    parts = []
    for c in result.contents:
        text = getattr(c, "text", None)
        parts.append(text if isinstance(text, str) else f"[binary content of {getattr(c, 'uri', 'a resource')} omitted]")
    return "\n".join(parts)


def _prompt_text(result: Any) -> str:
    lines = []
    for m in result.messages:
        content = m.content
        text = getattr(content, "text", None)
        if text is None:
            text = getattr(getattr(content, "resource", None), "text", None)
        lines.append(f"{m.role}: {text}" if isinstance(text, str) else f"{m.role}: [{getattr(content, 'type', 'content')} omitted]")
    return "\n".join(lines)


def _cut(text: str, max_tokens: int) -> str:
    limit = max_tokens * BYTES_PER_TOKEN
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + f"\n[cut by the gateway to about {max_tokens} tokens]"
