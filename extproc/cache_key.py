"""What a cached answer is keyed by, and whether a request may use the cache at all: pure functions.

Contract
--------
* ``exact`` is the SHA-256 (hex) of everything that shapes the answer, taken **after** context
  injection: the client API, the binding, every backend's (id, upstream model), the scope (the
  qualified tenant, or ``*`` when the binding shares its cache), and the whole request body with
  the injected context in it, minus only what changes the framing and not the answer (``model``,
  which the binding stands for, ``stream`` and ``stream_options``). Two sessions whose histories
  differ, two tenants, two bindings or two sampling settings therefore never share an entry.
  Keys are hashed JSON of the body: no header is ever part of one, so no credential can be; the
  material is never logged.
* ``partition`` (semantic mode only; "" otherwise) is the same hash with the last user message's text left out;
  ``text`` is that text. Semantic matches are only searched within one partition, so everything
  but the question itself (context, history, parameters, tenant) must still match exactly.
* ``directives(headers)`` reads the caller's wishes: ``x-crdgol-cache: bypass`` skips the cache
  both ways; ``Cache-Control: no-cache`` skips the lookup (the fresh answer is stored);
  ``Cache-Control: no-store`` keeps the answer out of the cache (a stored one may still serve).
* ``eligible(rule, doc, stream)``: the rule's streaming / non-streaming switches and
  ``maxTemperature``; requests asking for several choices (``n`` > 1) are never cached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from crdgol import request_path
from extproc.policy import Api, Binding, CacheRule

__all__ = ["BYPASS_HEADER", "CacheKey", "Directives", "directives", "eligible", "make_key"]

# Request header a caller sets to skip the cache (value "bypass"); the response header of the same
# name says what the cache did: hit, miss or bypass.
BYPASS_HEADER = request_path.BYPASS_HEADER  # a request directive; extproc also reads it on the one-message path
_FRAMING = ("model", "stream", "stream_options")
_VERSION = 1  # bump when the material changes: old entries then simply stop matching


@dataclass(frozen=True, slots=True)
class Directives:
    lookup: bool = True
    store: bool = True


def directives(headers: dict[str, str]) -> Directives:
    if headers.get(BYPASS_HEADER, "").strip().lower() == "bypass":
        return Directives(lookup=False, store=False)
    raw = headers.get("cache-control", "")
    if not raw:
        return Directives()
    words = {w.strip().split("=", 1)[0].lower() for w in raw.split(",")}
    return Directives(lookup="no-cache" not in words, store="no-store" not in words)


def eligible(rule: CacheRule, doc: dict[str, Any], stream: bool) -> bool:
    if not (rule.streaming if stream else rule.non_streaming):
        return False
    n = doc.get("n")
    if n is not None and n != 1:
        return False
    if rule.max_temperature is not None:
        t = doc.get("temperature", 1.0)  # both APIs default to 1
        if isinstance(t, bool) or not isinstance(t, int | float) or t > rule.max_temperature:
            return False
    return True


@dataclass(frozen=True, slots=True)
class CacheKey:
    exact: str
    partition: str
    text: str  # the last user message's text (semantic lookups embed it); "" when there is none


def _last_user(messages: list[Any]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return i
    return -1


def message_text(content: Any) -> str:
    """A message's text: string content, or its text parts/blocks joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")
        )
    return ""


def _digest(material: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def make_key(binding: Binding, api: Api, tenant: str, doc: dict[str, Any]) -> CacheKey:
    """The keys of a request whose body ``doc`` already carries the injected context."""
    rule = binding.cache
    shared = rule is not None and rule.shared
    body = {k: v for k, v in doc.items() if k not in _FRAMING}
    head = {
        "v": _VERSION,
        "api": api.value,
        "binding": binding.key,
        "backends": [[b.id, b.model] for b in binding.backends],
        "scope": "*" if shared else tenant,
    }
    exact = _digest({**head, "body": body})
    messages = body.get("messages")
    text, partition = "", ""
    if rule is not None and rule.semantic and isinstance(messages, list):
        i = _last_user(messages)
        if i >= 0:
            text = message_text(messages[i].get("content"))
            # The question left out, its place kept: a different history or context is still
            # a different partition.
            rest = [*messages[:i], {"role": "user", "content": None}, *messages[i + 1 :]]
            partition = _digest({**head, "semantic": True, "body": {**body, "messages": rest}})
    return CacheKey(exact, partition, text)
