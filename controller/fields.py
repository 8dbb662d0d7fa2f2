"""Which fields a resource may have, and what to say about one it may not.

The known fields of an AIModelBinding come from its CRD (``deploy/crds/aimodelbindings.yaml``):
``python -m controller.fields`` regenerates ``controller/binding_fields.py`` from it, and a unit
test fails when the two differ, so the parser, the CRD and this check cannot drift apart. The API
server prunes unknown fields on a cluster (and ``kubectl`` refuses them with strict field
validation); file mode has no API server, so ``parse_binding`` calls ``unknown_fields`` itself and
refuses a misspelled field with its path and the nearest valid name, instead of silently applying
no limit.

A tree is ``None`` (a value, or an object whose contents are free, such as an inline JWKS), or a
dict of field name -> tree; the key ``"*"`` stands for any name (a map, such as quotas per tenant).
Lists are transparent: each item is checked against the tree of the list's field.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Tree = dict[str, "Tree | None"] | None

ANY = "*"

# Names people (and other gateways' docs) reach for that difflib would not match.
_ALIASES = {
    "ratelimits": "quotas",
    "ratelimit": "quotas",
    "rate_limits": "quotas",
    "limits": "quotas",
    "quota": "quotas",
    "budgets": "quotas",
    "systemmessage": "systemPrompt",
    "system": "systemPrompt",
    "prompt": "systemPrompt",
    "url": "endpoint",
    "baseurl": "endpoint",
    "apikeyref": "credentialsRef",
    "secretref": "credentialsRef",
    "timeout": "timeouts",
    "retries": "retry",
    "allowedtenants": "tenants",
}


def nearest(name: str, known: list[str]) -> str | None:
    """The valid name ``name`` most likely meant, if any is close."""
    alias = _ALIASES.get(name.lower().replace("-", ""))
    if alias in known:
        return alias
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


@dataclass(frozen=True, slots=True)
class _Node:
    """A tree compiled for speed: the names it knows, and only the children worth descending."""

    known: frozenset[str]
    nested: tuple[tuple[str, _Node], ...]  # fields whose value is an object or a list
    any: _Node | None  # a map's values
    free: bool  # any names allowed (a map)


_COMPILED: dict[int, tuple[Tree, _Node]] = {}


def _compile(tree: dict[str, Tree]) -> _Node:
    hit = _COMPILED.get(id(tree))
    if hit is not None and hit[0] is tree:
        return hit[1]
    sub_any = tree.get(ANY)
    node = _Node(
        known=frozenset(k for k in tree if k != ANY),
        nested=tuple((k, _compile(v)) for k, v in tree.items() if k != ANY and v is not None),
        any=_compile(sub_any) if sub_any is not None else None,
        free=ANY in tree,
    )
    _COMPILED[id(tree)] = (tree, node)
    return node


def unknown_fields(doc: object, tree: Tree, path: str) -> list[str]:
    """One message per field of ``doc`` that ``tree`` does not know, with its path.

    Runs on every binding the controller parses (5,000 on a restart), so the common case — every
    field known — is a set comparison per object and builds no strings.
    """
    out: list[str] = []
    if tree is not None:
        _walk(doc, _compile(tree), path, out)
    return out


def _walk(doc: object, node: _Node, path: str, out: list[str]) -> None:
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            if _worth(item, node):
                _walk(item, node, f"{path}[{i}]", out)
        return
    if not isinstance(doc, dict):
        return
    if not node.free and not doc.keys() <= node.known:
        for key in doc:
            # YAML 1.1 (PyYAML, kubectl) reads an unquoted `on:` key as true; the parser accepts it.
            name = "on" if key is True else str(key)
            if name not in node.known:
                known = sorted(node.known)
                guess = nearest(name, known)
                hint = f"; did you mean {guess}?" if guess else f"; known fields here: {', '.join(known)}"
                out.append(f"{path}.{name}: unknown field{hint}" if path else f"{name}: unknown field{hint}")
    for name, child in node.nested:
        value = doc.get(name)
        if value is not None and _worth(value, child):
            _walk(value, child, f"{path}.{name}" if path else name, out)
    if node.any is not None:
        for key, value in doc.items():
            if _worth(value, node.any):
                _walk(value, node.any, f"{path}.{key}" if path else str(key), out)


def _worth(value: object, node: _Node) -> bool:
    """Whether ``value`` needs a closer look: a list, or an object with unknown or nested fields."""
    if isinstance(value, dict):
        return bool(node.nested) or node.any is not None or (not node.free and not value.keys() <= node.known)
    return isinstance(value, list)


# --- generation from the CRD ------------------------------------------------------------------


def tree_of(schema: dict[str, Any]) -> Tree:
    """The field tree of an OpenAPI v3 (structural) schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return None
    if schema.get("type") == "array":
        return tree_of(schema.get("items") or {})
    if "properties" in schema:
        return {name: tree_of(sub) for name, sub in schema["properties"].items()}
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        return {ANY: tree_of(extra)}
    return None


def crd_spec_tree(crd: dict[str, Any]) -> Tree:
    (version,) = crd["spec"]["versions"]
    return tree_of(version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def _literal(tree: Tree, indent: int = 0) -> str:
    if tree is None:
        return "None"
    pad = "    " * (indent + 1)
    items = "".join(f"{pad}{json.dumps(name)}: {_literal(sub, indent + 1)},\n" for name, sub in tree.items())
    return "{\n" + items + "    " * indent + "}"


def module_text(tree: Tree) -> str:
    return (
        '"""Generated from deploy/crds/aimodelbindings.yaml by ``python -m controller.fields``: do not edit."""\n\n'
        "from __future__ import annotations\n\n"
        "from controller.fields import Tree\n\n"
        f"BINDING_SPEC: Tree = {_literal(tree)}\n"
    )


def binding_problems(obj: dict[str, Any]) -> list[str]:
    """Unknown fields of an AIModelBinding object (``metadata`` and ``status`` are not checked)."""
    from controller.binding_fields import BINDING_SPEC

    top: Tree = {"apiVersion": None, "kind": None, "metadata": None, "spec": BINDING_SPEC, "status": None}
    return unknown_fields(obj, top, "")


def main() -> int:
    import yaml

    root = Path(__file__).resolve().parent.parent
    crd = yaml.safe_load((root / "deploy" / "crds" / "aimodelbindings.yaml").read_text())
    (root / "controller" / "binding_fields.py").write_text(module_text(crd_spec_tree(crd)))
    print("wrote controller/binding_fields.py", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
