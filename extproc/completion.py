"""``POST /v1/chat/completions`` and ``POST /v1/messages`` (``Completion``): on top of what every
model call does (``extproc.model_call``), the request's validation, the response cache, context
injection (template, profile, knowledge, MCP sources, session history) and the history append.
"""

from __future__ import annotations

from typing import Any

from crdgol.request_path import (
    SESSION_HEADER,
)
from extproc import context as context_policy
from extproc.admission import Outcome
from extproc.cache import CACHE_HEADER, CacheCall
from extproc.cache_charge import CallerMeter
from extproc.cache_key import message_text
from extproc.errors import (
    BadRequest,
)
from extproc.history import Turn, history_key, validate_session_id
from extproc.model_call import ModelCall
from extproc.phases import (
    PASS,
    Continue,
    Headers,
    Reply,
    Respond,
)
from extproc.policy import Api, Binding
from extproc.quota import Demand
from extproc.quota_store import StoreUnavailable
from extproc.route_reply import cache_state
from extproc.services import (
    Services,
)
from extproc.tracing import step
from extproc.usage import text_from_json


class Completion(ModelCall):
    """Chat completions (OpenAI) and messages (Anthropic), streamed or not."""

    def __init__(self, services: Services, api: Api) -> None:
        super().__init__(services, api)
        self.stream = False
        self.client_wants_usage = False
        self.session = ""
        self.user_text = ""
        self.cache: CacheCall | None = None  # the binding's response cache (extproc.cache)

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        reply = await super().request_headers(headers, end_of_stream)
        raw_session = headers.get(SESSION_HEADER)
        if raw_session is not None:
            self.session = validate_session_id(raw_session)
        return reply

    def _validate(self, doc: dict[str, Any]) -> list[Any]:
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", code="invalid_messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a 'role'", code="invalid_messages")
        if self.api is Api.ANTHROPIC:
            mt = doc.get("max_tokens")
            if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
                raise BadRequest("'max_tokens' is required: a positive integer", code="invalid_max_tokens")
        stream = doc.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false", code="invalid_stream")
        return messages

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        doc = self.parse(body)
        with step(self.trace, "crdgol.route"):
            binding = self.select(doc)
        messages = self._validate(doc)
        self.stream = bool(doc.get("stream"))
        self.user_text = last_user_text(messages)
        if self.api is Api.OPENAI:
            opts = doc.get("stream_options")
            self.client_wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            if self.stream:
                # Usage is always metered: ask for it upstream, strip it again if the client did not.
                doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        ctx = binding.context
        if ctx.active:
            with step(self.trace, "crdgol.context"):
                doc = await self._inject(doc, binding)
        if binding.cache is not None:
            hit = await self._from_cache(doc, binding)
            if hit is not None:
                if self.trace is not None:
                    self.trace.end(self, None)  # answered from the cache
                return hit
        return await self.forward(doc, binding)

    async def _from_cache(self, doc: dict[str, Any], binding: Binding) -> Respond | None:
        """Answer from the cache (keyed after context injection), charging one request, no tokens."""
        assert self.identity is not None
        self.cache = self.services.cache.open(
            self.services.current, binding, self.api, self.identity.tenant, doc, self.headers,
            stream=self.stream, include_usage=self.client_wants_usage, meter=CallerMeter(self.services, self.identity.tenant),
        )
        hit = await self.cache.lookup() if self.cache is not None else None
        if hit is None or self.cache is None:
            return None
        await self.admission.admit(self.identity.tenant, binding, doc, 0, demand=Demand(requests=1))
        self.cache.served(hit)
        self.status, self.answered, self.finished = 200, True, True
        self.admission.finish(Outcome.ANSWERED, None, "")
        m = self.services.metrics
        m.record_duration(self.labels(), 200, self.services.clock() - self.started)  # and counts it
        if binding.context.history.enabled and self.session:
            await self._remember(text_from_json(self.api, hit.entry.body))
        return Respond(200, hit.body, {**hit.headers, **self.admission.headers()})

    async def _inject(self, doc: dict[str, Any], binding: Binding) -> dict[str, Any]:
        assert self.identity is not None
        ctx = binding.context
        turns: list[Turn] = []
        if ctx.history.enabled and self.session:
            key = history_key(self.identity.tenant, binding.key, self.identity.principal, self.session)
            try:
                turns = await self.services.history.load(key, ctx.history.max_turns)
            except (StoreUnavailable, TimeoutError) as exc:
                # Fail policy for history: open. The request goes on without the earlier turns.
                self.services.history_store_error(exc)
        today = self.services.today()
        sources: list[context_policy.FetchedSource] = []
        if ctx.mcp_sources:
            # A tenant over its quota is refused before the servers are read, not after.
            await self.admission.refuse_if_spent(self.identity.tenant, binding)
            # May refuse the request (a source whose fail policy is refuse): a GatewayError.
            variables = context_policy.source_variables(
                ctx, self.identity, self.headers, model=binding.model, today=today, session=self.session
            )
            sources = await self.services.context_sources.read(ctx.mcp_sources, variables, binding.key)
        inj = context_policy.build_injection(
            ctx, self.identity, self.headers, turns, model=binding.model, today=today, sources=sources
        )
        m = self.services.metrics
        m.context_tokens.labels(binding.key).inc(inj.tokens)
        if inj.dropped_turns:
            m.history_dropped.labels(binding.key).inc(inj.dropped_turns)
        if self.api is Api.OPENAI:
            return context_policy.apply_openai(doc, inj)
        return context_policy.apply_anthropic(doc, inj)

    def streamed(self) -> bool:
        return self.stream

    def response_needs(self) -> tuple[str, ...]:
        binding, primary = self.binding, self.binding.primary if self.binding is not None else None
        needs = (
            ("history", binding is not None and binding.context.history.enabled and bool(self.session)),
            ("translation", primary is not None and primary.api is not self.api),
            ("usage chunk stripped", self.stream and self.api is Api.OPENAI and not self.client_wants_usage),
            # A miss to store; the x-crdgol-cache header of any other comes from the route metadata.
            ("response cache", self.cache is not None and self.cache.storing),
        )
        return tuple(name for name, needed in needs if needed)

    def state(self) -> dict[str, str | float]:
        out = super().state()
        out["stream"] = "1" if self.stream else ""
        out["include_usage"] = "1" if self.client_wants_usage else ""
        binding = self.binding
        # A session call's answer is remembered on its own stream: the response side, which then
        # sees only its errors, needs neither the session nor the user's text (which would
        # otherwise ride in every access-log entry).
        remembered_there = not self.same_stream
        if remembered_there and self.session and binding is not None and binding.context.history.enabled and self.identity is not None:
            out["session"] = self.session
            out["principal"] = self.identity.principal  # the session is this caller's own
            out["user_text"] = self.user_text
        if self.cache is not None and not self.same_stream:
            # The cache's part of this call, for the response side (whichever replica it reaches);
            # a session call's stays here, where its answer is read (a provider's error, mapped
            # by the response filter, stores nothing).
            out.update(cache_state(self.cache))
            self.cache.hand_off()  # the response side lands its flight (extproc.cache_flight)
        return out

    def route_response_headers(self) -> dict[str, str]:
        out = super().route_response_headers()
        if self.cache is not None:
            out[CACHE_HEADER] = self.cache.state
        return out

    def needs_body(self, headers: Headers) -> bool:
        binding = self.binding
        if binding is not None and binding.context.history.enabled and self.session:
            return True  # the reply's text joins the session history
        if self.cache is not None and self.cache.storing:
            return True  # the answer is stored once complete
        # A stream whose forced usage chunk must be stripped for a client that did not ask.
        stream = "text/event-stream" in headers.get("content-type", "")
        return stream and self.api is Api.OPENAI and not self.client_wants_usage

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        reply = await super().response_headers(headers, end_of_stream)
        if self.cache is not None and isinstance(reply, Continue) and reply is not PASS:
            reply.set_headers[CACHE_HEADER] = self.cache.state
            if self.status != 200 or end_of_stream:
                await self.cache.finish(self.status, False, None, None)  # nothing to store
        return reply

    async def read_body(self, body: bytes, end_of_stream: bool) -> Reply:
        out = self.client_bytes(body, end_of_stream)
        if self.cache is not None and self.cache.storing:
            self.cache.observe(out)
        if end_of_stream and not self.finished:
            reader = self.reader
            self.account(reader.usage if reader is not None else None, complete=reader is None or reader.complete)
            await self._remember(reader.text if reader is not None else "")
        if end_of_stream and self.cache is not None and self.cache.storing:
            reader, entry = self.reader, self.services.current.backends.get(self.backend)
            await self.cache.finish(
                self.status, reader is not None and reader.done, reader.usage if reader is not None else None,
                entry[1].price if entry is not None else None,
            )
        return PASS if out is body or out == body else Continue(body=out)

    def close(self) -> None:
        super().close()
        if self.cache is not None:
            self.cache.abandon()  # requests waiting for this one's answer stop waiting (extproc.cache_flight)

    async def _remember(self, reply_text: str) -> None:
        """Record the user turn and the assistant's reply once the response has ended."""
        binding, ident = self.binding, self.identity
        if binding is None or ident is None or not self.session or not binding.context.history.enabled:
            return
        if not reply_text or self.status != 200:
            return
        h = binding.context.history
        key = history_key(ident.tenant, binding.key, ident.principal, self.session)
        turns = [Turn("user", self.user_text), Turn("assistant", reply_text)] if self.user_text else [Turn("assistant", reply_text)]
        try:
            # ~4 bytes a token: turns beyond the history budget could never be injected.
            await self.services.history.append(key, turns, h.max_turns, h.ttl_seconds, max_chars=h.max_tokens * 4)
        except (StoreUnavailable, TimeoutError) as exc:
            self.services.history_store_error(exc)


def last_user_text(messages: list[Any]) -> str:
    """The text of the last user message (string content or text parts/blocks joined)."""
    for m in reversed(messages):
        if m.get("role") != "user":
            continue
        return message_text(m.get("content"))
    return ""
