"""File mode: a folder of manifests is the cluster.

The folder is polled (every ``interval`` seconds, by file names, sizes and mtimes, so it works
on any filesystem and in containers). A file that stops parsing keeps contributing what it held
when it last parsed, and the problem is reported on stderr and in the status file; a resource
that stops validating keeps its last good spec (see ``controller.state``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.manifests import manifest_files, yaml_problem
from controller.models import API_VERSION, kind_problem

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int], ...]


@dataclass
class FolderReader:
    folder: Path
    _cache: dict[Path, list[dict[str, Any]]] = field(default_factory=dict)
    _signature: Signature = ()
    problems: dict[str, str] = field(default_factory=dict)

    def signature(self) -> Signature:
        out = []
        for p in manifest_files(self.folder):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def changed(self) -> bool:
        return self.signature() != self._signature

    def read(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(bindings, secrets, other crdgol objects) from the folder, last good per broken file."""
        self._signature = self.signature()
        files = [Path(p) for p, _, _ in self._signature]
        problems: dict[str, str] = {}
        for path in files:
            try:
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
                if not all(isinstance(d, dict) for d in docs):
                    raise ValueError("every document must be a mapping")
                self._cache[path] = docs
            except (yaml.YAMLError, ValueError, UnicodeDecodeError, OSError) as exc:
                kept = " (keeping what it held before)" if path in self._cache else ""
                problems[str(path)] = f"{yaml_problem(exc)}{kept}"
        for gone in set(self._cache) - set(files):
            del self._cache[gone]
        for path, docs in self._cache.items():
            for doc in docs:
                unknown = kind_problem(doc)
                if unknown:
                    meta = doc.get("metadata")
                    name = meta.get("name") if isinstance(meta, dict) else None
                    problems[f"{path}: {doc.get('kind')} {name}"] = f"{unknown} (ignored)"
        for where, what in problems.items():
            if self.problems.get(where) != what:
                log.error("%s: %s", where, what)
        self.problems = problems
        bindings, secrets, others = [], [], []
        for path in sorted(self._cache):
            for doc in self._cache[path]:
                kind, api = doc.get("kind"), doc.get("apiVersion")
                if kind == "Secret" and api == "v1":
                    secrets.append(doc)
                elif kind == "AIModelBinding" and api == API_VERSION:
                    bindings.append(doc)
                elif api == API_VERSION and not kind_problem(doc):
                    others.append(doc)
        return bindings, secrets, others
