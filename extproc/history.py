"""Session history: the conversation memory the context policy injects.

Contract
--------
* A ``HistoryStore`` keeps, per key, an ordered list of ``Turn``s (oldest first). ``load`` returns
  at most the ``max_turns`` most recent; ``append`` adds turns, trims the session to ``max_turns``
  and (re)sets its time-to-live to ``ttl_seconds``. The interface is async so a Redis store can
  implement the same Protocol.
* ``max_turns <= 0`` means "the store's own cap" and ``ttl_seconds <= 0`` means "the store's default
  TTL": every session is bounded in length and lifetime, whatever the policy says.
* Keys come from ``history_key(tenant, binding_key, principal, session_id)``, which is injective
  and starts with the tenant, so one tenant can never name (let alone read) another tenant's
  session, even with the same session id; and within a tenant each caller (``Identity.principal``:
  its JWT issuer and subject, or its API key, hashed) has sessions of its own, so guessing another
  user's ``x-session-id`` finds nothing.
* Session ids supplied by clients go through ``validate_session_id`` first.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from extproc.errors import BadRequest

__all__ = [
    "HistoryStore",
    "MemoryHistoryStore",
    "Turn",
    "history_key",
    "validate_session_id",
]

_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


class HistoryStore(Protocol):
    async def load(self, key: str, max_turns: int) -> list[Turn]:
        """The session's turns, oldest first: at most the ``max_turns`` most recent."""
        ...

    async def append(
        self, key: str, turns: Sequence[Turn], max_turns: int, ttl_seconds: int, max_chars: int = 0
    ) -> None:
        """Append ``turns``, keep the ``max_turns`` most recent, expire ``ttl_seconds`` from now.

        ``max_chars`` (0: no bound) lets a store also drop the oldest turns beyond that many
        characters of content: the history budget can never inject them, so nothing is lost.
        """
        ...


def validate_session_id(raw: str) -> str:
    """Return ``raw`` if it is 1..128 characters of ``[A-Za-z0-9._:-]``; raise BadRequest otherwise.

    The restriction keeps ids safe to embed in store keys, logs and metrics labels.
    """
    # re.fullmatch, not "$": "$" would also accept a trailing newline.
    if not isinstance(raw, str) or _SESSION_ID.fullmatch(raw) is None:
        raise BadRequest(
            "invalid session id: use 1 to 128 characters from A-Z, a-z, 0-9, '.', '_', ':' and '-'",
            code="invalid_session_id",
        )
    return raw


def history_key(tenant: str, binding_key: str, principal: str, session_id: str) -> str:
    """The store key of one caller's session. Injective, and scoped by tenant first.

    Each part is length-prefixed (``<len>:<part>``), so no choice of parts can produce another
    tuple's key: ("a:b", "c") and ("a", "b:c") give different keys, whatever characters the parts
    contain. The tenant comes first so a key-space scan by tenant prefix is possible.
    """
    if not principal:
        raise ValueError("a session belongs to a caller: the principal is required")
    return "crdgol:hist:" + "".join(f"{len(p)}:{p}" for p in (tenant, binding_key, principal, session_id))


@dataclass(slots=True)
class _Session:
    turns: list[Turn]
    expires_at: float


class MemoryHistoryStore:
    """The embedded default store: an in-process LRU of sessions.

    Bounded three ways: at most ``max_sessions`` sessions (least recently used evicted first), at
    most ``max_turns_cap`` turns per session, and a TTL per session (refreshed on every append;
    expired sessions are dropped lazily when touched or evicted). Methods never await, so each is
    atomic with respect to the event loop. Per-process: replicas do not share memory; use the
    Redis store when sessions must survive restarts or span replicas.
    """

    def __init__(
        self,
        *,
        max_sessions: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        max_turns_cap: int = 1_000,
        default_ttl_seconds: int = 86_400,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if max_turns_cap < 1:
            raise ValueError("max_turns_cap must be at least 1")
        self._max_sessions = max_sessions
        self._clock = clock
        self._max_turns_cap = max_turns_cap
        self._default_ttl = max(1, default_ttl_seconds)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        """Sessions held, including expired ones not yet swept."""
        return len(self._sessions)

    def _limit(self, max_turns: int) -> int:
        return self._max_turns_cap if max_turns <= 0 else min(max_turns, self._max_turns_cap)

    def _live(self, key: str) -> _Session | None:
        session = self._sessions.get(key)
        if session is None:
            return None
        if self._clock() >= session.expires_at:
            del self._sessions[key]
            return None
        return session

    async def load(self, key: str, max_turns: int) -> list[Turn]:
        session = self._live(key)
        if session is None:
            return []
        self._sessions.move_to_end(key)  # reading a session counts as use for the LRU
        return list(session.turns[-self._limit(max_turns) :])

    async def append(
        self, key: str, turns: Sequence[Turn], max_turns: int, ttl_seconds: int, max_chars: int = 0
    ) -> None:
        ttl = ttl_seconds if ttl_seconds > 0 else self._default_ttl
        expires_at = self._clock() + ttl
        limit = self._limit(max_turns)
        session = self._live(key)
        if session is None:
            if not turns:
                return
            session = _Session(turns=[], expires_at=expires_at)
            self._sessions[key] = session
        session.turns.extend(turns)
        if len(session.turns) > limit:
            del session.turns[: len(session.turns) - limit]
        if max_chars > 0:
            # Keep the newest turns that fit: memory per session is bounded by the history budget.
            total, keep = 0, len(session.turns)
            while keep > 0 and total + len(session.turns[keep - 1].content) <= max_chars:
                keep -= 1
                total += len(session.turns[keep].content)
            del session.turns[:keep]
        session.expires_at = expires_at
        self._sessions.move_to_end(key)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)
