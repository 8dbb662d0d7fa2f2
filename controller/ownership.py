"""Which binding may claim what: model names and JWT issuers, resolved per namespace.

The render offers bindings in a fixed order (by ``namespace/name``); ``Claims.admit`` accepts a
binding or says why it cannot be served. The rules follow ``crdgol.tenancy``:

* **Model names.** Several namespaces may each serve a model of the same name: a caller reaches
  the binding of its own tenant's namespace first, so no other namespace can take a model name
  away from its owner. Refused (``ModelConflict``): a second binding of the model in the same
  namespace, and two bindings in different namespaces that both grant the model to tenants of a
  third namespace (the caller's choice between them would be arbitrary).
* **JWT issuers.** An issuer declared in namespace N makes tokens act as tenants of N only. Each
  namespace has one declaration per issuer; another binding of the same namespace declaring it
  differently is refused (``JwtIssuerConflict``). Other namespaces may declare the same issuer
  with their own keys: that is their own tenants, not a conflict.

* **Grants need the grantee's consent.** A binding that lists another namespace's tenants
  (``other/name``, ``other/*``) reaches them only once ``other`` accepts grants from the
  binding's namespace: an API-key Secret or an AIModelBinding in ``other`` carries
  ``crdgol.io/accept-from: <namespace>`` (or ``*``). Without it the grant is left out (the
  binding still serves everyone else) and the binding's status says which namespace has not
  accepted (``GrantNotAccepted``). Otherwise any namespace could put a model name in front of
  another's callers, and receive their prompts, or take the name from a provider they chose.

A refused binding is not served at all (never "served but not Ready").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.models import ACCEPT_ANNOTATION, BindingSpec, SecretData, SpecError
from crdgol import tenancy
from crdgol.pb import policy_pb2 as pb


@dataclass(frozen=True, slots=True)
class _ModelClaim:
    key: str
    namespace: str
    foreign: frozenset[str]  # namespaces, other than its own, whose tenants it serves


@dataclass
class Claims:
    models: dict[str, list[_ModelClaim]] = field(default_factory=lambda: defaultdict(list))
    # (namespace, issuer) -> (the declaration, the binding that made it first)
    issuers: dict[tuple[str, str], tuple[pb.JwtProvider, str]] = field(default_factory=dict)

    def check(self, b: BindingSpec, jwts: tuple[pb.JwtProvider, ...], foreign: frozenset[str]) -> SpecError | None:
        """Why ``b`` cannot be served next to what was admitted before it, or None.

        ``foreign`` is ``tenancy.foreign_namespaces(b.tenants, b.namespace)`` (the render caches it).
        """
        for other in self.models.get(b.model, ()):
            if other.namespace == b.namespace:
                return SpecError(
                    "ModelConflict",
                    f"model {b.model!r} is already served in namespace {b.namespace} by AIModelBinding {other.key}",
                )
            both = sorted(foreign & other.foreign)
            if both:
                return SpecError(
                    "ModelConflict",
                    f"model {b.model!r} is already offered to tenants of namespace {both[0]} by AIModelBinding "
                    f"{other.key}; a namespace's callers must reach one binding per model",
                )
        for j in jwts:
            seen = self.issuers.get((b.namespace, j.issuer))
            if seen is not None and _unnamed(seen[0]) != _unnamed(j):
                return SpecError(
                    "JwtIssuerConflict",
                    f"issuer {j.issuer!r} is already declared differently in namespace {b.namespace} by "
                    f"AIModelBinding {seen[1]}; declare it the same way (or in one binding) in a namespace",
                )
        return None

    def admit(self, b: BindingSpec, jwts: tuple[pb.JwtProvider, ...], foreign: frozenset[str]) -> None:
        self.models[b.model].append(_ModelClaim(b.key, b.namespace, foreign))
        for j in jwts:
            self.issuers.setdefault((b.namespace, j.issuer), (j, b.key))

    def providers(self) -> list[pb.JwtProvider]:
        """Every admitted declaration, one per (issuer, namespace), in a stable order."""
        return [self.issuers[k][0] for k in sorted(self.issuers, key=lambda k: (k[1], k[0]))]


def _unnamed(j: pb.JwtProvider) -> bytes:
    """A declaration without its display name: two bindings naming it differently agree."""
    copy = pb.JwtProvider()
    copy.CopyFrom(j)
    copy.name = ""
    return bytes(copy.SerializeToString(deterministic=True))


def acceptances(bindings: Iterable[BindingSpec], secrets: Iterable[SecretData]) -> dict[str, frozenset[str]]:
    """Namespace -> the namespaces whose grants it accepts (``*``: all), from its API-key Secrets
    and AIModelBindings (any of them may say it: each is its owner's word)."""
    out: dict[str, set[str]] = defaultdict(set)
    for b in bindings:
        out[b.namespace] |= b.accept_from
    for sec in secrets:
        if sec.is_api_key:
            out[sec.namespace] |= sec.accept_from
    return {ns: frozenset(v) for ns, v in out.items()}


def unaccepted(b: BindingSpec, foreign: frozenset[str], accepts: dict[str, frozenset[str]]) -> frozenset[str]:
    """The namespaces ``b`` grants tenants of that have not accepted grants from ``b``'s namespace."""
    return frozenset(ns for ns in foreign if not ({b.namespace, tenancy.WILDCARD} & accepts.get(ns, frozenset())))


def grant_not_accepted(b: BindingSpec, refused: frozenset[str]) -> SpecError:
    """The status a person acts on: who must accept, and how."""
    names = ", ".join(sorted(refused))
    return SpecError(
        "GrantNotAccepted",
        f"the grant to tenants of namespace {names} is not in force: that namespace has not accepted grants "
        f"from namespace {b.namespace}; an API-key Secret or AIModelBinding there may be annotated "
        f"{ACCEPT_ANNOTATION}: {b.namespace} (everyone else this binding lists is served)",
    )
