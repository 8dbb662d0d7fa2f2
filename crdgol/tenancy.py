"""Who owns a tenant: the namespace whose resources can act as it.

The rules, shared by the controller (which renders them) and extproc (which enforces them):

* A tenant is ``namespace/name``. Only identity sources in that namespace can act as it: an
  API-key Secret there (its ``crdgol.io/tenant`` annotation names the tenant), or a JWT issuer
  declared by an AIModelBinding there (the token's tenant claim names it). A name never carries a
  namespace: a Secret or token that tries (``other/quickstart``) is refused, so no source can
  name a tenant of another namespace.
* An AIModelBinding says which tenants may call it with patterns: ``name`` is a tenant of the
  binding's own namespace, ``namespace/name`` a tenant of another (the binding's owner granting
  it), ``*`` every tenant of its own namespace and ``namespace/*`` every tenant of that one. No
  patterns at all means ``*``: a binding serves its own namespace unless its owner says more.
* Quotas, session history and metrics are keyed by the qualified tenant, so two namespaces' tenants
  of the same name share nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

SEPARATOR = "/"
WILDCARD = "*"
# Tenant names: what a Secret annotation or a JWT claim may hold. No "/" (it would name another
# namespace), no "*" (it would read as a pattern), nothing a log line or a label could trip on.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._@:+=-]{0,126}[A-Za-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def valid_name(name: str) -> bool:
    """Whether ``name`` can name a tenant (1-128 characters, no '/' or '*')."""
    return _NAME.fullmatch(name) is not None


def valid_namespace(namespace: str) -> bool:
    """Whether ``namespace`` is a Kubernetes namespace name (a DNS label: no '/', no '*')."""
    return _NAMESPACE.fullmatch(namespace) is not None


def qualified(namespace: str, name: str) -> str:
    """The tenant ``name`` owned by ``namespace``. ``name`` must be valid (see ``valid_name``)."""
    return f"{namespace}{SEPARATOR}{name}"


def namespace_of(tenant: str) -> str:
    return tenant.partition(SEPARATOR)[0]


@functools.lru_cache(maxsize=65536)  # bindings share a few tenant names; 5,000 parse on a restart
def parse_pattern(raw: str, namespace: str) -> str:
    """A binding's tenant pattern, qualified against the binding's ``namespace``.

    ``name`` -> ``namespace/name``; ``*`` -> ``namespace/*``; ``other/name`` and ``other/*`` stay.
    Raises ``ValueError`` saying what is wrong.
    """
    text = raw.strip()
    ns, sep, name = text.rpartition(SEPARATOR)
    if not sep:
        ns = namespace
    elif not _NAMESPACE.fullmatch(ns):
        raise ValueError(f"{raw!r}: {ns!r} is not a namespace name")
    if name != WILDCARD and not valid_name(name):
        raise ValueError(
            f"{raw!r}: a tenant is 'name', 'namespace/name', '*' or 'namespace/*', with names of "
            "letters, digits and ._@:+=- (at most 128)"
        )
    return qualified(ns, name)


def parse_key(raw: str, namespace: str) -> str:
    """A quota entry's tenant (no wildcards), qualified like ``parse_pattern``."""
    tenant = parse_pattern(raw, namespace)
    if tenant.endswith(SEPARATOR + WILDCARD):
        raise ValueError(f"{raw!r}: name one tenant here (use 'default' for everyone else)")
    return tenant


def granted(patterns: frozenset[str], tenant: str) -> bool:
    """Whether qualified ``patterns`` (see ``parse_pattern``) let ``tenant`` in."""
    return tenant in patterns or qualified(namespace_of(tenant), WILDCARD) in patterns


def foreign_namespaces(patterns: Iterable[str], own: str) -> frozenset[str]:
    """The namespaces other than ``own`` whose tenants the patterns grant anything to."""
    return frozenset(namespace_of(p) for p in patterns if namespace_of(p) != own)
