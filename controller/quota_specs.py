"""An AIModelBinding's (and an MCPServer's) ``spec.quotas`` as typed data: request, token and
concurrency limits per window, money budgets per period, per tenant or by default, and their
fail policies. Pure parsing; ``extproc.quota`` enforces what it yields."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from controller.spec_parsing import SpecError
from controller.spec_parsing import as_dict as _dict
from controller.spec_parsing import as_list as _list
from controller.spec_parsing import int_in as _int
from crdgol import tenancy


@dataclass(frozen=True, slots=True)
class LimitSpec:
    metric: str  # requests | input_tokens | output_tokens | total_tokens | concurrent | cost_micros
    amount: int
    window_seconds: int = 0
    period_seconds: int = 0


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    limits: tuple[LimitSpec, ...] = ()
    default_max_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class QuotasSpec:
    default: QuotaSpec | None = None
    tenants: tuple[tuple[str, QuotaSpec], ...] = ()  # by qualified tenant
    rate_limits_fail_open: bool = True
    budgets_fail_open: bool = False


_MONEY = re.compile(r"^\d{1,12}(\.\d{1,6})?$")
WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
PERIODS = {"day": 86400, "month": 30 * 86400}
TOKEN_TYPES = {"input": "input_tokens", "output": "output_tokens", "total": "total_tokens"}


def parse_money(raw: object, what: str) -> int:
    """A decimal amount of money as a string ("2.50") -> integer micro-units, exactly."""
    text = str(raw).strip()
    if isinstance(raw, float) or not _MONEY.fullmatch(text):
        raise SpecError("InvalidQuota", f"{what}: {raw!r} must be a decimal string like \"2.50\" (quote it in YAML)")
    whole, _, frac = text.partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


def _per(raw: object, table: dict[str, int], what: str) -> int:
    if raw not in table:
        raise SpecError("InvalidQuota", f"{what}: must be one of {', '.join(table)}, got {raw!r}")
    return table[str(raw)]


def _quota(raw: object, what: str) -> QuotaSpec:
    q = _dict(raw, what)
    limits: list[LimitSpec] = []
    for i, r in enumerate(_list(q.get("requests"), f"{what}.requests")):
        r = _dict(r, f"{what}.requests[{i}]")
        limits.append(LimitSpec("requests", _int(r.get("amount"), f"{what}.requests[{i}].amount", 1, 10**12), _per(r.get("per"), WINDOWS, f"{what}.requests[{i}].per")))
    for i, t in enumerate(_list(q.get("tokens"), f"{what}.tokens")):
        t = _dict(t, f"{what}.tokens[{i}]")
        metric = TOKEN_TYPES.get(str(t.get("type", "total")))
        if metric is None:
            raise SpecError("InvalidQuota", f"{what}.tokens[{i}].type: must be input, output or total")
        limits.append(LimitSpec(metric, _int(t.get("amount"), f"{what}.tokens[{i}].amount", 1, 10**15), _per(t.get("per"), WINDOWS, f"{what}.tokens[{i}].per")))
    if q.get("concurrent") is not None:
        limits.append(LimitSpec("concurrent", _int(q.get("concurrent"), f"{what}.concurrent", 1, 10**6)))
    if q.get("budget") is not None:
        b = _dict(q.get("budget"), f"{what}.budget")
        limits.append(
            LimitSpec("cost_micros", parse_money(b.get("amount"), f"{what}.budget.amount"), period_seconds=_per(b.get("per", "month"), PERIODS, f"{what}.budget.per"))
        )
    return QuotaSpec(tuple(limits), _int(q.get("defaultMaxTokens", 1024), f"{what}.defaultMaxTokens", 1, 10**7))


def _fail(raw: object, what: str, default: str) -> bool:
    value = str(raw or default)
    if value not in ("open", "closed"):
        raise SpecError("InvalidQuota", f"{what}: must be open or closed, got {raw!r}")
    return value == "open"


def parse_tenant(parse: Callable[[str, str], str], raw: object, namespace: str, what: str) -> str:
    try:
        return parse(str(raw), namespace)
    except ValueError as exc:
        raise SpecError("InvalidTenant", f"{what}: {exc}") from None


def parse_quotas(raw: object, namespace: str) -> QuotasSpec:
    q = _dict(raw, "spec.quotas")
    if not q:
        return QuotasSpec()
    tenants: dict[str, QuotaSpec] = {}
    for t, v in _dict(q.get("tenants"), "spec.quotas.tenants").items():
        what = f"spec.quotas.tenants.{t}"
        key = parse_tenant(tenancy.parse_key, t, namespace, what)
        if key in tenants:
            raise SpecError("InvalidTenant", f"{what}: the tenant {key} has two entries")
        tenants[key] = _quota(v, what)
    fail = _dict(q.get("failPolicy"), "spec.quotas.failPolicy")
    return QuotasSpec(
        default=_quota(q["default"], "spec.quotas.default") if q.get("default") is not None else None,
        tenants=tuple(sorted(tenants.items())),
        rate_limits_fail_open=_fail(fail.get("rateLimits"), "spec.quotas.failPolicy.rateLimits", "open"),
        budgets_fail_open=_fail(fail.get("budgets"), "spec.quotas.failPolicy.budgets", "closed"),
    )
