"""Per-tenant quotas: limits, prices, demands and decisions. Pure arithmetic, no I/O.

Contract
--------
* **Metrics.** A ``Limit`` caps one metric: ``requests``, ``input_tokens``, ``output_tokens``,
  ``total_tokens`` (input + output), ``cost_micros`` (money, see below) or ``concurrent``
  (requests in flight). Every metric but ``concurrent`` is counted per window.
* **Fixed windows aligned to the epoch.** A window of ``w`` seconds covering ``now`` starts at
  ``floor(now / w) * w`` and resets at the next multiple of ``w``. Windows are second, minute, hour
  and day. Money budgets use the same fixed windows with periods ``day`` (86 400 s) and ``month``
  (30 days = 2 592 000 s, aligned to the epoch, *not* to calendar months: calendar-free periods
  need no time zone and behave identically on every replica). All windows are UTC-aligned.
* **Reserve, then settle.** A request reserves its estimated ``Demand`` (prompt tokens estimated,
  output = ``max_tokens`` or a default) before it goes upstream. The reservation counts against
  the windows immediately and atomically with the check, so concurrent requests cannot all pass a
  nearly exhausted limit. When the response ends (streams included) the reservation is *settled*:
  the counters are adjusted by ``actual - reserved`` in the windows the reservation was made in;
  the delta may be negative (a refund). Only a request that never reached a provider is
  *released* (the reserved amounts are removed entirely); an answered one is always settled, at
  least at its reservation when its usage was not reported (the charge rule,
  ``extproc.admission``). Settling or releasing twice has no further effect.
* **Admission.** A request is admitted iff for every limit ``used + demand <= amount``. A refused
  request adds nothing. ``retry_after`` is the time until the refusing limit's window resets
  (1 s for ``concurrent``, whose capacity frees up as soon as any request ends).
* **Overshoot bound.** ``requests`` and ``concurrent`` limits are never exceeded. For token and
  money limits, admitted usage in a window can exceed the amount by at most the sum, over the
  requests in flight when the limit was last checked, of how much their actual usage exceeds their
  reservation. When a request sets ``max_tokens``, its reservation is an upper bound on its output,
  so the overshoot comes only from the prompt-token estimation error; without ``max_tokens`` the
  default output reservation may also be exceeded. Once a counter is over its amount, every later
  request with a non-zero demand on it is refused until the window resets.
* **Money** is integer micro-units (1e-6 of the currency); a ``Price`` is micro-units per million
  tokens. ``cost_micros`` rounds up once per request with exact integer arithmetic, so a request is
  never under-charged and sums never drift.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "BUDGET_PERIODS",
    "METRICS",
    "Decision",
    "Demand",
    "Limit",
    "Price",
    "Window",
    "cost_micros",
    "estimate_demand",
    "normalize_limits",
    "parse_period",
    "quota_scope",
    "reset_after",
    "window_start",
]

METRICS = frozenset(
    {"requests", "input_tokens", "output_tokens", "total_tokens", "concurrent", "cost_micros"}
)
BUDGET_PERIODS: dict[str, int] = {"day": 86_400, "month": 30 * 86_400}
_PERIOD_NAMES = {1: "second", 60: "minute", 3600: "hour", 86_400: "day", 30 * 86_400: "month"}
_MICROS_PER_MTOK = 1_000_000  # prices are per million tokens


class Window(enum.Enum):
    SECOND = 1
    MINUTE = 60
    HOUR = 3600
    DAY = 86_400

    @classmethod
    def parse(cls, name: str) -> Window:
        """``"second"``, ``"minute"``, ``"hour"`` or ``"day"`` (case-insensitive)."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown window {name!r}: use second, minute, hour or day") from None


def parse_period(name: str) -> int:
    """A budget period in seconds: ``"day"`` or ``"month"`` (30 days, see the module docstring)."""
    try:
        return BUDGET_PERIODS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown budget period {name!r}: use day or month") from None


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``amount`` of ``metric`` per window.

    Rate limits give ``window``; money budgets (``cost_micros``) give ``period_seconds`` (from
    ``parse_period``) or a ``window``; ``concurrent`` gives neither.
    """

    metric: str
    amount: int
    window: Window | None = None
    period_seconds: int = 0
    # Derived once: every check reads them several times per limit.
    seconds: int = field(init=False, repr=False, compare=False)
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown quota metric {self.metric!r}")
        if self.amount < 0:
            raise ValueError("a quota amount cannot be negative")
        if self.metric == "concurrent":
            if self.window is not None or self.period_seconds:
                raise ValueError("a concurrent limit has no window")
        elif (self.window is None) == (self.period_seconds <= 0):
            raise ValueError(f"a {self.metric} limit needs exactly one of window or period_seconds")
        # seconds: the window length, 0 for ``concurrent``. name: a stable label, unique per
        # (metric, window): ``"requests/minute"``, ``"concurrent"``.
        seconds = self.window.value if self.window is not None else self.period_seconds
        object.__setattr__(self, "seconds", seconds)
        name = "concurrent" if self.metric == "concurrent" else f"{self.metric}/{_PERIOD_NAMES.get(seconds, f'{seconds}s')}"
        object.__setattr__(self, "name", name)

    @property
    def is_budget(self) -> bool:
        return self.metric == "cost_micros"


def normalize_limits(limits: Iterable[Limit]) -> tuple[Limit, ...]:
    """One limit per (metric, window), the strictest wins; the order of first appearance is kept.

    Stores count each (metric, window) once, so two limits on the same counter must not add the
    demand twice. Cached: a binding's limits are the same tuple on every request.
    """
    return _normalized(tuple(limits))


@functools.lru_cache(maxsize=4096)
def _normalized(limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
    best: dict[str, Limit] = {}
    for limit in limits:
        seen = best.get(limit.name)
        if seen is None or limit.amount < seen.amount:
            best[limit.name] = limit
    return tuple(best.values())


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-units of the currency per million tokens."""

    input_per_mtok_micros: int
    output_per_mtok_micros: int

    def __post_init__(self) -> None:
        if self.input_per_mtok_micros < 0 or self.output_per_mtok_micros < 0:
            raise ValueError("a price cannot be negative")


def cost_micros(price: Price, input_tokens: int, output_tokens: int) -> int:
    """The cost in micro-units, rounded up once: exact integers, never under-charged."""
    scaled = (
        input_tokens * price.input_per_mtok_micros + output_tokens * price.output_per_mtok_micros
    )
    return -(-scaled // _MICROS_PER_MTOK)  # ceiling division on integers, no float


def window_start(now: float, window_seconds: int) -> int:
    """The start (epoch seconds) of the fixed window of ``window_seconds`` containing ``now``."""
    start = math.floor(now / window_seconds) * window_seconds
    # The float division can round across a boundary; restore start <= now < start + window.
    if start > now:
        start -= window_seconds
    elif start + window_seconds <= now:
        start += window_seconds
    return start


def reset_after(now: float, window_seconds: int) -> float:
    """Seconds from ``now`` until that window ends; in ``(0, window_seconds]``."""
    return float(window_start(now, window_seconds) + window_seconds - now)


def quota_scope(tenant: str, binding_key: str) -> str:
    """The scope of one tenant's quota on one binding; injective (length-prefixed parts)."""
    return "".join(f"{len(p)}:{p}" for p in (tenant, binding_key))


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request reserves (an estimate) or finally used."""

    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0

    def amount(self, metric: str) -> int:
        """This demand's amount on a windowed metric (``concurrent`` is counted by the store)."""
        if metric == "requests":
            return self.requests
        if metric == "input_tokens":
            return self.input_tokens
        if metric == "output_tokens":
            return self.output_tokens
        if metric == "total_tokens":
            return self.input_tokens + self.output_tokens
        if metric == "cost_micros":
            return self.cost_micros
        raise ValueError(f"metric {metric!r} has no per-request amount")

    @staticmethod
    def used(
        input_tokens: int, output_tokens: int, price: Price | None, *, requests: int = 1
    ) -> Demand:
        """The actual usage of a finished request, priced with ``price`` (None: free)."""
        cost = cost_micros(price, input_tokens, output_tokens) if price is not None else 0
        return Demand(requests, input_tokens, output_tokens, cost)


def estimate_demand(
    prompt_tokens: int, max_tokens: int | None, default_max_tokens: int, price: Price | None
) -> Demand:
    """The reservation for one request: its prompt plus ``max_tokens`` (or the default) of output."""
    output = max_tokens if max_tokens is not None and max_tokens > 0 else default_max_tokens
    return Demand.used(max(prompt_tokens, 0), max(output, 0), price)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check.

    ``remaining``/``limits`` are keyed by ``Limit.name``; ``remaining`` is after this reservation
    when allowed, and the state left untouched when refused. ``resets`` gives the seconds until each
    windowed limit resets. ``limit`` is the limit that refused (None when allowed).
    """

    allowed: bool
    limit: Limit | None = None
    retry_after: float = 0.0
    remaining: dict[str, int] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    resets: dict[str, float] = field(default_factory=dict)
