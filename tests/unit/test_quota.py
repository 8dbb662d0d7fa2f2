"""Quota arithmetic: exact costs, fixed windows, demand estimates, limit validation."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.quota import (
    Demand,
    Limit,
    Price,
    Window,
    cost_micros,
    estimate_demand,
    normalize_limits,
    parse_period,
    quota_scope,
    reset_after,
    window_start,
)

tokens = st.integers(min_value=0, max_value=10**9)
prices = st.builds(Price, st.integers(0, 10**9), st.integers(0, 10**9))
windows = st.sampled_from([1, 60, 3600, 86_400, 30 * 86_400, 7])
nows = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)


class TestCost:
    def test_examples(self) -> None:
        # $3 / $15 per million tokens, in micro-dollars.
        p = Price(3_000_000, 15_000_000)
        assert cost_micros(p, 1_000_000, 0) == 3_000_000
        assert cost_micros(p, 1, 0) == 3
        assert cost_micros(p, 1000, 500) == 3000 + 7500
        assert cost_micros(Price(1, 0), 1, 0) == 1  # a millionth of a micro still costs one
        assert cost_micros(Price(1, 0), 0, 0) == 0

    @given(prices, tokens, tokens)
    def test_never_under_charges_and_rounds_up_less_than_one(
        self, p: Price, i: int, o: int
    ) -> None:
        exact = Fraction(i * p.input_per_mtok_micros + o * p.output_per_mtok_micros, 1_000_000)
        c = cost_micros(p, i, o)
        assert isinstance(c, int)
        assert exact <= c < exact + 1

    @given(prices, tokens, tokens, tokens, tokens)
    def test_monotone(self, p: Price, i: int, o: int, di: int, do: int) -> None:
        assert cost_micros(p, i, o) <= cost_micros(p, i + di, o + do)

    def test_negative_price_refused(self) -> None:
        with pytest.raises(ValueError):
            Price(-1, 0)


class TestWindows:
    @given(nows, windows)
    def test_window_contains_now_and_is_aligned(self, now: float, w: int) -> None:
        start = window_start(now, w)
        assert isinstance(start, int)
        assert start % w == 0
        assert start <= now < start + w

    @given(nows, windows)
    def test_reset_after_is_the_rest_of_the_window(self, now: float, w: int) -> None:
        r = reset_after(now, w)
        assert 0 < r <= w
        assert r == pytest.approx(window_start(now, w) + w - now)

    @given(nows, windows, st.floats(min_value=0, max_value=1e6))
    def test_windows_are_monotone(self, now: float, w: int, dt: float) -> None:
        assert window_start(now, w) <= window_start(now + dt, w)

    def test_boundaries(self) -> None:
        assert window_start(119.999, 60) == 60
        assert window_start(120.0, 60) == 120
        assert reset_after(120.0, 60) == 60.0
        assert reset_after(179.5, 60) == 0.5

    def test_parse(self) -> None:
        assert Window.parse("Minute") is Window.MINUTE
        assert Window.parse("day").value == 86_400
        assert parse_period("month") == 30 * 86_400
        with pytest.raises(ValueError):
            Window.parse("week")
        with pytest.raises(ValueError):
            parse_period("year")


class TestDemand:
    def test_max_tokens_is_reserved(self) -> None:
        p = Price(1_000_000, 2_000_000)
        d = estimate_demand(100, 50, 1000, p)
        assert d == Demand(1, 100, 50, cost_micros(p, 100, 50))
        assert d.amount("total_tokens") == 150

    def test_default_when_max_tokens_missing(self) -> None:
        assert estimate_demand(10, None, 256, None) == Demand(1, 10, 256, 0)
        assert estimate_demand(10, 0, 256, None).output_tokens == 256

    def test_used(self) -> None:
        assert Demand.used(3, 4, None) == Demand(1, 3, 4, 0)
        assert Demand.used(3, 4, Price(1_000_000, 1_000_000)).cost_micros == 7

    def test_concurrent_has_no_amount(self) -> None:
        with pytest.raises(ValueError):
            Demand().amount("concurrent")


class TestLimit:
    def test_validation(self) -> None:
        with pytest.raises(ValueError):
            Limit("bananas", 1, Window.MINUTE)
        with pytest.raises(ValueError):
            Limit("requests", 1)
        with pytest.raises(ValueError):
            Limit("concurrent", 1, Window.MINUTE)
        with pytest.raises(ValueError):
            Limit("cost_micros", 1, Window.DAY, period_seconds=86_400)
        with pytest.raises(ValueError):
            Limit("requests", -1, Window.MINUTE)

    def test_names(self) -> None:
        assert Limit("requests", 5, Window.MINUTE).name == "requests/minute"
        assert (
            Limit("cost_micros", 5, period_seconds=parse_period("month")).name
            == "cost_micros/month"
        )
        assert Limit("concurrent", 5).name == "concurrent"
        assert Limit("concurrent", 5).seconds == 0
        assert Limit("cost_micros", 5, Window.DAY).is_budget

    def test_normalize_keeps_the_strictest(self) -> None:
        a = Limit("requests", 10, Window.MINUTE)
        b = Limit("requests", 5, Window.MINUTE)
        c = Limit("requests", 100, Window.DAY)
        assert normalize_limits([a, c, b]) == (b, c)

    def test_scope_is_injective(self) -> None:
        assert quota_scope("a:b", "c") != quota_scope("a", "b:c")
