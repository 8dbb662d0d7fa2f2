"""What an AI step cost in money, from its token usage and the binding's pricing.

The gateway does not tell a client which backend answered, so the price is the one every
candidate backend shares: the binding's backends when they are priced alike, else the backends
whose upstream model is the model the reply names (``gpt-4o`` for a reply from
``gpt-4o-2024-08-06``). When that still leaves different prices the cost is unknown (``None``)
rather than a guess. Money is kept in integer micro-units of the pricing's currency and rounded
up once per call, exactly as the gateway's own budgets charge (``extproc.quota.cost_micros``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from crdgol.pb import policy_pb2 as pb

_MICROS_PER_MTOK = 1_000_000  # prices are per million tokens


@dataclass(frozen=True, slots=True)
class BackendPrice:
    upstream_model: str
    input_per_mtok_micros: int
    output_per_mtok_micros: int


def prices_by_model(bindings: Iterable[pb.Binding]) -> dict[str, tuple[BackendPrice, ...]]:
    """Each served model -> its backends' prices; a binding with no price at all is left out."""
    out: dict[str, tuple[BackendPrice, ...]] = {}
    for b in bindings:
        prices = tuple(BackendPrice(be.model, int(be.input_per_mtok_micros), int(be.output_per_mtok_micros)) for be in b.backends)
        if any(p.input_per_mtok_micros or p.output_per_mtok_micros for p in prices):
            out[b.model] = prices
    return out


def prices_by_namespace(bindings: Iterable[pb.Binding]) -> dict[str, dict[str, tuple[BackendPrice, ...]]]:
    """``prices_by_model`` per namespace: a workflow's steps call its own namespace's bindings,
    and two namespaces may serve one model name at different prices."""
    by_namespace: dict[str, list[pb.Binding]] = {}
    for b in bindings:
        by_namespace.setdefault(b.key.split("/", 1)[0], []).append(b)
    return {namespace: prices_by_model(bs) for namespace, bs in by_namespace.items()}


def _matches(upstream: str, reply_model: str) -> bool:
    return reply_model == upstream or reply_model.startswith(upstream + "-")


def cost_micros(prices: tuple[BackendPrice, ...], reply_model: str, input_tokens: int, output_tokens: int) -> int | None:
    """The call's cost in micro-units, or None when it is not priced or not determined."""
    if not prices:
        return None
    candidates = {(p.input_per_mtok_micros, p.output_per_mtok_micros) for p in prices}
    if len(candidates) > 1:
        candidates = {(p.input_per_mtok_micros, p.output_per_mtok_micros) for p in prices if _matches(p.upstream_model, reply_model)}
    if len(candidates) != 1:
        return None
    (per_in, per_out), = candidates
    scaled = max(0, input_tokens) * per_in + max(0, output_tokens) * per_out
    return -(-scaled // _MICROS_PER_MTOK)


def money(micros: int) -> str:
    """Micro-units as a decimal string with six places ("0.000150"): exact, no float."""
    whole, frac = divmod(max(0, micros), 1_000_000)
    return f"{whole}.{frac:06d}"


def parse_money(text: object) -> int | None:
    """``money``'s text back to micro-units (None for anything else)."""
    if not isinstance(text, str):
        return None
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or not frac.isdigit() or len(frac) > 6:
        return None
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))
