"""Response caching for chat completions and messages: answered by extproc before any provider.

``ResponseCache`` (one per process, on ``Services``) holds the stores and the metrics;
``ResponseCache.open`` gives a ``CacheCall`` for one request of a binding with ``spec.cache``
(None when the binding has none or the request is not eligible). The request path
(``extproc.completion.Completion``) then:

1. ``lookup()`` after context injection: the stored answer (``Hit``) or None. Exact mode reads
   the entry of ``cache_key.make_key``'s ``exact`` key; semantic mode, on an exact miss, embeds
   the last user message and searches the request's partition (``extproc.cache_semantic``).
   A hit is a complete response in the client's API: the stored body, or for a streamed request
   that body played back as SSE (``extproc.cache_replay``). The gateway answers it as an
   immediate response, charging one request and no tokens.
2. On a miss, ``storing`` says whether the response body must be read; ``observe`` is given the
   client's bytes as they pass and ``finish`` stores the answer when, and only when, it is
   complete: status 200, a whole JSON body (or a stream that ended cleanly), not an error, not
   cut short, within ``maxEntryBytes``.

Identical misses in flight at once are coalesced (``extproc.cache_flight``): the first that will
store its answer leads and goes to the provider; the others wait, at most ``coalesce_wait``
seconds, for the answer it stores, and are served it as a hit (in their own form, streamed or
not); if the leader fails, stores nothing or the time runs out, they go to the provider.

A semantic lookup's embeddings call is made for the caller: it is charged to the caller's tenant
on the embeddings binding's quotas (``EmbeddingMeter``; ``extproc.cache_charge``). A tenant
that has no quota left there gets no semantic lookup (its request misses), not a refusal.

The fail policy of a cache is always "miss": a store or embeddings failure is counted
(``crdgol_cache_errors``), logged at most every 10 s, and the request goes to the provider.
Metric labels are binding keys and fixed words only.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from extproc.cache_flight import Flight, Flights
from extproc.cache_key import BYPASS_HEADER, CacheKey, Directives, directives, eligible, make_key
from extproc.cache_replay import StreamAssembler, replay
from extproc.cache_store import CacheStore, MemoryCacheStore, RedisCacheStore
from extproc.policy import Api, Binding, CacheRule, Policy
from extproc.quota import Price, cost_micros
from extproc.quota_store import StoreUnavailable
from extproc.redis_client import RedisClient
from extproc.usage import Usage

if TYPE_CHECKING:
    from extproc.cache_semantic import Embedder, EmbeddingFailed, Vector, VectorStore

__all__ = ["CACHE_HEADER", "CacheCall", "CacheMetrics", "EmbeddingMeter", "Hit", "ResponseCache"]

log = logging.getLogger(__name__)

CACHE_HEADER = BYPASS_HEADER  # on responses: hit | miss | bypass


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.lookups = Counter(
            "crdgol_cache_lookups", "Cache lookups by binding and result (hit, miss, bypass).", ["binding", "result"], registry=r
        )
        self.hit_bytes = Counter("crdgol_cache_hit_bytes", "Response bytes answered from the cache.", ["binding"], registry=r)
        self.stored = Counter("crdgol_cache_stored", "Answers stored in the cache.", ["binding"], registry=r)
        self.stored_bytes = Counter("crdgol_cache_stored_bytes", "Bytes of answers stored in the cache.", ["binding"], registry=r)
        self.not_stored = Counter(
            "crdgol_cache_not_stored",
            "Answers not stored, by reason (status, incomplete, too_large, no_store, error).",
            ["binding", "reason"],
            registry=r,
        )
        self.tokens_saved = Counter(
            "crdgol_cache_tokens_saved", "Tokens a cache hit did not spend, by type (input/output).", ["binding", "type"], registry=r
        )
        self.money_saved = Counter(
            "crdgol_cache_money_saved", "Money a cache hit did not spend, in the pricing table's currency.", ["binding"], registry=r
        )
        self.errors = Counter("crdgol_cache_errors", "Cache store or embeddings failures (each became a miss).", ["stage"], registry=r)
        self.semantic_seconds = Histogram(
            "crdgol_cache_semantic_search_seconds",
            "Time of a semantic lookup beyond the embeddings call (vector search and entry read).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.embed_seconds = Histogram(
            "crdgol_cache_embedding_seconds",
            "Time of the embeddings call of a semantic lookup.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.coalesced = Counter(
            "crdgol_cache_coalesced",
            "Misses that waited for an identical request in flight, by outcome (served: its stored answer; "
            "upstream: it stored none in time, so the request went to the provider).",
            ["binding", "outcome"],
            registry=r,
        )
        self._bound: dict[str, BindingCounters] = {}

    def of(self, binding: str) -> BindingCounters:
        """One binding's counters (label look-ups cost more than the increments: kept per binding,
        whose number the policy bounds)."""
        bound = self._bound.get(binding)
        if bound is None:
            bound = self._bound[binding] = BindingCounters(
                hit=self.lookups.labels(binding, "hit"),
                miss=self.lookups.labels(binding, "miss"),
                bypass=self.lookups.labels(binding, "bypass"),
                hit_bytes=self.hit_bytes.labels(binding),
                input_saved=self.tokens_saved.labels(binding, "input"),
                output_saved=self.tokens_saved.labels(binding, "output"),
                money_saved=self.money_saved.labels(binding),
            )
        return bound


@dataclass(frozen=True, slots=True)
class BindingCounters:
    hit: Any
    miss: Any
    bypass: Any
    hit_bytes: Any
    input_saved: Any
    output_saved: Any
    money_saved: Any


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer: the complete body in the client's API and what producing it cost."""

    body: bytes
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0

    def encode(self) -> bytes:
        head = orjson.dumps({"in": self.input_tokens, "out": self.output_tokens, "cost": self.cost_micros})
        return head + b"\n" + self.body

    @staticmethod
    def decode(raw: bytes) -> Entry | None:
        head, sep, body = raw.partition(b"\n")
        try:
            h = orjson.loads(head)
            return Entry(body, int(h["in"]), int(h["out"]), int(h["cost"])) if sep else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Hit:
    status: int
    body: bytes
    headers: dict[str, str]
    entry: Entry


def _memory_vectors() -> VectorStore:
    from extproc.cache_semantic import MemoryVectorStore

    return MemoryVectorStore()


def _embedder() -> Embedder:
    from extproc.cache_semantic import Embedder

    return Embedder()


class EmbeddingCharge(Protocol):
    def settle(self, tokens: int, failure: EmbeddingFailed | None) -> None:
        """The call ended: ``tokens`` the backend reported using, or the ``failure``."""


class EmbeddingMeter(Protocol):
    """Charges a semantic lookup's embeddings call to the caller (``extproc.cache_charge``)."""

    async def reserve(self, binding: Binding, text: str) -> EmbeddingCharge | None:
        """Reserve the call on ``binding``'s quotas; None: over quota, so no call is made."""


# How long a miss waits for an identical request in flight to store its answer (the provider's
# time for one answer, typically; a follower waits no longer than going there itself would take).
COALESCE_WAIT = 5.0


@dataclass
class ResponseCache:
    store: CacheStore = field(default_factory=MemoryCacheStore)
    # Built on first semantic use: numpy is imported only by processes that need it.
    vectors_factory: Callable[[], VectorStore] = _memory_vectors
    embedder_factory: Callable[[], Embedder] = _embedder
    clock: Callable[[], float] = time.monotonic
    metrics: CacheMetrics | None = None
    warned_at: float = float("-inf")
    _vectors: VectorStore | None = None
    _embedder: Embedder | None = None
    coalesce_wait: float = COALESCE_WAIT
    flights: Flights[Entry] = field(init=False)

    # A semantic miss's question vector, from the request side to the response side that stores
    # the answer (one-message path): by key, bounded, oldest dropped first. On another replica, or
    # once dropped, the response side embeds the question again.
    pending_vectors: OrderedDict[str, Vector] = field(init=False)
    PENDING_VECTORS = 1024

    def __post_init__(self) -> None:
        self.flights = Flights(self.coalesce_wait)
        self.pending_vectors = OrderedDict()

    @staticmethod
    def in_redis(client: RedisClient, timeout: float) -> ResponseCache:
        """Answers and semantic vectors in Redis, shared by every replica."""

        def vectors() -> VectorStore:
            from extproc.cache_semantic import RedisVectorStore

            return RedisVectorStore(client, timeout=timeout)

        return ResponseCache(store=RedisCacheStore(client, timeout=timeout), vectors_factory=vectors)

    async def aclose(self) -> None:
        """Release what the cache holds open (the embeddings client's HTTP session): at shutdown."""
        if self._embedder is not None:
            await self._embedder.aclose()

    def attach(self, registry: CollectorRegistry) -> None:
        if self.metrics is None:
            self.metrics = CacheMetrics(registry)

    @property
    def vectors(self) -> VectorStore:
        if self._vectors is None:
            self._vectors = self.vectors_factory()
        return self._vectors

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self.embedder_factory()
        return self._embedder

    def failed(self, stage: str, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(stage).inc()
        now = self.clock()
        if now - self.warned_at >= 10.0:
            self.warned_at = now
            log.warning("response cache unavailable at %s (%s): requests go to the provider", stage, type(exc).__name__)

    def open(
        self,
        policy: Policy,
        binding: Binding,
        api: Api,
        tenant: str,
        doc: dict[str, Any],
        headers: dict[str, str],
        *,
        stream: bool,
        include_usage: bool,
        meter: EmbeddingMeter | None = None,
    ) -> CacheCall | None:
        """The cache's part in one request (None: the binding has no cache or it is not eligible).

        ``meter`` charges a semantic lookup's embeddings calls to the caller (None: uncharged)."""
        rule = binding.cache
        if rule is None or not eligible(rule, doc, stream):
            return None
        wish = directives(headers)
        try:
            key = make_key(binding, api, tenant, doc)
        except orjson.JSONEncodeError:  # nested beyond what orjson writes: forward() refuses it
            return None
        if self.metrics is None:
            self.attach(CollectorRegistry())
        return CacheCall(self, policy, binding, rule, api, key, wish, stream=stream, include_usage=include_usage, meter=meter)


class CacheCall:
    def __init__(
        self,
        cache: ResponseCache,
        policy: Policy,
        binding: Binding,
        rule: CacheRule,
        api: Api,
        key: CacheKey,
        wish: Directives,
        *,
        stream: bool,
        include_usage: bool,
        meter: EmbeddingMeter | None = None,
    ) -> None:
        self.cache, self.policy, self.binding, self.rule, self.api, self.key = cache, policy, binding, rule, api, key
        self.wish = wish
        self.stream = stream
        self.include_usage = include_usage
        self.state = "miss" if wish.lookup else "bypass"
        self.vector: Vector | None = None
        self.assembler = StreamAssembler(api) if stream else None
        self.collected: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.done = False
        self.meter = meter
        self.flight: Flight[Entry] | None = None  # this call leads identical misses (extproc.cache_flight)
        assert cache.metrics is not None
        self.m = cache.metrics

    @property
    def semantic(self) -> bool:
        return self.rule.semantic and bool(self.key.text and self.key.partition)

    @property
    def storing(self) -> bool:
        return self.wish.store and not self.done

    async def lookup(self) -> Hit | None:
        counters = self.m.of(self.binding.key)
        if not self.wish.lookup:
            counters.bypass.inc()
            self._lead()  # a fresh answer that will be stored: identical misses may wait for it
            return None
        entry = await self._get(self.key.exact)
        if entry is None:
            entry = await self._follow()
        if entry is None and self.semantic:
            entry = await self._semantic()
        if entry is None:
            counters.miss.inc()
            return None
        self._land(entry)  # a leader that found an answer after all hands it to its followers
        self.state, self.done = "hit", True
        return self._hit(entry)

    def _lead(self) -> None:
        if self.wish.store and self.flight is None:
            self.flight = self.cache.flights.lead(self.key.exact)

    async def _follow(self) -> Entry | None:
        """Lead the identical misses that come while this one is in flight, or wait for the one
        that leads them (None: go on as a miss)."""
        self._lead()
        if self.flight is not None or not self.cache.flights.is_open(self.key.exact):
            return None
        entry = await self.cache.flights.follow(self.key.exact)
        if entry is None:
            # The time ran out: the leader's answer may have been stored by another replica
            # (its response side went there), so look once more before going to the provider.
            entry = await self._get(self.key.exact)
        self.m.coalesced.labels(self.binding.key, "served" if entry is not None else "upstream").inc()
        if entry is None:
            self._lead()  # the next identical misses wait for this one's answer
        return entry

    def _land(self, entry: Entry | None) -> None:
        if self.flight is not None:
            self.cache.flights.land(self.flight, entry)
            self.flight = None

    def hand_off(self) -> None:
        """This call's response is handled on another stream (the one-message path's response
        side, ``adopt``): its flight stays open for that stream to land, or for its timer."""
        self.flight = None
        if self.vector is not None and self.storing:
            pending = self.cache.pending_vectors
            pending[self.key.exact] = self.vector
            while len(pending) > self.cache.PENDING_VECTORS:
                pending.popitem(last=False)

    def adopt(self) -> None:
        """Take over the open flight of this call's key in this process (the response side of a
        call that led it; on another replica there is none, and followers there time out)."""
        if self.wish.store and self.flight is None:
            self.flight = self.cache.flights.open_flight(self.key.exact)
        if self.vector is None:
            self.vector = self.cache.pending_vectors.pop(self.key.exact, None)

    def abandon(self) -> None:
        """The request ended without ``finish`` (refused, or its response never came): any
        requests waiting for its answer go to the provider now."""
        self._land(None)

    def _hit(self, entry: Entry) -> Hit:
        if self.stream:
            body = replay(self.api, orjson.loads(entry.body), self.include_usage)
            ctype = "text/event-stream; charset=utf-8"
        else:
            body, ctype = entry.body, "application/json"
        return Hit(200, body, {"content-type": ctype, CACHE_HEADER: "hit"}, entry)

    def served(self, hit: Hit) -> None:
        """Count a hit that was answered (after the quota admitted it)."""
        c, entry = self.m.of(self.binding.key), hit.entry
        c.hit.inc()
        c.input_saved.inc(entry.input_tokens)
        c.output_saved.inc(entry.output_tokens)
        if entry.cost_micros:
            c.money_saved.inc(entry.cost_micros / 1_000_000)
        c.hit_bytes.inc(len(hit.body))

    async def _get(self, key: str) -> Entry | None:
        try:
            raw = await self.cache.store.get(key)
        except (StoreUnavailable, TimeoutError) as exc:
            self.cache.failed("read", exc)
            return None
        return Entry.decode(raw) if raw is not None else None

    async def _embed(self) -> Vector | None:
        from extproc.cache_semantic import EmbeddingFailed, embedding_backend

        target = self.policy.bindings.get(self.rule.embedding_binding)
        if target is None:
            self.cache.failed("embedding", LookupError("no embeddings binding"))
            return None
        charge = await self.meter.reserve(target, self.key.text) if self.meter is not None else None
        if self.meter is not None and charge is None:
            # The caller's tenant has no quota left on the embeddings binding: no call on its behalf.
            self.m.errors.labels("embedding_quota").inc()
            return None
        started = time.perf_counter()
        try:
            embedding = await self.cache.embedder.embed(embedding_backend(target), self.key.text)
        except EmbeddingFailed as exc:
            if charge is not None:
                charge.settle(0, exc)
            self.cache.failed("embedding", exc)
            return None
        except BaseException:
            if charge is not None:  # cancelled mid-call (the client left): charged as sent
                charge.settle(0, EmbeddingFailed("cancelled"))
            raise
        if charge is not None:
            charge.settle(embedding.input_tokens, None)
        self.m.embed_seconds.observe(time.perf_counter() - started)
        self.vector = embedding.vector
        return self.vector

    async def _semantic(self) -> Entry | None:
        vector = await self._embed()
        if vector is None:
            return None
        started = time.perf_counter()
        try:
            found = await self.cache.vectors.search(self.key.partition, vector, self.rule.threshold)
        except (StoreUnavailable, TimeoutError) as exc:
            self.cache.failed("search", exc)
            return None
        entry = await self._get(found) if found is not None else None
        if found is not None and entry is None:
            try:  # its answer expired or was evicted: the vector goes too
                await self.cache.vectors.forget(self.key.partition, found)
            except (StoreUnavailable, TimeoutError) as exc:
                self.cache.failed("search", exc)
        self.m.semantic_seconds.observe(time.perf_counter() - started)
        return entry

    def observe(self, chunk: bytes) -> None:
        """The client's bytes of the response, as they pass (only while ``storing``)."""
        if self.done or self.too_large:
            return
        self.size += len(chunk)
        if self.size > self.rule.max_entry_bytes * (4 if self.stream else 1):  # SSE framing is ~3x the body
            self.too_large = True
            self.collected = []
            return
        if self.assembler is not None:
            self.assembler.feed(chunk)
        else:
            self.collected.append(chunk)

    async def finish(self, status: int, complete: bool, usage: Usage | None, price: Price | None) -> None:
        """The response ended (``complete``: cleanly): store it if it is a whole, successful answer.

        Requests waiting for this one (``extproc.cache_flight``) get the stored entry, or nothing."""
        if self.done:
            self._land(None)
            return
        self.done = True
        try:
            self._land(await self._store(status, complete, usage, price))
        finally:
            self._land(None)

    async def _store(self, status: int, complete: bool, usage: Usage | None, price: Price | None) -> Entry | None:
        b = self.binding.key
        if not self.wish.store:
            self.m.not_stored.labels(b, "no_store").inc()
            return None
        if status != 200:
            self.m.not_stored.labels(b, "status").inc()
            return None
        if self.too_large:
            self.m.not_stored.labels(b, "too_large").inc()
            return None
        body = self._body(complete, usage)
        if body is None:
            self.m.not_stored.labels(b, "incomplete").inc()
            return None
        if len(body) > self.rule.max_entry_bytes:
            self.m.not_stored.labels(b, "too_large").inc()
            return None
        u = usage or Usage()
        cost = cost_micros(price, u.input_tokens, u.output_tokens) if price is not None else 0
        entry = Entry(body, u.input_tokens, u.output_tokens, cost)
        try:
            await self.cache.store.put(self.key.exact, entry.encode(), self.rule.ttl_seconds)
            self._land(entry)  # the waiting requests need not wait for the vector too
            if self.semantic:
                vector = self.vector if self.vector is not None else await self._embed()
                if vector is not None:
                    await self.cache.vectors.add(self.key.partition, self.key.exact, vector, self.rule.ttl_seconds, self.rule.max_entries)
        except (StoreUnavailable, TimeoutError) as exc:
            self.cache.failed("write", exc)
            self.m.not_stored.labels(b, "error").inc()
            return None
        self.m.stored.labels(b).inc()
        self.m.stored_bytes.labels(b).inc(len(body))
        return entry

    def _body(self, complete: bool, usage: Usage | None) -> bytes | None:
        if not complete:
            return None
        if self.assembler is not None:
            from extproc.translate import openai_usage

            wire_usage = openai_usage(usage) if usage is not None and self.api is Api.OPENAI else None
            doc = self.assembler.result(wire_usage)
            return orjson.dumps(doc) if doc is not None else None
        body = b"".join(self.collected)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or "error" in doc:
            return None
        whole = isinstance(doc.get("choices"), list) if self.api is Api.OPENAI else doc.get("type") == "message"
        return body if whole else None
