"""Which JWKS URLs a JWT issuer may name (``spec.auth.jwt[].jwksUri``, or its issuer URL with
``discovery: true`` and the ``jwks_uri`` its discovery document names).

The controller refuses a binding whose URL breaks the rule, and extproc checks it again before
every fetch, so both sides apply one rule. Keys that decide who a caller is must not travel in
clear text where anyone on the path could swap them: ``https`` always, ``http`` only to a
loopback address (a key server on the same host: tests, a sidecar). No credentials in the URL
(they would be logged and shown in status), no fragment.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["discovery_issuer_problem", "jwks_url_problem", "loopback_host"]

MAX_URL_LENGTH = 2048


def loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def jwks_url_problem(url: str) -> str:
    """"" when ``url`` may be fetched for keys; otherwise what is wrong with it, for a person."""
    if len(url) > MAX_URL_LENGTH:
        return f"longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError:
        return "not a valid URL"
    del port
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@)"
    if parts.fragment:
        return "must not have a #fragment"
    if parts.scheme == "http" and not loopback_host(host):
        return "must use https (http is allowed only to a loopback address such as 127.0.0.1)"
    return ""


def discovery_issuer_problem(issuer: str) -> str:
    """"" when keys may be found by OIDC discovery from ``issuer``; otherwise what is wrong.

    The issuer URL is where its configuration document is read from, so the URL rule applies to
    it; OIDC issuers have no query either (Discovery 1.0 §2).
    """
    problem = jwks_url_problem(issuer)
    if problem:
        return problem
    if urlsplit(issuer).query:
        return "must not have a ?query"
    return ""
