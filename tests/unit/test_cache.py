"""The response cache's pure parts: keys, caller directives, eligibility, the LRU store's bounds,
the vector index, and answers between their streamed and whole forms."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from controller.cache_spec import parse_cache
from controller.spec_parsing import SpecError
from extproc.cache import Entry
from extproc.cache_key import directives, eligible, make_key
from extproc.cache_replay import StreamAssembler, replay
from extproc.cache_semantic import MemoryVectorStore, VectorIndex, unit
from extproc.cache_store import MemoryCacheStore
from extproc.policy import Api, Backend, Binding, CacheRule, ContextPolicy

RULE = CacheRule(ttl_seconds=60, max_entry_bytes=10_000)


def binding(rule: CacheRule = RULE, model: str = "up-gpt", key: str = "ns/chat") -> Binding:
    be = Backend(id="be-1", api=Api.OPENAI, model=model, host="h", path_prefix="", auth_headers=(("authorization", "Bearer sk-secret"),), weight=1, priority=0)
    return Binding(key=key, model="chat", backends=(be,), tenants=frozenset({"ns/*"}), context=ContextPolicy(), route="r", cache=rule)


def doc(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": r, "content": c} for r, c in turns], **extra}


ASK = ("user", "What is the refund policy?")

# --- keys -------------------------------------------------------------------------------------


def test_the_same_request_has_the_same_key_whatever_its_framing() -> None:
    a = make_key(binding(), Api.OPENAI, "ns/acme", doc(ASK))
    b = make_key(binding(), Api.OPENAI, "ns/acme", doc(ASK, stream=True, stream_options={"include_usage": True}))
    assert a.exact == b.exact and len(a.exact) == 64


def test_tenants_sessions_parameters_apis_and_backends_never_share_a_key() -> None:
    base = make_key(binding(), Api.OPENAI, "ns/acme", doc(ASK)).exact
    others = {
        "tenant": make_key(binding(), Api.OPENAI, "ns/globex", doc(ASK)).exact,
        "history": make_key(binding(), Api.OPENAI, "ns/acme", doc(("user", "hi"), ("assistant", "hello"), ASK)).exact,
        "system": make_key(binding(), Api.OPENAI, "ns/acme", doc(("system", "Tenant acme."), ASK)).exact,
        "temperature": make_key(binding(), Api.OPENAI, "ns/acme", doc(ASK, temperature=0.2)).exact,
        "tools": make_key(binding(), Api.OPENAI, "ns/acme", doc(ASK, tools=[{"type": "function", "function": {"name": "f"}}])).exact,
        "api": make_key(binding(), Api.ANTHROPIC, "ns/acme", doc(ASK)).exact,
        "upstream model": make_key(binding(model="up-gpt-2"), Api.OPENAI, "ns/acme", doc(ASK)).exact,
        "binding": make_key(binding(key="ns/other"), Api.OPENAI, "ns/acme", doc(ASK)).exact,
    }
    assert base not in others.values()
    assert len(set(others.values())) == len(others)


def test_a_shared_cache_keys_no_tenant() -> None:
    shared = CacheRule(ttl_seconds=60, max_entry_bytes=10_000, shared=True)
    a = make_key(binding(shared), Api.OPENAI, "ns/acme", doc(ASK))
    b = make_key(binding(shared), Api.OPENAI, "other/globex", doc(ASK))
    assert a.exact == b.exact


SEMANTIC = CacheRule(ttl_seconds=60, max_entry_bytes=10_000, semantic=True, embedding_binding="ns/embed")


def test_the_semantic_partition_is_everything_but_the_question() -> None:
    sem = binding(SEMANTIC)
    a = make_key(sem, Api.OPENAI, "ns/acme", doc(("system", "S"), ASK))
    b = make_key(sem, Api.OPENAI, "ns/acme", doc(("system", "S"), ("user", "How do refunds work?")))
    c = make_key(sem, Api.OPENAI, "ns/acme", doc(("system", "T"), ASK))
    assert a.partition == b.partition != c.partition
    assert a.exact != b.exact
    assert a.text == ASK[1]
    assert make_key(binding(), Api.OPENAI, "ns/acme", doc(ASK)).partition == ""  # exact mode needs none


def test_a_key_is_a_hash_that_quotes_nothing_it_was_made_from() -> None:
    k = make_key(binding(SEMANTIC), Api.OPENAI, "ns/acme", doc(("user", "my password is hunter2")))
    for value in (k.exact, k.partition):
        assert all(c in "0123456789abcdef" for c in value)
    assert "sk-secret" not in repr(k) and "acme" not in k.exact


# --- what the caller asks, and what is eligible --------------------------------------------


@pytest.mark.parametrize(
    ("headers", "lookup", "store"),
    [
        ({}, True, True),
        ({"cache-control": "no-cache"}, False, True),
        ({"cache-control": "no-store"}, True, False),
        ({"cache-control": "max-age=0, No-Store, no-cache"}, False, False),
        ({"x-crdgol-cache": "bypass"}, False, False),
        ({"x-crdgol-cache": "hit"}, True, True),
    ],
)
def test_caller_directives(headers: dict[str, str], lookup: bool, store: bool) -> None:
    d = directives(headers)
    assert (d.lookup, d.store) == (lookup, store)


def test_eligibility_follows_the_rule() -> None:
    assert eligible(RULE, doc(ASK), stream=True) and eligible(RULE, doc(ASK), stream=False)
    assert not eligible(CacheRule(60, 100, streaming=False), doc(ASK), stream=True)
    assert not eligible(CacheRule(60, 100, non_streaming=False), doc(ASK), stream=False)
    assert not eligible(RULE, doc(ASK, n=2), stream=False)
    cold = CacheRule(60, 100, max_temperature=0.0)
    assert eligible(cold, doc(ASK, temperature=0), stream=False)
    assert not eligible(cold, doc(ASK, temperature=0.7), stream=False)
    assert not eligible(cold, doc(ASK), stream=False)  # unset means the API default, 1


def test_bad_cache_specs_are_refused_with_their_path() -> None:
    with pytest.raises(SpecError, match=r"spec\.cache\.mode") as e:
        parse_cache({"mode": "fuzzy"})
    assert e.value.reason == "InvalidCache"
    with pytest.raises(SpecError, match="embeddingBinding"):
        parse_cache({"mode": "semantic"})
    with pytest.raises(SpecError, match="threshold"):
        parse_cache({"mode": "semantic", "semantic": {"embeddingBinding": "e", "threshold": 1.5}})
    with pytest.raises(SpecError, match="nothing could be cached"):
        parse_cache({"eligible": {"streaming": False, "nonStreaming": False}})
    spec = parse_cache({"ttl": "90s", "scope": "shared"})
    assert spec is not None and spec.ttl_seconds == 90 and spec.scope == "shared"


# --- the memory store -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_memory_store_keeps_its_byte_budget_evicting_the_least_recently_used() -> None:
    store = MemoryCacheStore(max_bytes=300)
    for k in "abc":
        await store.put(k, b"x" * 100, 60)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.put("d", b"y" * 100, 60)
    assert store.bytes <= 300
    assert await store.get("b") is None
    assert [await store.get(k) is not None for k in "acd"] == [True, True, True]


async def test_the_memory_store_never_holds_an_entry_larger_than_its_budget() -> None:
    store = MemoryCacheStore(max_bytes=100)
    await store.put("small", b"s" * 50, 60)
    await store.put("huge", b"h" * 101, 60)
    assert await store.get("huge") is None and await store.get("small") is not None
    assert store.bytes == 50


async def test_the_memory_store_bounds_its_entry_count_and_forgets_expired_entries() -> None:
    clock = Clock()
    store = MemoryCacheStore(max_bytes=10**6, max_entries=3, clock=clock)
    for i in range(10):
        await store.put(str(i), b"v", 60)
    assert len(store) == 3
    clock.now += 61
    assert await store.get("9") is None
    assert len(store) == 2 and store.bytes == 2


def test_an_entry_round_trips_and_garbage_is_no_entry() -> None:
    e = Entry(b'{"a":1}\n', 3, 4, 5)
    assert Entry.decode(e.encode()) == e
    assert Entry.decode(b"not an entry") is None


# --- the vector index -------------------------------------------------------------------------


def test_the_index_answers_the_most_similar_vector_at_or_above_the_threshold() -> None:
    index = VectorIndex(dim=3, limit=10)
    index.add("x", unit([1, 0, 0]), float("inf"))
    index.add("y", unit([0, 1, 0]), float("inf"))
    q = unit([0.9, 0.1, 0])
    cos = float(q @ unit([1, 0, 0]))
    assert index.best(q, cos - 0.01, 0) == "x"
    assert index.best(q, cos + 0.01, 0) is None
    assert index.best(unit([1, 0, 0, 0]), 0.0, 0) is None  # another embedding size


def test_the_index_is_a_bounded_ring_that_skips_expired_rows() -> None:
    index = VectorIndex(dim=2, limit=3)
    for i in range(5):
        index.add(f"k{i}", unit([1, i]), expires=100.0 + i)
    assert index.n == 3 and sorted(index.keys[:3]) == ["k2", "k3", "k4"]
    assert index.best(unit([1, 4]), 0.999, now=0) == "k4"
    assert index.best(unit([1, 4]), 0.999, now=104.5) is None


async def test_the_memory_vector_store_bounds_its_matrices_by_bytes() -> None:
    store = MemoryVectorStore(max_bytes=200)  # a 2-dim partition of up to 10 rows holds 80 bytes
    for p in "abc":
        await store.add(p, "k", unit([1, 0]), 60, 10)
    assert len(store) == 2 and store.parts.bytes <= 200
    assert await store.search("a", unit([1, 0]), 0.5) is None
    assert await store.search("c", unit([1, 0]), 0.5) == "k"
    assert np.isclose(np.linalg.norm(unit([3, 4])), 1.0)


# --- whole answers and streams ----------------------------------------------------------------

OPENAI_DOC = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "up-gpt",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Refunds take 5 days.",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"order": 7}'}}],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
}
ANTHROPIC_DOC = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "up-claude",
    "content": [{"type": "text", "text": "Refunds take 5 days."}, {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"order": 7}}],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 9, "output_tokens": 5},
}


@pytest.mark.parametrize(("api", "whole"), [(Api.OPENAI, OPENAI_DOC), (Api.ANTHROPIC, ANTHROPIC_DOC)])
def test_a_replayed_answer_assembles_back_into_the_same_answer(api: Api, whole: dict[str, Any]) -> None:
    stream = replay(api, whole, include_usage=True)
    assembler = StreamAssembler(api)
    for i in range(0, len(stream), 7):  # split anywhere
        assembler.feed(stream[i : i + 7])
    assert assembler.result() == whole


def test_an_openai_replay_carries_usage_only_when_asked_and_ends_with_done() -> None:
    plain = replay(Api.OPENAI, OPENAI_DOC, include_usage=False)
    assert plain.endswith(b"data: [DONE]\n\n") and b'"usage"' not in plain
    assert b'"usage"' in replay(Api.OPENAI, OPENAI_DOC, include_usage=True)


@pytest.mark.parametrize(
    ("api", "stream"),
    [
        (Api.OPENAI, replay(Api.OPENAI, OPENAI_DOC).rsplit(b"data: [DONE]", 1)[0]),  # cut before [DONE]
        (Api.ANTHROPIC, replay(Api.ANTHROPIC, ANTHROPIC_DOC).rsplit(b"event: message_stop", 1)[0]),
        (Api.OPENAI, b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n'),
        (Api.ANTHROPIC, b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n'),
    ],
)
def test_a_stream_that_did_not_end_cleanly_assembles_into_nothing(api: Api, stream: bytes) -> None:
    assembler = StreamAssembler(api)
    assembler.feed(stream)
    assert assembler.result() is None


def test_the_usage_a_client_did_not_see_is_put_back_into_the_assembled_answer() -> None:
    assembler = StreamAssembler(Api.OPENAI)
    assembler.feed(replay(Api.OPENAI, OPENAI_DOC, include_usage=False))
    out = assembler.result(OPENAI_DOC["usage"])
    assert out is not None and out["usage"] == OPENAI_DOC["usage"]
    assert json.loads(json.dumps(out)) == OPENAI_DOC


# --- single flight ---------------------------------------------------------------------------------


async def test_a_follower_gets_what_the_leader_stored_and_a_second_leader_is_refused() -> None:
    import asyncio

    from extproc.cache_flight import Flights

    flights: Flights[str] = Flights(wait=5.0)
    leader = flights.lead("k")
    assert leader is not None and flights.lead("k") is None  # one flight per key
    assert await asyncio.wait_for(flights.follow("other"), 0.1) is None  # nobody to wait for
    followers = [asyncio.create_task(flights.follow("k")) for _ in range(3)]
    await asyncio.sleep(0)
    flights.land(leader, "answer")
    assert await asyncio.gather(*followers) == ["answer"] * 3
    assert len(flights) == 0 and flights.lead("k") is not None  # closed: the next miss may lead


async def test_followers_stop_waiting_when_the_flight_times_out_or_the_leader_stores_nothing() -> None:
    import asyncio
    import time

    from extproc.cache_flight import Flights

    flights: Flights[str] = Flights(wait=0.2)
    stale = flights.lead("k")
    assert stale is not None
    started = time.monotonic()
    assert await flights.follow("k") is None
    assert 0.15 <= time.monotonic() - started < 1.0 and len(flights) == 0
    newer = flights.lead("k")
    assert newer is not None
    flights.land(stale, "late")  # the timed-out leader cannot close the newer flight
    assert flights.is_open("k")
    waiting = asyncio.create_task(flights.follow("k"))
    await asyncio.sleep(0)
    flights.land(newer, None)
    assert await waiting is None


async def test_a_follower_that_is_cancelled_leaves_the_others_waiting() -> None:
    import asyncio

    from extproc.cache_flight import Flights

    flights: Flights[str] = Flights(wait=5.0)
    leader = flights.lead("k")
    assert leader is not None
    gone, stays = asyncio.create_task(flights.follow("k")), asyncio.create_task(flights.follow("k"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    flights.land(leader, "answer")
    assert await stays == "answer"


def test_coalescing_is_off_with_no_wait() -> None:
    from extproc.cache_flight import Flights

    assert Flights[str](wait=0).lead("k") is None


# --- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_closes_the_embeddings_clients_http_session() -> None:
    import asyncio

    from crdgol.stack import free_port
    from extproc.cache_semantic import EmbeddingFailed
    from extproc.server import ServerSettings, serve
    from extproc.services import Services

    services = Services()
    nowhere = Backend(id="e", api=Api.OPENAI, model="m", host=f"127.0.0.1:{free_port()}", path_prefix="", auth_headers=(), weight=1, priority=0)
    with pytest.raises(EmbeddingFailed):
        await services.cache.embedder.embed(nowhere, "hello")  # opens the session, then fails to connect
    session = services.cache.embedder._session
    assert session is not None and not session.closed
    stop = asyncio.Event()
    stop.set()
    await serve(ServerSettings(port=free_port(), metrics_port=0, grace=0.1), services, stop)
    assert session.closed
