"""Session history: key scoping, trimming, TTL and the LRU bound of the embedded store."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import BadRequest
from extproc.history import (
    HistoryStore,
    MemoryHistoryStore,
    Turn,
    history_key,
    validate_session_id,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pair(i: int) -> list[Turn]:
    return [Turn("user", f"q{i}"), Turn("assistant", f"a{i}")]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryHistoryStore:
    return MemoryHistoryStore(max_sessions=3, clock=clock)


class TestHistoryKey:
    def test_the_key_is_injective_across_part_boundaries(self) -> None:
        assert history_key("a:b", "c", "p", "s") != history_key("a", "b:c", "p", "s")
        assert history_key("a", "b", "p", "c:d") != history_key("a", "b", "p:c", "d")
        assert history_key("1:a", "", "p", "s") != history_key("", "1:a", "p", "s")

    @given(
        st.tuples(st.text(max_size=6), st.text(max_size=6), st.text(min_size=1, max_size=6), st.text(max_size=6)),
        st.tuples(st.text(max_size=6), st.text(max_size=6), st.text(min_size=1, max_size=6), st.text(max_size=6)),
    )
    def test_distinct_tuples_never_share_a_key(
        self, a: tuple[str, str, str, str], b: tuple[str, str, str, str]
    ) -> None:
        if a != b:
            assert history_key(*a) != history_key(*b)

    def test_a_session_without_a_caller_has_no_key(self) -> None:
        with pytest.raises(ValueError, match="principal"):
            history_key("acme", "b", "", "s")

    def test_the_store_satisfies_the_protocol(self, store: MemoryHistoryStore) -> None:
        s: HistoryStore = store
        assert s is store


class TestSessionIds:
    @pytest.mark.parametrize("sid", ["a", "A-z_0.9:x", "x" * 128])
    def test_valid_session_ids_are_returned_unchanged(self, sid: str) -> None:
        assert validate_session_id(sid) == sid

    @pytest.mark.parametrize("sid", ["", "x" * 129, "a b", "a/b", "a\n", "é", "a\x00"])
    def test_invalid_session_ids_are_bad_requests(self, sid: str) -> None:
        with pytest.raises(BadRequest, match="invalid session id") as exc:
            validate_session_id(sid)
        assert exc.value.status == 400


class TestMemoryStore:
    async def test_an_unknown_session_is_empty(self, store: MemoryHistoryStore) -> None:
        assert await store.load("nope", 10) == []

    async def test_turns_come_back_oldest_first(self, store: MemoryHistoryStore) -> None:
        await store.append("k", pair(1), 10, 60)
        await store.append("k", pair(2), 10, 60)
        assert await store.load("k", 10) == pair(1) + pair(2)

    async def test_history_is_tenant_and_caller_scoped(self, store: MemoryHistoryStore) -> None:
        await store.append(history_key("acme", "b", "key:01", "s1"), pair(1), 10, 60)
        assert await store.load(history_key("globex", "b", "key:01", "s1"), 10) == []
        assert await store.load(history_key("acme", "b", "jwt:02", "s1"), 10) == []
        assert await store.load(history_key("acme", "b", "key:01", "s1"), 10) == pair(1)

    async def test_max_turns_trims_on_append_and_on_load(self, store: MemoryHistoryStore) -> None:
        for i in range(5):
            await store.append("k", pair(i), 4, 60)
        assert await store.load("k", 100) == pair(3) + pair(4)
        assert await store.load("k", 1) == [Turn("assistant", "a4")]

    async def test_zero_max_turns_means_the_store_cap(self, clock: Clock) -> None:
        store = MemoryHistoryStore(clock=clock, max_turns_cap=3)
        for i in range(3):
            await store.append("k", pair(i), 0, 60)
        assert await store.load("k", 0) == [Turn("assistant", "a1"), *pair(2)]

    async def test_a_session_expires_after_its_ttl(
        self, store: MemoryHistoryStore, clock: Clock
    ) -> None:
        await store.append("k", pair(1), 10, 60)
        clock.t += 59
        assert await store.load("k", 10) == pair(1)
        clock.t += 1
        assert await store.load("k", 10) == []
        assert len(store) == 0

    async def test_append_refreshes_the_ttl(self, store: MemoryHistoryStore, clock: Clock) -> None:
        await store.append("k", pair(1), 10, 60)
        clock.t += 50
        await store.append("k", pair(2), 10, 60)
        clock.t += 50
        assert await store.load("k", 10) == pair(1) + pair(2)

    async def test_an_expired_session_starts_afresh_on_append(
        self, store: MemoryHistoryStore, clock: Clock
    ) -> None:
        await store.append("k", pair(1), 10, 60)
        clock.t += 61
        await store.append("k", pair(2), 10, 60)
        assert await store.load("k", 10) == pair(2)

    async def test_the_lru_bound_holds_and_evicts_the_least_recently_used(
        self, store: MemoryHistoryStore
    ) -> None:
        for k in ("a", "b", "c"):
            await store.append(k, pair(0), 10, 60)
        await store.load("a", 10)  # "a" is now more recent than "b"
        await store.append("d", pair(0), 10, 60)
        assert len(store) == 3
        assert await store.load("b", 10) == []
        assert await store.load("a", 10) == pair(0)
        for i in range(100):
            await store.append(f"x{i}", pair(i), 10, 60)
        assert len(store) == 3

    async def test_appending_nothing_creates_no_session(self, store: MemoryHistoryStore) -> None:
        await store.append("k", [], 10, 60)
        assert len(store) == 0

    def test_a_store_needs_room_for_a_session(self) -> None:
        with pytest.raises(ValueError):
            MemoryHistoryStore(max_sessions=0)


async def test_the_memory_store_keeps_only_the_newest_turns_that_fit_a_character_bound() -> None:
    store = MemoryHistoryStore()
    for i in range(10):
        await store.append("k", [Turn("user", f"u{i}" + "x" * 98), Turn("assistant", f"a{i}" + "y" * 98)], 100, 60, max_chars=450)
    kept = await store.load("k", 100)
    assert [t.content[:2] for t in kept] == ["u8", "a8", "u9", "a9"]  # 4 x 100 chars <= 450 < 5 x 100
