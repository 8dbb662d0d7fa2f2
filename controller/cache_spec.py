"""A binding's response cache (``spec.cache``): its typed spec, its parser and its policy form.

``parse_cache`` reads ``spec.cache`` into a frozen ``CacheSpec`` (None when the binding has no
cache) or raises ``SpecError`` with reason ``InvalidCache`` and the field's path. ``cache_pb``
writes it into the policy snapshot; ``check_references`` is the one check that needs the other
bindings of the render (the embeddings binding a semantic cache names must exist in the same
namespace and speak the OpenAI API).

What is cached, and when, is extproc's business (``extproc.cache``); nothing here touches Envoy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.spec_parsing import SpecError, as_dict, int_in, parse_duration
from crdgol.pb import policy_pb2 as pb

if TYPE_CHECKING:
    from controller.models import BindingSpec

MODES = ("exact", "semantic")
SCOPES = ("tenant", "shared")
_REASON = "InvalidCache"


@dataclass(frozen=True, slots=True)
class CacheSpec:
    mode: str = "exact"
    ttl_seconds: int = 600
    max_entry_bytes: int = 256 * 1024
    scope: str = "tenant"
    streaming: bool = True
    non_streaming: bool = True
    max_temperature: float | None = None
    # Semantic mode only: the embeddings binding (a name in the cache's namespace), the cosine
    # similarity at or above which a stored answer is served, and the vectors kept per partition.
    embedding_binding: str = ""
    threshold: float = 0.95
    max_entries: int = 1000


def _bool(raw: object, what: str, default: bool) -> bool:
    if raw is None:
        return default
    if not isinstance(raw, bool):
        raise SpecError(_REASON, f"{what}: must be true or false, got {raw!r}")
    return raw


def _number(raw: object, what: str, lo: float, hi: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or not lo <= raw <= hi:
        raise SpecError(_REASON, f"{what}: must be a number from {lo:g} to {hi:g}, got {raw!r}")
    return float(raw)


def _choice(raw: object, what: str, choices: tuple[str, ...]) -> str:
    if raw not in choices:
        raise SpecError(_REASON, f"{what}: must be one of {', '.join(choices)}, got {raw!r}")
    return str(raw)


def parse_cache(raw: object) -> CacheSpec | None:
    """``spec.cache`` -> ``CacheSpec`` (None: no cache), or ``SpecError`` saying what to fix."""
    if raw is None:
        return None
    c = as_dict(raw, "spec.cache")
    mode = _choice(c.get("mode", "exact"), "spec.cache.mode", MODES)
    ttl = parse_duration(c.get("ttl", "10m"), "spec.cache.ttl")
    eligible = as_dict(c.get("eligible"), "spec.cache.eligible")
    sem = as_dict(c.get("semantic"), "spec.cache.semantic")
    max_temp = eligible.get("maxTemperature")
    spec = CacheSpec(
        mode=mode,
        ttl_seconds=max(1, math.ceil(ttl)),
        max_entry_bytes=int_in(c.get("maxEntryBytes", 256 * 1024), "spec.cache.maxEntryBytes", 1, 16 * 1024 * 1024),
        scope=_choice(c.get("scope", "tenant"), "spec.cache.scope", SCOPES),
        streaming=_bool(eligible.get("streaming"), "spec.cache.eligible.streaming", True),
        non_streaming=_bool(eligible.get("nonStreaming"), "spec.cache.eligible.nonStreaming", True),
        max_temperature=None if max_temp is None else _number(max_temp, "spec.cache.eligible.maxTemperature", 0, 2),
        embedding_binding=str(sem.get("embeddingBinding") or ""),
        threshold=_number(sem.get("threshold", 0.95), "spec.cache.semantic.threshold", 0, 1),
        max_entries=int_in(sem.get("maxEntries", 1000), "spec.cache.semantic.maxEntries", 1, 10_000),
    )
    if not (spec.streaming or spec.non_streaming):
        raise SpecError(_REASON, "spec.cache.eligible: streaming and nonStreaming are both false: nothing could be cached")
    if mode == "semantic" and not spec.embedding_binding:
        raise SpecError(_REASON, "spec.cache.semantic.embeddingBinding: semantic mode needs the name of an embeddings binding")
    if mode == "exact" and sem:
        raise SpecError(_REASON, "spec.cache.semantic: only for mode semantic")
    return spec


def check_references(b: BindingSpec, others: Mapping[str, BindingSpec]) -> None:
    """The embeddings binding a semantic cache names: in the same namespace, OpenAI-speaking."""
    c = b.cache
    if c is None or c.mode != "semantic":
        return
    what = "spec.cache.semantic.embeddingBinding"
    target = others.get(f"{b.namespace}/{c.embedding_binding}")
    if target is None:
        raise SpecError(_REASON, f"{what}: no AIModelBinding {c.embedding_binding!r} in namespace {b.namespace}")
    if target.key == b.key:
        raise SpecError(_REASON, f"{what}: a binding cannot embed with itself; name an embeddings binding")
    first = min(target.backends, key=lambda be: be.priority)
    if first.provider == "anthropic":
        raise SpecError(_REASON, f"{what}: {c.embedding_binding!r} is served by Anthropic, which has no embeddings API")


def cache_pb(b: BindingSpec) -> pb.CachePolicy | None:
    """The policy form of ``b.cache`` (None: no cache)."""
    c = b.cache
    if c is None:
        return None
    out = pb.CachePolicy(
        enabled=True,
        semantic=c.mode == "semantic",
        ttl_seconds=c.ttl_seconds,
        max_entry_bytes=c.max_entry_bytes,
        shared=c.scope == "shared",
        streaming=c.streaming,
        non_streaming=c.non_streaming,
        embedding_binding=f"{b.namespace}/{c.embedding_binding}" if c.embedding_binding else "",
        threshold=c.threshold,
        max_entries=c.max_entries,
    )
    if c.max_temperature is not None:
        out.max_temperature = c.max_temperature
    return out
