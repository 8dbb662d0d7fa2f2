"""Quota admission for one request: reserve before it goes upstream, charge when it ends.

``Admission.admit`` reserves the estimated demand (prompt tokens estimated from the body, output =
``max_tokens`` or the binding's default, money at the dearest backend's price) against the
tenant's limits, or raises ``QuotaExceeded`` (429 with ``Retry-After``). ``headers`` are the
``x-ratelimit-*`` response headers for requests and tokens.

The charge rule (README, "Quotas"): a request that went on to a provider is charged, whatever
happens next; only one that never left the gateway, or that Envoy answered itself, is released.
``finish`` applies it, at most once per request, from what the request path saw:

* ``Outcome.NOT_ANSWERED`` (refused before it left the gateway, or answered by Envoy itself
  without a provider: a connect failure, no healthy upstream): the reservation is **released**.
* ``Outcome.ABANDONED`` (sent on to a provider, then no response byte came back: the client hung
  up while the provider worked, Envoy gave up on the request, or Envoy's upstream timeout): the
  **reservation** is charged, request and tokens. Envoy resets the upstream request when the
  client leaves, so no usage ever arrives (not over the usage log either); the provider may still
  bill the whole generation, and the reservation (the prompt estimate plus ``max_tokens`` or the
  binding's default) is the most it can be. A client that hangs up while Envoy is still connecting
  is charged too: extproc cannot tell that moment apart, and it was the client's choice.
* ``Outcome.ANSWERED`` with the provider's usage block: the **real usage** is charged at the price
  of the backend that answered.
* ``Outcome.PROVIDER_ERROR`` (a non-2xx answer from a provider): the **request** is charged, no
  tokens (providers bill none for an error).
* ``Outcome.CUT_SHORT`` (a 2xx answer without a usage block: client disconnect or upstream reset
  mid-answer, a stream or body that ended without usage, invalid JSON, a timeout): per metric the
  **larger of what was seen and the reservation**, so such a request never costs less than its
  estimate.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from typing import Any

import orjson

from extproc.errors import RateLimited
from extproc.policy import Binding, QuotaRule
from extproc.quota import Decision, Demand, Limit, Price, estimate_demand, quota_scope
from extproc.quota_store import Reservation, StoreUnavailable, check, finish, fits
from extproc.services import Services
from extproc.usage import Usage

log = logging.getLogger(__name__)

_TOKEN_METRICS = ("total_tokens", "input_tokens", "output_tokens")


class Outcome(enum.Enum):
    """How a request ended, as far as charging it is concerned (see the module docstring)."""

    NOT_ANSWERED = "not_answered"
    ABANDONED = "abandoned"
    ANSWERED = "answered"
    PROVIDER_ERROR = "provider_error"
    CUT_SHORT = "cut_short"


def at_least(seen: Usage | None, reserved: Demand, price: Price | None) -> Demand:
    """What a cut-short answer costs: per token count the larger of ``seen`` and ``reserved``,
    priced at the answering backend's ``price``, and never less money than was reserved."""
    if seen is None:
        return reserved
    tokens_in = max(seen.input_tokens, reserved.input_tokens)
    tokens_out = max(seen.output_tokens, reserved.output_tokens)
    priced = Demand.used(tokens_in, tokens_out, price)
    return Demand(reserved.requests, tokens_in, tokens_out, max(priced.cost_micros, reserved.cost_micros))


PROVIDER_ERROR_CHARGE = Demand(requests=1)


def encode_reservation(r: Reservation) -> str:
    """A reservation as a string, to travel in Envoy's dynamic metadata and come back."""
    d = r.demand
    return orjson.dumps(
        {"id": r.id, "scope": r.scope, "counters": r.counters, "demand": [d.requests, d.input_tokens, d.output_tokens, d.cost_micros], "concurrent": r.concurrent}
    ).decode()


def decode_reservation(raw: str) -> Reservation | None:
    """The reservation ``encode_reservation`` wrote; None for anything else."""
    try:
        doc = orjson.loads(raw)
        counters = tuple((str(m), int(s), int(t)) for m, s, t in doc["counters"])
        return Reservation(str(doc["id"]), str(doc["scope"]), counters, Demand(*(int(x) for x in doc["demand"])), bool(doc["concurrent"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class QuotaExceeded(RateLimited):
    def __init__(self, limit: Limit | None, retry_after: float, headers: dict[str, str]) -> None:
        what = limit.name if limit is not None else "quota"
        code = "budget_exceeded" if limit is not None and limit.is_budget else "rate_limit_exceeded"
        super().__init__(
            f"quota exceeded ({what}); retry after {math.ceil(retry_after)}s", retry_after=max(1, math.ceil(retry_after)), code=code
        )
        self.limit = limit
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return {**self._headers, **super().headers()}


def _reset(seconds: float) -> str:
    return f"{max(0, math.ceil(seconds))}s"


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    """OpenAI-style ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the tightest limits."""
    out: dict[str, str] = {}
    for kind, metrics in (("requests", ("requests",)), ("tokens", _TOKEN_METRICS)):
        names = [n for n in decision.limits if n.split("/", 1)[0] in metrics]
        if not names:
            continue
        tightest = min(names, key=lambda n: decision.remaining.get(n, decision.limits[n]))
        out[f"x-ratelimit-limit-{kind}"] = str(decision.limits[tightest])
        out[f"x-ratelimit-remaining-{kind}"] = str(max(0, decision.remaining.get(tightest, 0)))
        out[f"x-ratelimit-reset-{kind}"] = _reset(decision.resets.get(tightest, 0.0))
    return out


def _max_tokens(doc: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        v = doc.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


class Admission:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.rule: QuotaRule | None = None
        self.reservation: Reservation | None = None
        self.decision: Decision | None = None
        self.done = False

    def _store_error(self, exc: Exception) -> None:
        self.services.metrics.quota_store_errors.inc()
        # One line per 10 s, not one per request, while the store is down.
        now = self.services.clock()
        if now - self.services.store_warned_at >= 10.0:
            self.services.store_warned_at = now
            log.warning("quota store unavailable (%s): applying the bindings' fail policies", type(exc).__name__)

    async def admit(self, tenant: str, binding: Binding, doc: dict[str, Any], body_bytes: int, demand: Demand | None = None) -> None:
        """Reserve the request's estimated demand (or ``demand``: a cache hit's is one request)."""
        rule = binding.quotas.rule_for(tenant)
        if rule is None or not rule.limits:
            return
        self.rule = rule
        if demand is None:
            # ~4 bytes per token over the whole JSON body: an over-estimate, so reservations err high.
            demand = estimate_demand(math.ceil(body_bytes / 4), _max_tokens(doc), rule.default_max_tokens, binding.max_price)
        started = time.perf_counter()
        decision, self.reservation = await check(
            self.services.quotas,
            quota_scope(tenant, binding.key),
            rule.limits,
            demand,
            self.services.wall(),
            binding.quotas.fail,
            self._store_error,
        )
        m = self.services.metrics
        m.quota_store_seconds.observe(time.perf_counter() - started)
        self.decision = decision
        if tenant in self.services.current.known_tenants:
            # One gauge per tenant the policy names; a catch-all label would show whichever
            # unnamed tenant checked last (see ``Policy.metric_tenant``).
            for name, remaining in decision.remaining.items():
                m.quota_remaining.labels(tenant, binding.key, name).set(remaining)
                m.quota_limit.labels(tenant, binding.key, name).set(decision.limits.get(name, 0))
        if not decision.allowed:
            self.done = True
            raise QuotaExceeded(decision.limit, decision.retry_after, ratelimit_headers(decision))

    async def refuse_if_spent(self, tenant: str, binding: Binding) -> None:
        """Raise ``QuotaExceeded`` now if not even a one-request demand fits: a read of the store,
        nothing reserved. For work ``admit`` cannot come before (context read from MCP servers
        shapes the body whose size it reserves), so a tenant over its limits costs those servers
        nothing. A store that fails is left to ``admit`` and its fail policy."""
        rule = binding.quotas.rule_for(tenant)
        if rule is None or not rule.limits:
            return
        now = self.services.wall()
        try:
            used = await self.services.quotas.usage(quota_scope(tenant, binding.key), rule.limits, now)
        except (StoreUnavailable, TimeoutError):
            return
        decision = fits(rule.limits, used, Demand(requests=1), now)
        if not decision.allowed:
            self.decision, self.done = decision, True
            raise QuotaExceeded(decision.limit, decision.retry_after, ratelimit_headers(decision))

    def headers(self) -> dict[str, str]:
        return ratelimit_headers(self.decision) if self.decision is not None else {}

    def finish(self, outcome: Outcome, usage: Usage | None, backend_id: str) -> Demand | None:
        """Charge or release the reservation by the charge rule; runs once (later calls do nothing).

        ``usage`` is the provider's usage block (``ANSWERED``) or the partial usage seen so far
        (``CUT_SHORT``). Returns what was charged (None: released, or nothing was reserved). The
        store is updated in the background: the stream that ends here may already be gone.
        """
        if self.done or self.reservation is None:
            self.done = True
            return None
        self.done = True
        reserved = self.reservation.demand
        actual: Demand | None
        match outcome:
            case Outcome.NOT_ANSWERED:
                actual = None
            case Outcome.PROVIDER_ERROR:
                actual = PROVIDER_ERROR_CHARGE
            case Outcome.ABANDONED:
                actual = reserved
                self.services.metrics.charged_estimates.inc()
            case Outcome.ANSWERED | Outcome.CUT_SHORT:
                entry = self.services.current.backends.get(backend_id)
                price = entry[1].price if entry is not None else None
                if outcome is Outcome.CUT_SHORT:
                    actual = at_least(usage, reserved, price)
                    self.services.metrics.charged_estimates.inc()
                elif usage is not None:
                    actual = Demand.used(usage.input_tokens, usage.output_tokens, price)
                else:
                    actual = reserved
        self._spawn(actual)
        return actual

    def release(self) -> None:
        """Release the reservation: only for a request that never reached a provider."""
        self.finish(Outcome.NOT_ANSWERED, None, "")

    def _spawn(self, actual: Demand | None) -> None:
        assert self.reservation is not None
        task = asyncio.get_running_loop().create_task(
            finish(self.services.quotas, self.reservation, actual, self.services.wall(), self._store_error)
        )
        # Keep a reference until it finishes: the stream that started it may already be gone.
        self.services.background.add(task)
        task.add_done_callback(self.services.background.discard)
