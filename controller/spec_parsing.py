"""What every resource parser shares: the refusal type and the checks of plain values.

``SpecError`` carries a CamelCase ``reason`` (the status condition's) and a message that says what
to fix, with the field's path. Nothing here knows a particular resource.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SpecError(ValueError):
    """A resource that cannot be served. ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# The longest duration any field takes (a year). Beyond it a value is a mistake, and it would not
# fit the policy snapshot's 32-bit seconds or Envoy's Duration: one binding must never be able to
# stop the render for every namespace.
MAX_DURATION_SECONDS = 366 * 24 * 3600.0


def parse_duration(raw: object, what: str) -> float:
    """'30s', '500ms', '2m', '1h' (or a number of seconds) -> seconds, above 0 and at most a year."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        seconds = float(raw)
    else:
        m = _DURATION.fullmatch(str(raw).strip())
        if not m:
            raise SpecError("InvalidDuration", f"{what}: {raw!r} is not a duration like '30s', '500ms' or '2m'")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    # "not <=" also refuses NaN; the upper bound also refuses infinity.
    if not seconds > 0:
        raise SpecError("InvalidDuration", f"{what}: {raw!r} is not a duration like '30s', '500ms' or '2m'")
    if seconds > MAX_DURATION_SECONDS:
        raise SpecError("InvalidDuration", f"{what}: {raw!r} is longer than a year (8784h)")
    return seconds


def int_in(raw: object, what: str, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise SpecError("InvalidSpec", f"{what}: must be an integer from {lo} to {hi}, got {raw!r}")
    return raw


def as_dict(raw: object, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError("InvalidSpec", f"{what}: must be an object")
    return raw


def as_list(raw: object, what: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError("InvalidSpec", f"{what}: must be a list")
    return raw


def reserved_address(host: str, *, loopback: bool) -> str:
    """Why the gateway must not call ``host`` on a resource author's behalf ("" when it may): a
    link-local address (cloud metadata services live there and answer with the node's
    credentials), multicast or unspecified (0.0.0.0 reaches the local host), and with ``loopback``
    also the loopback addresses and ``localhost`` (the gateway pod's own Envoy admin, extproc).
    Literal addresses only: a DNS name is not resolved here."""
    bare = host.strip("[]")
    if loopback and bare.lower() == "localhost":
        return f"{host} is the gateway's own host"
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    if address.is_link_local or address.is_multicast or address.is_unspecified:
        return f"{host} is a link-local, multicast or unspecified address"
    if loopback and address.is_loopback:
        return f"{host} is a loopback address: on a cluster that is the gateway pod itself"
    return ""
