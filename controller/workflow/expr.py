"""CEL expressions and ``{{ }}`` templates, compiled once when a WorkflowSpec is accepted.

CEL comes from ``common-expression-language`` (Rust's cel-interpreter behind a typed Python
binding): it evaluates about ten times faster than the pure-Python ``cel-python`` on the same
expressions here, with the same answers (see README, "Workflows").

Expressions see these variables:

* ``inputs``: the run's inputs (any JSON)
* ``steps``: by step name, ``{"phase", "outputs"}`` of the steps that have finished
* ``run``: ``{"name", "phase"}``; ``run.phase`` is the steps' outcome once exit steps run
* ``params``: the step's own ``inputs`` mapping, evaluated (in that step's templates only)

A template is text with ``{{ expr }}`` parts. A template that is exactly one ``{{ expr }}`` keeps
the value's JSON type; otherwise each value is written into the text (strings as they are, the
rest as JSON).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import cel

VARIABLES = frozenset({"inputs", "steps", "run", "params"})
_PART = re.compile(r"\{\{(.*?)\}\}", re.S)
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_STEPS_WORD = re.compile(r"\bsteps\b")
# steps.<name> (not a macro call such as steps.exists(...)) or steps["name"]
_STEP_REF = re.compile(r"\bsteps\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()|\[\s*[\"']([^\"']+)[\"']\s*\])")


class ExprError(ValueError):
    """An expression that does not compile, or that failed when it was evaluated."""


@dataclass(frozen=True, slots=True)
class Expr:
    source: str
    program: cel.Program
    steps: frozenset[str]  # the step names it refers to
    variables: frozenset[str] = VARIABLES  # the variables it reads
    # It reads ``steps`` only as ``steps.<name>`` / ``steps["name"]`` with names in ``steps``.
    steps_by_name: bool = False

    def eval(self, activation: dict[str, Any]) -> Any:
        """The value over ``activation``, of which only what it reads is handed to CEL:
        converting a run's whole activation (every finished step's outputs) into CEL values cost
        twenty times the evaluation itself."""
        act = {k: v for k, v in activation.items() if k in self.variables}
        if self.steps_by_name and "steps" in act:
            done = act["steps"]
            act["steps"] = {n: done[n] for n in self.steps if n in done}
        try:
            return self.program.execute(act)
        except Exception as exc:  # the binding raises KeyError, ValueError, TypeError, RuntimeError
            raise ExprError(f"{self.source!r}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no such key {exc.args[0]!r}" if exc.args else "no such key"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def compile_expr(source: str, extra: frozenset[str] = frozenset()) -> Expr:
    """Compile once; raise ``ExprError`` for a syntax error or an unknown variable."""
    try:
        program = cel.compile(source)
    except Exception as exc:
        raise ExprError(f"{source!r} does not compile: {_reason(exc)}") from None
    bound = set(_BOUND.findall(source))
    unknown = sorted(set(program.variables()) - VARIABLES - extra - bound)
    if unknown:
        raise ExprError(
            f"{source!r} refers to {', '.join(unknown)}: expressions see only {', '.join(sorted(VARIABLES))}"
            " (a step whose name has '-' is steps[\"its-name\"])"
        )
    found = _STEP_REF.findall(source)
    refs = frozenset(a or b for a, b in found)
    # Every mention of ``steps`` is one of the static references: only those steps are needed.
    by_name = len(_STEPS_WORD.findall(source)) == len(found)
    return Expr(source, program, refs, frozenset(program.variables()) & VARIABLES, by_name)


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[str | Expr, ...]

    @property
    def steps(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for p in self.parts:
            if isinstance(p, Expr):
                out |= p.steps
        return out

    def render(self, activation: dict[str, Any]) -> Any:
        if len(self.parts) == 1 and isinstance(self.parts[0], Expr):
            return self.parts[0].eval(activation)
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                value = p.eval(activation)
                out.append(value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True))
        return "".join(out)

    def render_text(self, activation: dict[str, Any]) -> str:
        value = self.render(activation)
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)


def compile_template(text: str) -> Template:
    parts: list[str | Expr] = []
    pos = 0
    for m in _PART.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        inner = m.group(1).strip()
        if not inner:
            raise ExprError("an empty {{ }} in a template")
        parts.append(compile_expr(inner))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    if "{{" in "".join(p for p in parts if isinstance(p, str)):
        raise ExprError("a template has '{{' without its closing '}}'")
    return Template(tuple(parts))
