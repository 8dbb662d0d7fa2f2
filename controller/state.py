"""The controller's desired state: resources in, a versioned render out, status per binding.

Both front ends feed it — the kopf operator (from the Kubernetes API) and file mode (from a
folder) — so validation and status are the same in both. Rules:

* a binding whose new spec does not parse keeps serving its last good spec, and its status says
  why the new one was refused (``Accepted=False``);
* a binding that parses but cannot be served (a missing Secret, a model another binding owns) is
  not served, and its status says so (``Ready=False``);
* every change that alters the render bumps the version by one; an unchanged render does not, so
  versions are monotonic and Envoy/extproc only see real changes. They start from the wall clock
  (milliseconds), so they keep rising across controller restarts.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from controller.health import BackendHealth
from controller.mcp_status import McpServerBook
from controller.models import BindingSpec, SecretData, SpecError, parse_binding, parse_secret
from controller.render import EnvoyExtras, RenderCache, RenderResult, RenderSettings, render

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str

    def to_k8s(self, generation: int, now: str) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": generation,
            "lastTransitionTime": now,
        }


@dataclass(frozen=True, slots=True)
class BindingStatus:
    key: str
    observed_generation: int
    conditions: tuple[Condition, ...]
    model: str = ""
    backends: int = 0
    # Backend name -> "healthy" | "ejected" | "failed_check" | ..., as Envoy last reported it.
    health: tuple[tuple[str, str], ...] = ()
    # status.usage (controller.binding_usage), as items; () when nothing was reported.
    usage: tuple[tuple[str, Any], ...] = ()

    @property
    def ready(self) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in self.conditions)

    def to_k8s(self, now: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "observedGeneration": self.observed_generation,
            "model": self.model,
            "backends": self.backends,
            "conditions": [c.to_k8s(self.observed_generation, now) for c in self.conditions],
        }
        if self.health:
            doc["backendHealth"] = dict(self.health)
        if self.usage:
            doc["usage"] = dict(self.usage)
        return doc


@dataclass
class _Entry:
    generation: int
    good: BindingSpec | None  # last spec that parsed
    refused: SpecError | None = None  # why the newest spec was refused, if it was
    # The object as last seen, so an unchanged one is not parsed again.
    source: dict[str, Any] | None = None


@dataclass
class ControllerState:
    settings: RenderSettings
    publish: Callable[[RenderResult], None] = lambda _r: None
    clock: Callable[[], float] = time.time
    version: int = 0
    result: RenderResult | None = None
    _bindings: dict[str, _Entry] = field(default_factory=dict)
    _secrets: dict[str, SecretData] = field(default_factory=dict)
    _unusable_secrets: set[str] = field(default_factory=set)  # delivered, but refused by parse_secret
    _cache: RenderCache = field(default_factory=RenderCache)
    # Envoy resources the workflow engine adds (egress listener, run API route).
    extras: EnvoyExtras = field(default_factory=EnvoyExtras)
    # Envoy's verdict per backend cluster (admin /clusters), when the controller can read it.
    backend_health: dict[str, BackendHealth] = field(default_factory=dict)
    # Each binding's status.usage from the extproc replicas' reports (controller.binding_usage).
    binding_usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    # MCPServers, and their status (controller.mcp_status).
    mcp: McpServerBook = field(default_factory=McpServerBook)

    def __post_init__(self) -> None:
        # Versions must keep rising across controller restarts and leader changes, or extproc (which
        # refuses anything not newer than what it holds) would ignore a restarted controller. So
        # they start from the wall clock in milliseconds and count up by one per change.
        if self.version == 0:
            self.version = int(self.clock() * 1000)

    # --- inputs ---------------------------------------------------------------------------

    def upsert_binding(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        generation = int(meta.get("generation") or 1)
        prev = self._bindings.get(key)
        if prev is not None and prev.source == obj:
            return  # unchanged since it was last parsed
        try:
            spec = parse_binding(obj)
        except SpecError as exc:
            log.warning("refusing AIModelBinding %s generation %d: %s", key, generation, exc.message)
            self._bindings[key] = _Entry(generation, prev.good if prev else None, exc, source=obj)
            return
        self._bindings[key] = _Entry(generation, spec, source=obj)

    def delete_binding(self, namespace: str, name: str) -> None:
        self._bindings.pop(f"{namespace}/{name}", None)

    def upsert_secret(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        try:
            secret = parse_secret(obj)
        except SpecError as exc:
            log.warning("ignoring Secret: %s", exc.message)
            self._unusable_secrets.add(key)  # seen all the same (``held``)
            return
        self._unusable_secrets.discard(key)
        self._secrets[secret.key] = secret

    def held(self) -> dict[str, set[str]]:
        """The keys (``namespace/name``) of the bindings, Secrets and MCPServers the state holds."""
        return {"AIModelBinding": set(self._bindings), "Secret": {*self._secrets, *self._unusable_secrets}, "MCPServer": self.mcp.keys()}

    def delete_secret(self, namespace: str, name: str) -> None:
        self._secrets.pop(f"{namespace}/{name}", None)
        self._unusable_secrets.discard(f"{namespace}/{name}")

    def secrets_in(self, namespace: str) -> list[SecretData]:
        """The Secrets of ``namespace`` the state holds (API-key labelled or named by a binding)."""
        return [s for s in self._secrets.values() if s.namespace == namespace]

    def replace_all(self, bindings: list[dict[str, Any]], secrets: list[dict[str, Any]]) -> None:
        """Make the state exactly these resources (file mode: the folder is the whole truth)."""
        enabled = gc.isenabled()
        gc.disable()  # thousands of small allocations, nothing to collect (see render)
        try:
            self._replace_all(bindings, secrets)
        finally:
            if enabled:
                gc.enable()

    def _replace_all(self, bindings: list[dict[str, Any]], secrets: list[dict[str, Any]]) -> None:
        keep = set()
        for obj in bindings:
            self.upsert_binding(obj)
            meta = obj.get("metadata") or {}
            keep.add(f"{meta.get('namespace') or 'default'}/{meta.get('name')}")
        for key in set(self._bindings) - keep:
            del self._bindings[key]
        self._secrets = {}
        for obj in secrets:
            self.upsert_secret(obj)

    def references(self, namespace: str, name: str) -> list[str]:
        """Bindings whose spec names the Secret ``namespace/name`` (for status after a rotation)."""
        out = []
        for key, entry in self._bindings.items():
            spec = entry.good
            if spec is None:
                continue
            refs = spec.secret_refs()
            if any(r is not None and r.namespace == namespace and r.name == name for r in refs):
                out.append(key)
        return out + self.mcp.references(namespace, name)

    def watches_secret(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if str(labels.get("crdgol.io/api-key", "")).lower() == "true":
            return True
        return bool(self.references(meta.get("namespace") or "default", str(meta.get("name"))))

    # --- output ---------------------------------------------------------------------------

    def rebuild(self) -> RenderResult:
        """Render the current state; publish it under a new version if it changed."""
        specs = [e.good for e in self._bindings.values() if e.good is not None]
        candidate = self.version + 1
        result = render(
            specs,
            self._secrets.values(),
            replace(self.settings, version=candidate, generated_at=int(self.clock())),
            self._cache,
            self.extras,
            mcp_servers=self.mcp.specs(),
        )
        if self.result is not None and _same(result, self.result):
            return self.result
        self.version = candidate
        self.result = result
        log.info(
            "config version %d: %d bindings served, %d refused",
            self.version,
            len(self.result.accepted),
            len(self.result.problems),
        )
        self.publish(self.result)
        return self.result

    def reserve_version(self) -> int:
        """A new version for an Envoy-only update (no policy change), above every one so far."""
        self.version += 1
        return self.version

    def status(self, key: str) -> BindingStatus | None:
        entry = self._bindings.get(key)
        if entry is None:
            return None
        result = self.result
        conditions: list[Condition] = []
        if entry.refused is not None:
            conditions.append(Condition("Accepted", "False", entry.refused.reason, entry.refused.message))
        else:
            conditions.append(Condition("Accepted", "True", "Valid", "the spec is valid"))
        spec = entry.good
        problem = result.problems.get(key) if result else None
        if spec is None:
            conditions.append(Condition("Ready", "False", "NoValidSpec", "no valid spec has been seen yet"))
        elif problem is not None:
            conditions.append(Condition("Ready", "False", problem.reason, problem.message))
        elif result is not None and key in result.accepted:
            note = " (an older valid spec; the newest was refused)" if entry.refused else ""
            conditions.append(
                Condition("Ready", "True", "Served", f"model {spec.model!r} is served in config version {result.snapshot.version}{note}")
            )
        else:
            conditions.append(Condition("Ready", "Unknown", "Pending", "not rendered yet"))
        grant = result.grant_problems.get(key) if result is not None and problem is None else None
        if grant is not None:
            conditions.append(Condition("GrantsAccepted", "False", grant.reason, grant.message))
        health = self._health(key)
        if health:
            bad = [f"{name} ({verdict})" for name, verdict in health if verdict != "healthy"]
            conditions.append(
                Condition("BackendsHealthy", "False", "BackendUnhealthy", f"unhealthy: {', '.join(bad)}")
                if bad
                else Condition("BackendsHealthy", "True", "AllHealthy", "every backend is healthy in Envoy")
            )
        return BindingStatus(
            key=key,
            observed_generation=entry.generation,
            conditions=tuple(conditions),
            model=spec.model if spec else "",
            backends=len(spec.backends) if spec else 0,
            health=health,
            usage=tuple(sorted(self.binding_usage.get(key, {}).items())),
        )

    def _health(self, key: str) -> tuple[tuple[str, str], ...]:
        """Each served backend's health as Envoy reports it; () when Envoy has not said."""
        out = []
        for name, cluster in self.result.backend_clusters.get(key, ()) if self.result else ():
            verdict = self.backend_health.get(cluster)
            if verdict is None:
                return ()
            out.append((name, "healthy" if verdict.healthy else verdict.reason))
        return tuple(out)

    def binding_keys(self) -> list[str]:
        """Every binding the state holds (``namespace/name``), sorted."""
        return sorted(self._bindings)

    def statuses(self) -> dict[str, BindingStatus]:
        out = {}
        for key in sorted(self._bindings):
            st = self.status(key)
            if st is not None:
                out[key] = st
        return out


def _same(a: RenderResult, b: RenderResult) -> bool:
    """Whether two renders say the same thing, ignoring their versions and timestamps."""
    if a.listeners != b.listeners or a.clusters != b.clusters:
        return False
    if {k: (p.reason, p.message) for k, p in a.problems.items()} != {k: (p.reason, p.message) for k, p in b.problems.items()}:
        return False
    if {k: p.message for k, p in a.grant_problems.items()} != {k: p.message for k, p in b.grant_problems.items()}:
        return False
    return _unversioned(a) == _unversioned(b)


def _unversioned(result: RenderResult) -> bytes:
    snap = type(result.snapshot)()
    snap.CopyFrom(result.snapshot)
    snap.version, snap.generated_at = 0, 0
    return bytes(snap.SerializeToString(deterministic=True))
