"""Quota stores: admission, windows, settle/release, idempotency, and the fail policy.

``AdmissionContract`` holds the behaviour every ``QuotaStore`` must have; the memory store runs it
here and the Redis store runs it in ``tests/redis`` (subclasses provide the ``store`` fixture).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.quota import Decision, Demand, Limit, Price, Window, cost_micros, parse_period
from extproc.quota_store import (
    FailPolicy,
    MemoryQuotaStore,
    QuotaStore,
    Reservation,
    StoreUnavailable,
    check,
    finish,
)

T0 = 1_000.0  # minute window [960, 1020), hour [0, 3600)
RPM5 = Limit("requests", 5, Window.MINUTE)
ONE = Demand(1, 0, 0, 0)


def tokens(i: int, o: int) -> Demand:
    return Demand(1, i, o, 0)


class AdmissionContract:
    """Subclasses define a ``store`` fixture returning a fresh, empty QuotaStore."""

    async def test_concurrent_reservations_admit_exactly_the_limit(self, store: QuotaStore) -> None:
        results = await asyncio.gather(*(store.reserve("s", [RPM5], ONE, T0, 30) for _ in range(8)))
        assert sum(d.allowed for d, _ in results) == 5
        assert all((r is None) != d.allowed for d, r in results)
        assert await store.usage("s", [RPM5], T0) == {"requests/minute": 5}

    async def test_refusal_names_the_limit_and_the_window_reset_admits_again(
        self, store: QuotaStore
    ) -> None:
        for _ in range(5):
            assert (await store.reserve("s", [RPM5], ONE, T0, 30))[0].allowed
        decision, res = await store.reserve("s", [RPM5], ONE, T0 + 5, 30)
        assert not decision.allowed and res is None
        assert decision.limit == RPM5
        assert decision.retry_after == pytest.approx(15.0)  # window ends at 1020
        assert decision.remaining == {"requests/minute": 0}
        decision, res = await store.reserve("s", [RPM5], ONE, 1020.0, 30)
        assert decision.allowed and res is not None
        assert decision.remaining == {"requests/minute": 4}
        assert decision.resets == {"requests/minute": pytest.approx(60.0)}

    async def test_the_strictest_limit_refuses_and_retry_after_is_its_reset(
        self, store: QuotaStore
    ) -> None:
        per_hour = Limit("requests", 2, Window.HOUR)
        limits = [RPM5, per_hour]
        for _ in range(2):
            assert (await store.reserve("s", limits, ONE, T0, 30))[0].allowed
        decision, _ = await store.reserve("s", limits, ONE, T0, 30)
        assert decision.limit == per_hour
        assert decision.retry_after == pytest.approx(2600.0)
        assert decision.limits == {"requests/minute": 5, "requests/hour": 2}
        # A refused request added nothing anywhere.
        assert await store.usage("s", limits, T0) == {"requests/minute": 2, "requests/hour": 2}

    async def test_settle_refunds_and_charges_the_difference(self, store: QuotaStore) -> None:
        limits = [
            Limit("total_tokens", 1000, Window.MINUTE),
            Limit("output_tokens", 600, Window.MINUTE),
        ]
        _, r1 = await store.reserve("s", limits, tokens(100, 400), T0, 30)
        assert r1 is not None
        assert (await store.usage("s", limits, T0))["total_tokens/minute"] == 500
        await store.settle(r1, tokens(100, 50), T0 + 1)  # refund 350
        assert await store.usage("s", limits, T0 + 1) == {
            "total_tokens/minute": 150,
            "output_tokens/minute": 50,
        }
        _, r2 = await store.reserve("s", limits, tokens(100, 100), T0 + 1, 30)
        assert r2 is not None
        await store.settle(r2, tokens(150, 500), T0 + 2)  # the estimate was short: charge 450
        assert await store.usage("s", limits, T0 + 2) == {
            "total_tokens/minute": 800,
            "output_tokens/minute": 550,
        }
        # Over budget now for a 300-token demand; a demand that fits still passes.
        assert not (await store.reserve("s", limits, tokens(100, 200), T0 + 2, 30))[0].allowed
        assert (await store.reserve("s", limits, tokens(100, 50), T0 + 2, 30))[0].allowed

    async def test_release_undoes_and_repeats_are_no_ops(self, store: QuotaStore) -> None:
        limits = [RPM5, Limit("total_tokens", 1000, Window.MINUTE), Limit("concurrent", 3)]
        _, r = await store.reserve("s", limits, tokens(10, 20), T0, 30)
        _, keep = await store.reserve("s", limits, tokens(1, 1), T0, 30)
        assert r is not None and keep is not None
        await store.release(r, T0)
        await store.release(r, T0)
        await store.settle(r, tokens(500, 500), T0)
        assert await store.usage("s", limits, T0) == {
            "requests/minute": 1,
            "total_tokens/minute": 2,
            "concurrent": 1,
        }
        await store.settle(keep, tokens(5, 5), T0)
        await store.settle(keep, tokens(5, 5), T0)
        await store.release(keep, T0)
        assert await store.usage("s", limits, T0) == {
            "requests/minute": 1,
            "total_tokens/minute": 10,
            "concurrent": 0,
        }

    async def test_concurrent_limit(self, store: QuotaStore) -> None:
        conc = Limit("concurrent", 2)
        held: list[Reservation] = []
        for _ in range(2):
            d, r = await store.reserve("s", [conc], ONE, T0, 30)
            assert d.allowed and r is not None
            held.append(r)
        d, r = await store.reserve("s", [conc], ONE, T0, 30)
        assert not d.allowed and r is None
        assert d.limit == conc and d.retry_after == 1.0
        await store.settle(held.pop(), ONE, T0 + 1)
        assert (await store.reserve("s", [conc], ONE, T0 + 1, 30))[0].allowed

    async def test_a_dead_holders_slot_heals_after_ttl_hint(self, store: QuotaStore) -> None:
        conc = Limit("concurrent", 1)
        _, lost = await store.reserve("s", [conc], ONE, T0, 5)
        assert lost is not None
        assert not (await store.reserve("s", [conc], ONE, T0 + 4, 5))[0].allowed
        assert (await store.reserve("s", [conc], ONE, T0 + 6, 5))[0].allowed
        await store.release(lost, T0 + 7)  # too late: a no-op, the new holder keeps its slot
        assert (await store.usage("s", [conc], T0 + 7)) == {"concurrent": 1}

    async def test_money_budget(self, store: QuotaStore) -> None:
        price = Price(2_000_000, 10_000_000)  # 2 and 10 currency units per million tokens
        budget = Limit("cost_micros", 10_000, period_seconds=parse_period("day"))
        each = Demand.used(1000, 500, price)
        assert each.cost_micros == cost_micros(price, 1000, 500) == 7000
        d, r = await store.reserve("s", [budget], each, T0, 30)
        assert d.allowed and r is not None and d.remaining == {"cost_micros/day": 3000}
        d, _ = await store.reserve("s", [budget], each, T0, 30)
        assert not d.allowed and d.limit == budget and d.retry_after == pytest.approx(86_400 - T0)
        await store.settle(r, Demand.used(1000, 10, price), T0)  # 2100 actually spent
        assert (await store.reserve("s", [budget], each, T0, 30))[0].allowed

    async def test_a_demand_above_the_limit_is_refused_and_adds_nothing(
        self, store: QuotaStore
    ) -> None:
        limit = Limit("total_tokens", 100, Window.MINUTE)
        d, r = await store.reserve("s", [limit], tokens(50, 51), T0, 30)
        assert not d.allowed and r is None
        assert await store.usage("s", [limit], T0) == {"total_tokens/minute": 0}

    async def test_settle_after_the_window_rolled_leaves_the_new_window_alone(
        self, store: QuotaStore
    ) -> None:
        limit = Limit("total_tokens", 1000, Window.SECOND)
        _, r = await store.reserve("s", [limit], tokens(10, 10), T0, 30)
        assert r is not None
        _, r2 = await store.reserve("s", [limit], tokens(1, 1), T0 + 5, 30)
        assert r2 is not None
        await store.settle(r, tokens(400, 400), T0 + 5)
        assert await store.usage("s", [limit], T0 + 5) == {"total_tokens/second": 2}

    async def test_scopes_are_independent(self, store: QuotaStore) -> None:
        one = Limit("requests", 1, Window.MINUTE)
        assert (await store.reserve("acme", [one], ONE, T0, 30))[0].allowed
        assert (await store.reserve("globex", [one], ONE, T0, 30))[0].allowed
        assert not (await store.reserve("acme", [one], ONE, T0, 30))[0].allowed

    async def test_duplicate_limits_count_once(self, store: QuotaStore) -> None:
        limits = [Limit("requests", 3, Window.MINUTE), Limit("requests", 2, Window.MINUTE)]
        results = [(await store.reserve("s", limits, ONE, T0, 30))[0].allowed for _ in range(3)]
        assert results == [True, True, False]


class TestMemoryStore(AdmissionContract):
    @pytest.fixture
    def store(self) -> MemoryQuotaStore:
        return MemoryQuotaStore()

    async def test_memory_stays_bounded_across_many_windows(self, store: MemoryQuotaStore) -> None:
        limits = [
            Limit("requests", 10, Window.SECOND),
            Limit("total_tokens", 10**6, Window.MINUTE),
            Limit("concurrent", 5),
        ]
        for i in range(5000):
            now = T0 + i * 0.5
            _, r = await store.reserve(f"s{i % 7}", limits, tokens(1, 1), now, 10)
            if r is not None and i % 3:
                await store.settle(r, tokens(1, 1), now)  # a third leak and must expire
        assert store.size() < 200


class DownStore:
    """A store whose backend is unreachable."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def reserve(
        self, scope: str, limits: Sequence[Limit], demand: Demand, now: float, ttl_hint: float
    ) -> tuple[Decision, Reservation | None]:
        raise self.exc

    async def settle(self, reservation: Reservation, actual: Demand, now: float) -> None:
        raise self.exc

    async def release(self, reservation: Reservation, now: float) -> None:
        raise self.exc

    async def usage(self, scope: str, limits: Sequence[Limit], now: float) -> dict[str, int]:
        raise self.exc


class TestFailPolicy:
    BUDGET = Limit("cost_micros", 100, period_seconds=86_400)

    @pytest.mark.parametrize("exc", [StoreUnavailable("down"), TimeoutError()])
    async def test_rate_limits_fail_open(self, exc: Exception) -> None:
        errors: list[Exception] = []
        d, r = await check(DownStore(exc), "s", [RPM5], ONE, T0, FailPolicy(), errors.append)
        assert d.allowed and r is None
        assert errors == [exc]

    async def test_budgets_fail_closed(self) -> None:
        errors: list[Exception] = []
        limits = [RPM5, self.BUDGET]
        d, r = await check(
            DownStore(StoreUnavailable()), "s", limits, ONE, T0, FailPolicy(), errors.append
        )
        assert not d.allowed and r is None
        assert d.limit == self.BUDGET and d.retry_after == 1.0
        assert len(errors) == 1

    async def test_the_policy_is_configurable(self) -> None:
        store = DownStore(StoreUnavailable())
        d, _ = await check(store, "s", [self.BUDGET], ONE, T0, FailPolicy(budgets_open=True), print)
        assert d.allowed
        d, _ = await check(store, "s", [RPM5], ONE, T0, FailPolicy(rate_limits_open=False), print)
        assert not d.allowed and d.limit == RPM5

    async def test_other_errors_propagate(self) -> None:
        with pytest.raises(ValueError):
            await check(DownStore(ValueError()), "s", [RPM5], ONE, T0, FailPolicy(), print)

    async def test_no_limits_never_touches_the_store(self) -> None:
        d, r = await check(DownStore(StoreUnavailable()), "s", [], ONE, T0, FailPolicy(), print)
        assert d.allowed and r is None

    async def test_check_and_finish_with_a_working_store(self) -> None:
        store = MemoryQuotaStore()
        d, r = await check(store, "s", [RPM5], ONE, T0, FailPolicy(), print)
        assert d.allowed and r is not None
        await finish(store, r, None, T0, print)
        assert await store.usage("s", [RPM5], T0) == {"requests/minute": 0}
        await finish(store, None, ONE, T0, print)  # nothing reserved: nothing to do

    async def test_finish_reports_store_errors(self) -> None:
        errors: list[Exception] = []
        r = Reservation("1", "s", (("requests", 60, 960),), ONE, False)
        await finish(DownStore(StoreUnavailable()), r, ONE, T0, errors.append)
        assert len(errors) == 1


class TestMemoryStoreModel:
    """Random reserve/settle/release sequences in one window against a model of the counters."""

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["reserve", "settle", "release"]),
                st.integers(0, 300),
                st.integers(0, 300),
                st.integers(0, 20),
            ),
            max_size=60,
        )
    )
    async def test_counters_match_the_model(self, ops: list[tuple[str, int, int, int]]) -> None:
        store = MemoryQuotaStore()
        limits = [
            Limit("requests", 6, Window.HOUR),
            Limit("total_tokens", 2000, Window.HOUR),
            Limit("concurrent", 3),
        ]
        open_: list[tuple[Reservation, Demand]] = []
        done: list[Demand] = []
        for op, i, o, pick in ops:
            if op == "reserve":
                _, r = await store.reserve("s", limits, tokens(i, o), T0, 600)
                if r is not None:
                    open_.append((r, r.demand))
            elif open_:
                r, _ = open_.pop(pick % len(open_))
                if op == "settle":
                    await store.settle(r, tokens(i, o), T0)
                    done.append(tokens(i, o))
                else:
                    await store.release(r, T0)
                await store.settle(r, tokens(999, 999), T0)  # a repeat changes nothing
            counted = [d for _, d in open_] + done
            assert await store.usage("s", limits, T0) == {
                "requests/hour": len(counted),
                "total_tokens/hour": sum(d.input_tokens + d.output_tokens for d in counted),
                "concurrent": len(open_),
            }
            assert len(counted) <= 6 and len(open_) <= 3  # never exceeded
