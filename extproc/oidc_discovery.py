"""OIDC discovery: an issuer's keys found from ``<issuer>/.well-known/openid-configuration``.

Contract
--------
* A JWT issuer declared with ``discovery: true`` has its key set cached by ``extproc.jwks.JwksCache``
  under the source name ``discovery_source(issuer)`` (``oidc-discovery:<issuer>``, which no
  ``jwksUri`` can equal: those are http(s) URLs). ``DiscoveringFetcher.fetch`` is the cache's fetch
  function: a plain URL goes to ``fetch_jwks``; a discovery source reads the issuer's configuration
  document, takes its ``jwks_uri`` and fetches that.
* The document is trusted only when its ``issuer`` equals the configured issuer exactly (OpenID
  Connect Discovery 1.0 §4.3: otherwise a document could speak for another issuer), and its
  ``jwks_uri`` must pass the same URL rule as a configured ``jwksUri`` (``crdgol.jwks_url``).
  Same transport rules as the key set: no redirects, at most 256 KiB, one timeout for both GETs.
* The document is cached like the key set: ``Cache-Control: max-age`` clamped to
  ``[min_ttl, max_ttl]``, ``default_ttl`` without one. When a refetch of the document fails, the last
  good ``jwks_uri`` keeps being used (the key set's own fail policy then applies); when fetching
  keys from a cached ``jwks_uri`` fails, the document is refetched on the next attempt (the provider
  may have moved its keys).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from crdgol.jwks_url import jwks_url_problem
from extproc.jwks import Fetched, fetch_jwks, get_json, max_age

__all__ = ["DISCOVERY_PREFIX", "DiscoveringFetcher", "discovery_source", "discovery_url"]

DISCOVERY_PREFIX = "oidc-discovery:"
WELL_KNOWN = "/.well-known/openid-configuration"


def discovery_source(issuer: str) -> str:
    """The key-cache name of an issuer whose keys are found by discovery."""
    return DISCOVERY_PREFIX + issuer


def discovery_url(issuer: str) -> str:
    """Where the issuer's configuration document lives (§4: one terminating ``/`` is removed first)."""
    return (issuer[:-1] if issuer.endswith("/") else issuer) + WELL_KNOWN


@dataclass(slots=True)
class _Document:
    jwks_uri: str
    expires_at: float


async def fetch_configuration(issuer: str, timeout: float) -> tuple[str, float | None]:
    """The issuer's ``jwks_uri`` and the document's max-age. Raises ``ValueError`` with a reason."""
    url = discovery_url(issuer)
    problem = jwks_url_problem(url)
    if problem:
        raise ValueError(f"refused issuer URL for discovery: {problem}")
    try:
        doc, cache_control = await get_json(url, timeout)
    except ValueError as exc:
        raise ValueError(f"discovery document: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("discovery document is not a JSON object")
    if doc.get("issuer") != issuer:
        # Never echo the document's value: a hostile server chooses it.
        raise ValueError("discovery document names a different issuer (it must equal the configured issuer exactly)")
    jwks_uri = doc.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise ValueError("discovery document has no jwks_uri")
    problem = jwks_url_problem(jwks_uri)
    if problem:
        raise ValueError(f"discovery document's jwks_uri refused: {problem}")
    return jwks_uri, max_age(cache_control)


class DiscoveringFetcher:
    """The key cache's fetch function: plain JWKS URLs, and issuers found by discovery."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        default_ttl: float = 300.0,
        min_ttl: float = 30.0,
        max_ttl: float = 86_400.0,
    ) -> None:
        self._clock = clock
        self.default_ttl = default_ttl
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._documents: dict[str, _Document] = {}
        self.document_fetches = 0  # for tests and logs

    async def fetch(self, source: str, timeout: float) -> Fetched:
        if not source.startswith(DISCOVERY_PREFIX):
            return await fetch_jwks(source, timeout)
        issuer = source[len(DISCOVERY_PREFIX) :]
        started = self._clock()
        doc = self._documents.get(issuer)
        fresh_document = False
        if doc is None or started >= doc.expires_at:
            self.document_fetches += 1
            try:
                jwks_uri, ttl = await fetch_configuration(issuer, timeout)
            except ValueError:
                if doc is None:
                    raise
                # The last good document keeps pointing at the keys until the server is back; the
                # key cache's retry interval spaces the next attempt.
            else:
                ttl = self.default_ttl if ttl is None else ttl
                doc = self._documents[issuer] = _Document(jwks_uri, self._clock() + min(self.max_ttl, max(self.min_ttl, ttl)))
                fresh_document = True
        remaining = max(0.1, timeout - (self._clock() - started))
        try:
            return await fetch_jwks(doc.jwks_uri, remaining)
        except ValueError as exc:
            if not fresh_document:
                doc.expires_at = float("-inf")  # the provider may have moved its keys: ask again
            raise ValueError(f"{exc} (keys from the discovered jwks_uri)") from None
