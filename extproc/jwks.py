"""Remote JWKS: an issuer's RS256 keys fetched from its ``jwksUri``, cached, and kept fresh.

Contract
--------
* ``parse_jwks`` turns a JWKS document (or one JWK) into RS256 public keys by ``kid`` with
  pyjwt's ``PyJWK``; keys of other types or uses are skipped, a malformed one fails the document.
* ``JwksCache`` lives as long as the process (policy versions come and go; a key set fetched for
  one is still good for the next). ``keys(uri)`` is the hot path: a dict look-up that never waits.
  It returns the last good key set, or None before the first successful fetch, and when the set
  is past its lifetime it starts one refresh in the background (the stale set keeps serving).
* ``prefetch(uris)`` starts fetching what a new policy names, off the request path.
* ``refresh(uri, kid=...)`` is the one call a request may wait on (at most ``request_wait``, while
  the fetch itself may take up to ``timeout``): before
  the first key set exists, or when a token names a ``kid`` the set does not have (the issuer
  rotated). Unknown-kid refreshes of one URL are spaced at least ``min_refresh`` apart, so tokens
  with forged kids cannot make the gateway hammer the identity provider; concurrent waiters share
  one fetch.

Lifetime: the response's ``Cache-Control: max-age`` (``no-cache``/``no-store``: the minimum),
clamped to ``[min_ttl, max_ttl]``; ``default_ttl`` without one.

When the key server is down or answers garbage (fail policy): the last good key set stays in
force, for as long as the outage lasts, and the next attempt waits ``retry_after_error``; tokens it
verifies keep working and rotation waits for the server. An issuer whose keys were never fetched
refuses its tokens with 503 (the caller may retry), not 401. Nothing here logs a token or a
response body; fetch errors are logged at most once per ``retry_after_error`` per URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt import PyJWK, PyJWKError
from jwt.exceptions import InvalidKeyError

from crdgol.jwks_url import jwks_url_problem

log = logging.getLogger(__name__)

__all__ = ["JwksCache", "KeySet", "fetch_jwks", "parse_jwks"]

# A real JWKS is a few KiB; a key server answering megabytes is broken or hostile.
MAX_JWKS_BYTES = 256 * 1024
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

Keys = Mapping[str, RSAPublicKey]


def parse_jwks(doc: object) -> dict[str, RSAPublicKey]:
    """A parsed JWKS document (or a single JWK) as RS256 public keys by kid. Raises ValueError."""
    if isinstance(doc, dict) and "keys" in doc:
        jwks = doc["keys"]
    elif isinstance(doc, dict) and "kty" in doc:
        jwks = [doc]
    else:
        raise ValueError("expected an object with a 'keys' array")
    if not isinstance(jwks, list):
        raise ValueError("'keys' is not an array")
    out: dict[str, RSAPublicKey] = {}
    for i, jwk in enumerate(jwks):
        if not isinstance(jwk, dict):
            raise ValueError(f"key #{i} is not an object")
        # Skip keys that are not RS256 signing keys rather than failing the whole set: real JWKS
        # documents often mix encryption keys or other algorithms in.
        if jwk.get("kty") != "RSA" or jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") != "RS256":
            continue
        try:
            key = PyJWK(jwk, algorithm="RS256").key
        except (PyJWKError, InvalidKeyError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"key #{i} is not a valid RSA JWK ({type(exc).__name__})") from None
        # A JWK that carries private parameters still verifies with its public half; never keep
        # private material around longer than needed.
        if isinstance(key, RSAPrivateKey):
            key = key.public_key()
        if not isinstance(key, RSAPublicKey):
            raise ValueError(f"key #{i} is not an RSA public key")
        kid = jwk.get("kid", "")
        if not isinstance(kid, str):
            raise ValueError(f"key #{i} has a non-string 'kid'")
        if kid in out:
            raise ValueError(f"duplicate kid {kid!r}")
        out[kid] = key
    return out


def max_age(cache_control: str) -> float | None:
    """Seconds a response may be cached for, from its Cache-Control header (None: not said)."""
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0.0
    m = _MAX_AGE.search(cache_control)
    return float(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class Fetched:
    keys: dict[str, RSAPublicKey]
    max_age: float | None  # from Cache-Control


Fetcher = Callable[[str, float], Awaitable[Fetched]]


async def get_json(url: str, timeout: float) -> tuple[Any, str]:
    """GET ``url`` (no redirects, at most ``MAX_JWKS_BYTES``) and parse it as JSON: the document
    and its Cache-Control. Raises ``ValueError`` (with a reason fit for a log) on failure."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            # No redirects: a redirect could lead from https to http, or anywhere else.
            session.get(url, allow_redirects=False, headers={"accept": "application/json"}) as resp,
        ):
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            # ``read(n)`` answers with what has arrived so far (one TCP segment, one TLS record or
            # one chunk): read until the end or one byte past the limit.
            body = b""
            while len(body) <= MAX_JWKS_BYTES:
                piece = await resp.content.read(MAX_JWKS_BYTES + 1 - len(body))
                if not piece:
                    break
                body += piece
            cache_control = resp.headers.get("cache-control", "")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ValueError(f"unreachable ({type(exc).__name__})") from None
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
    try:
        return orjson.loads(body), cache_control
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None


async def fetch_jwks(uri: str, timeout: float) -> Fetched:
    """GET ``uri`` and parse it. Raises ``ValueError`` (with a reason fit for a log) on failure."""
    problem = jwks_url_problem(uri)
    if problem:
        raise ValueError(f"refused URL: {problem}")
    doc, cache_control = await get_json(uri, timeout)
    keys = parse_jwks(doc)
    if not keys:
        raise ValueError("no RS256 signing keys in the set")
    return Fetched(keys, max_age(cache_control))


class KeySet:
    """One URL's cached keys and the bookkeeping of its refreshes."""

    __slots__ = ("errors", "expires_at", "inflight", "keys", "last_forced", "next_try")

    def __init__(self) -> None:
        self.keys: Keys | None = None  # the last good set
        self.expires_at = float("-inf")
        self.next_try = float("-inf")  # no fetch before this (after an error)
        self.last_forced = float("-inf")  # last unknown-kid refresh
        self.inflight: asyncio.Task[None] | None = None
        self.errors = 0


class JwksCache:
    def __init__(
        self,
        *,
        fetch: Fetcher = fetch_jwks,
        clock: Callable[[], float] = time.monotonic,
        default_ttl: float = 300.0,
        min_ttl: float = 30.0,
        max_ttl: float = 86_400.0,
        min_refresh: float = 10.0,
        retry_after_error: float = 10.0,
        timeout: float = 5.0,
        request_wait: float = 1.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self.default_ttl = default_ttl
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.min_refresh = min_refresh
        self.retry_after_error = retry_after_error
        self.timeout = timeout
        # A request waits at most this long for a fetch (the fetch itself may go on): well inside
        # Envoy's 2 s per-message timeout, after which the request would fail closed anyway.
        self.request_wait = request_wait
        self._sets: dict[str, KeySet] = {}
        self.fetches = 0  # attempts, for tests and logs

    def _set(self, uri: str) -> KeySet:
        ks = self._sets.get(uri)
        if ks is None:
            ks = self._sets[uri] = KeySet()
        return ks

    # ------------------------------------------------------------------ hot path

    def keys(self, uri: str) -> Keys | None:
        """The last good keys of ``uri`` (None: none yet); refreshes a stale set in the background."""
        ks = self._set(uri)
        now = self._clock()
        if now >= ks.expires_at and now >= ks.next_try and ks.inflight is None:
            self._start(uri, ks)
        return ks.keys

    def prefetch(self, uris: Iterable[str]) -> None:
        """Start fetching every URL not yet fetched (a new policy's); needs a running loop."""
        for uri in uris:
            self.keys(uri)

    async def refresh(self, uri: str, *, kid: str | None = None) -> None:
        """Wait (at most ``request_wait``) for a fresh key set, when one is due.

        Without ``kid``: only when no key set exists yet. With ``kid`` (a token named a key the set
        lacks): only if the set still lacks it and no forced refresh of this URL happened in the
        last ``min_refresh`` seconds.
        """
        ks = self._set(uri)
        now = self._clock()
        if kid is None:
            if ks.keys is not None or (ks.inflight is None and now < ks.next_try):
                return
        else:
            if ks.keys is not None and kid in ks.keys:
                return
            if ks.inflight is None:
                if now - ks.last_forced < self.min_refresh or now < ks.next_try:
                    return
                ks.last_forced = now
        task = ks.inflight or self._start(uri, ks)
        if task is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), self.request_wait)

    # ------------------------------------------------------------------ fetching

    def _start(self, uri: str, ks: KeySet) -> asyncio.Task[None] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next async one fetches
            return None
        task = loop.create_task(self._run(uri, ks))
        ks.inflight = task
        return task

    async def _run(self, uri: str, ks: KeySet) -> None:
        self.fetches += 1
        try:
            fetched = await self._fetch(uri, self.timeout)
        except ValueError as exc:
            ks.next_try = self._clock() + self.retry_after_error
            ks.errors += 1
            kept = f"keeping the last good set ({len(ks.keys)} keys)" if ks.keys is not None else "no keys yet: its tokens get 503"
            log.warning("JWKS %s could not be fetched: %s; %s, retrying in %.0fs", uri, exc, kept, self.retry_after_error)
        else:
            ttl = self.default_ttl if fetched.max_age is None else fetched.max_age
            now = self._clock()
            ks.expires_at = now + min(self.max_ttl, max(self.min_ttl, ttl))
            ks.next_try = float("-inf")
            ks.errors = 0
            if ks.keys is None or set(ks.keys) != set(fetched.keys):
                log.info("JWKS %s: %d keys (%s)", uri, len(fetched.keys), ", ".join(sorted(k or "<no kid>" for k in fetched.keys)))
            ks.keys = MappingProxyType(fetched.keys)
        finally:
            ks.inflight = None

