"""Read a folder of Kubernetes manifests (the standalone, cluster-less mode) into typed models.

Every ``*.yaml``/``*.yml``/``*.json`` file may hold several documents. Resources of other API
groups are ignored; a crdgol.io document of an unknown kind or version, a misspelled field and a
file that does not parse are reported (``problems``), never fatal, so one broken file does not
take the rest of the folder down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.mcp_servers import KIND as MCP_SERVER_KIND
from controller.mcp_servers import McpServerSpec, parse_mcp_server
from controller.models import (
    API_VERSION,
    BindingSpec,
    SecretData,
    SpecError,
    kind_problem,
    parse_binding,
    parse_secret,
)


@dataclass(frozen=True, slots=True)
class Manifests:
    bindings: tuple[BindingSpec, ...] = ()
    secrets: tuple[SecretData, ...] = ()
    # Raw documents of the other crdgol kinds (WorkflowSpec, WorkflowRun) for later stages.
    others: tuple[dict[str, Any], ...] = ()
    # Problems by "file" or "namespace/name": what is wrong and why.
    problems: dict[str, SpecError] = field(default_factory=dict)
    mcp_servers: tuple[McpServerSpec, ...] = ()


def yaml_problem(exc: Exception) -> str:
    """What is wrong with a file, without quoting it: the offending line may hold a secret."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"invalid YAML{where}: {exc.problem or exc.context or 'cannot parse'}"
    if isinstance(exc, yaml.YAMLError):
        return "invalid YAML"
    return f"{type(exc).__name__}: {exc}"


def manifest_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())


def load_folder(folder: Path) -> Manifests:
    if not folder.is_dir():
        raise FileNotFoundError(f"manifest folder {folder} does not exist")
    bindings: list[BindingSpec] = []
    secrets: list[SecretData] = []
    others: list[dict[str, Any]] = []
    mcp_servers: list[McpServerSpec] = []
    problems: dict[str, SpecError] = {}
    for path in manifest_files(folder):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            problems[str(path)] = SpecError("InvalidYAML", f"{path}: {yaml_problem(exc)}")
            continue
        for doc in docs:
            if not isinstance(doc, dict):
                problems[str(path)] = SpecError("InvalidYAML", f"{path}: a document is not a mapping")
                continue
            kind, api = doc.get("kind"), doc.get("apiVersion")
            meta = doc.get("metadata") or {}
            ident = f"{meta.get('namespace') or 'default'}/{meta.get('name')}" if isinstance(meta, dict) else str(path)
            unknown = kind_problem(doc)
            if unknown:
                problems[f"{path}: {kind} {ident}"] = SpecError("UnknownKind", unknown)
                continue
            try:
                if kind == "Secret" and api == "v1":
                    secrets.append(parse_secret(doc))
                elif kind == "AIModelBinding" and api == API_VERSION:
                    bindings.append(parse_binding(doc))
                elif kind == MCP_SERVER_KIND and api == API_VERSION:
                    mcp_servers.append(parse_mcp_server(doc))
                elif api == API_VERSION:
                    others.append(doc)
            except SpecError as exc:
                problems[ident] = exc
    return Manifests(tuple(bindings), tuple(secrets), tuple(others), problems, tuple(mcp_servers))
