"""Deterministic answers for the mock upstream: a pattern on the last user message -> a reply.

Rules come from ``MockRules`` documents (``apiVersion: mock.crdgol.io/v1``) in a folder of YAML
files (``crdgol mock-llm --rules-from DIR``; the crdgol controller ignores this kind, so they can
sit beside the manifests they serve). Each rule has ``match`` (a Python regular expression,
searched in the last user message) and ``reply`` (text) or ``replyJson`` (any JSON, sent as its
compact text). The first rule that matches answers; with none, the mock's usual echo answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KIND = "MockRules"
API_VERSION = "mock.crdgol.io/v1"


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: re.Pattern[str]
    reply: str


def parse_rules(docs: list[Any]) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("apiVersion") != API_VERSION:
            continue
        for i, raw in enumerate(doc.get("rules") or []):
            if not isinstance(raw, dict) or not isinstance(raw.get("match"), str):
                raise ValueError(f"rules[{i}]: needs match (a regular expression)")
            if "replyJson" in raw:
                reply = json.dumps(raw["replyJson"], separators=(",", ":"))
            elif isinstance(raw.get("reply"), str):
                reply = raw["reply"]
            else:
                raise ValueError(f"rules[{i}]: needs reply (text) or replyJson")
            try:
                rules.append(Rule(re.compile(raw["match"]), reply))
            except re.error as exc:
                raise ValueError(f"rules[{i}].match: {exc}") from exc
    return tuple(rules)


def load_rules(folder: Path) -> tuple[Rule, ...]:
    """Every MockRules document under ``folder``, in file-name order."""
    docs: list[Any] = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            docs += list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue  # not ours to judge: the controller reports broken manifests
    return parse_rules(docs)


def last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return " ".join(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def answer(rules: tuple[Rule, ...], messages: Any) -> str | None:
    if not rules:
        return None
    text = last_user_text(messages)
    for r in rules:
        if r.pattern.search(text):
            return r.reply
    return None
