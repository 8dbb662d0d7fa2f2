"""A (re)started operator rolls nothing out until it holds what the cluster held when it started.

Envoy and extproc keep the last config they got while no controller serves them. kopf delivers
the initial listing object by object, and publishing is only coalesced over a short delay
(``operator.Batcher``), so a restarted controller that rolled out its first render while the
listing was still arriving would replace a whole config with part of one: models not yet
delivered would answer 404, callers whose API-key Secret was not yet read 401, and the workflows'
egress listener and run API route would vanish under running steps. So at start the operator
lists the names of what is there (``expected``), and roll-outs wait until every one of them is in
the state, or until ``deadline`` passes (an object deleted between that list and kopf's own is
never delivered), whichever comes first. Renders and statuses go on meanwhile; only Envoy and
extproc wait. After the first roll-out the gate is open for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

__all__ = ["InitialSync", "list_path", "listed_keys"]

# (method, path, body, content type) -> (HTTP status, parsed body): the operator's API client.
Request = Callable[..., Awaitable[tuple[int, Any]]]


def list_path(group_version: str, plural: str, namespace: str = "", selector: str = "") -> str:
    """The API path that lists ``plural`` cluster-wide (``namespace`` empty) or in one namespace."""
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    return f"{path}?labelSelector={selector}" if selector else path


async def listed_keys(
    request: Request, kinds: Iterable[tuple[str, str, str, str]], namespaces: Collection[str]
) -> dict[str, set[str]]:
    """``namespace/name`` of every object of each kind (kind, group/version, plural, label
    selector), cluster-wide or in ``namespaces``. A kind that cannot be listed is not waited for."""
    expected: dict[str, set[str]] = {}
    for kind, group_version, plural, selector in kinds:
        keys: set[str] = set()
        for namespace in namespaces or ("",):
            try:
                code, doc = await request("GET", list_path(group_version, plural, namespace, selector))
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("cannot list %s at start (%s): not waiting for them", plural, exc)
                continue
            if code != 200 or not isinstance(doc, dict):
                log.warning("cannot list %s at start (HTTP %s): not waiting for them", plural, code)
                continue
            for item in doc.get("items") or []:
                meta = item.get("metadata") or {}
                keys.add(f"{meta.get('namespace') or 'default'}/{meta.get('name')}")
        expected[kind] = keys
    return expected


@dataclass
class InitialSync:
    """Which objects the first roll-out waits for, by kind (keys are ``namespace/name``)."""

    expected: Mapping[str, Collection[str]]
    deadline: float  # on ``clock``
    clock: Callable[[], float] = time.monotonic
    released: bool = field(default=False, init=False)

    def missing(self, present: Mapping[str, Collection[str]]) -> dict[str, int]:
        """How many expected objects of each kind the state does not hold yet."""
        out = {}
        for kind, keys in self.expected.items():
            have = set(present.get(kind, ()))
            if n := sum(1 for k in keys if k not in have):
                out[kind] = n
        return out

    def holds(self, present: Mapping[str, Collection[str]]) -> bool:
        """Whether a roll-out must still wait, given what the state now holds."""
        if self.released:
            return False
        missing = self.missing(present)
        if missing and self.clock() < self.deadline:
            return True
        self.released = True
        if missing:
            what = ", ".join(f"{n} {kind}" for kind, n in sorted(missing.items()))
            log.warning("rolling out without %s listed at start and not delivered since (deleted meanwhile?)", what)
        return False
