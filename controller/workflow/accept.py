"""Accepting a WorkflowSpec: everything the CRD's schema cannot check, done once.

``accept`` turns a parsed ``WorkflowSpec`` into a ``CompiledWorkflow`` (expressions and templates
compiled, steps in dependency order, each AI step's model resolved) or raises ``SpecError`` whose
message names the step and the problem: a dependency cycle, a dependency that does not exist, an
expression that does not compile or reads a step it does not wait for, a binding or model the
gateway does not serve, a container step where no cluster runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from controller.models import SpecError
from controller.spec_parsing import reserved_address
from controller.workflow.cost import BackendPrice
from controller.workflow.expr import Expr, ExprError, Template, compile_expr, compile_template
from controller.workflow.spec import StepSpec, WorkflowSpec


@dataclass(frozen=True, slots=True)
class CompiledStep:
    spec: StepSpec
    when: Expr | None
    inputs: tuple[tuple[str, Template], ...]
    # Request templates, by what they fill: ai "messages" as (role, template) pairs; http "url",
    # "body" and each header; transform "expression".
    messages: tuple[tuple[str, Template], ...] = ()
    url: Template | None = None
    body: Template | None = None
    headers: tuple[tuple[str, Template], ...] = ()
    expression: Expr | None = None
    model: str = ""  # the model an ai-inference step calls
    output_validator: Any = None  # a jsonschema validator of outputSchema, built once
    prices: tuple[BackendPrice, ...] = ()  # its model's backends' prices (the step's cost)
    # container: args and env values are templates too
    args: tuple[Template, ...] = ()
    env: tuple[tuple[str, Template], ...] = ()


@dataclass(frozen=True, slots=True)
class CompiledWorkflow:
    spec: WorkflowSpec
    steps: tuple[CompiledStep, ...]  # dependency order
    exit_steps: tuple[CompiledStep, ...]

    @property
    def key(self) -> str:
        return self.spec.key

    def all_steps(self) -> tuple[CompiledStep, ...]:
        return (*self.steps, *self.exit_steps)

    def step(self, name: str) -> CompiledStep:
        for c in self.all_steps():
            if c.spec.name == name:
                return c
        raise KeyError(name)


def _order(steps: tuple[StepSpec, ...], group: str) -> tuple[StepSpec, ...]:
    names = {s.name for s in steps}
    for s in steps:
        for d in s.depends_on:
            if d == s.name:
                raise SpecError("DependencyCycle", f"step {s.name!r}: depends on itself")
            if d not in names:
                raise SpecError("UnknownDependency", f"step {s.name!r}: dependsOn names {d!r}, which is not one of the {group}")
    done: list[StepSpec] = []
    placed: set[str] = set()
    left = list(steps)
    while left:
        ready = [s for s in left if all(d in placed for d in s.depends_on)]
        if not ready:
            cycle = sorted(s.name for s in left)
            raise SpecError("DependencyCycle", f"step {cycle[0]!r}: dependsOn forms a cycle among {', '.join(cycle)}")
        for s in ready:
            done.append(s)
            placed.add(s.name)
        left = [s for s in left if s.name not in placed]
    return tuple(done)


def _ancestors(steps: tuple[StepSpec, ...]) -> dict[str, set[str]]:
    by_name = {s.name: s for s in steps}
    out: dict[str, set[str]] = {}
    for s in steps:  # dependency order: parents first
        acc: set[str] = set()
        for d in s.depends_on:
            acc |= {d, *out[d]}
        out[s.name] = acc
    assert set(out) == set(by_name)
    return out


def _compile_step(
    s: StepSpec, visible: set[str], models: Mapping[str, str], served: frozenset[str], file_mode: bool, prices: Mapping[str, tuple[BackendPrice, ...]]
) -> CompiledStep:
    what = f"step {s.name!r}"
    try:
        when = compile_expr(s.when) if s.when else None
        inputs = tuple((k, compile_template(v)) for k, v in s.inputs)
        out = CompiledStep(spec=s, when=when, inputs=inputs)
        if s.ai_inference is not None:
            a = s.ai_inference
            msgs = tuple((m.role, compile_template(m.content)) for m in a.messages) or (("user", compile_template(a.prompt)),)
            if a.binding:
                model = models.get(a.binding)
                if model is None:
                    raise SpecError("BindingNotFound", f"{what}: AIModelBinding {a.binding!r} does not exist or is not served")
            else:
                model = a.model
                if model not in served:
                    raise SpecError("ModelNotServed", f"{what}: no AIModelBinding serves the model {model!r}")
            validator = None
            if a.output_schema is not None:
                cls = jsonschema.validators.validator_for(a.output_schema)
                try:
                    cls.check_schema(a.output_schema)
                except jsonschema.SchemaError as exc:
                    raise SpecError("InvalidOutputSchema", f"{what}: aiInference.outputSchema is not a valid JSON Schema: {exc.message}") from None
                validator = cls(a.output_schema)
            out = CompiledStep(spec=s, when=when, inputs=inputs, messages=msgs, model=model, output_validator=validator, prices=prices.get(model, ()))
        elif s.http_request is not None:
            h = s.http_request
            # The egress listener calls from the gateway pod: not its loopback on a cluster (Envoy's
            # admin, extproc), never a link-local address (cloud metadata: the node's credentials).
            reserved = reserved_address(h.origin[1], loopback=not file_mode)
            if reserved:
                raise SpecError("InvalidURL", f"{what}: httpRequest.url: {reserved}")
            out = CompiledStep(
                spec=s,
                when=when,
                inputs=inputs,
                url=compile_template(h.url),
                body=compile_template(h.body) if h.body is not None else None,
                headers=tuple((k, compile_template(v)) for k, v in h.headers),
            )
        elif s.transform is not None:
            out = CompiledStep(spec=s, when=when, inputs=inputs, expression=compile_expr(s.transform.expression))
        elif s.container is not None:
            if file_mode:
                raise SpecError(
                    "ContainerStepNeedsCluster",
                    f"{what}: container steps run as Kubernetes Jobs; file mode has no cluster to run them on",
                )
            c = s.container
            out = CompiledStep(
                spec=s,
                when=when,
                inputs=inputs,
                args=tuple(compile_template(a) for a in c.args),
                env=tuple((e.name, compile_template(e.value)) for e in c.env),
            )
    except ExprError as exc:
        raise SpecError("InvalidExpression", f"{what}: {exc}") from None
    refs: set[str] = set(when.steps if when else ())
    for _, t in (*out.inputs, *out.messages, *out.headers, *out.env):
        refs |= t.steps
    for t in out.args:
        refs |= t.steps
    for maybe in (out.url, out.body):
        if maybe is not None:
            refs |= maybe.steps
    if out.expression is not None:
        refs |= out.expression.steps
    hidden = sorted(refs - visible)
    if hidden:
        raise SpecError(
            "InvalidExpression",
            f"{what}: reads steps.{hidden[0]}, which it does not depend on (add it to dependsOn, directly or through another step)",
        )
    return out


def accept(
    spec: WorkflowSpec,
    models: Mapping[str, str],
    *,
    file_mode: bool = False,
    prices: Mapping[str, tuple[BackendPrice, ...]] | None = None,
) -> CompiledWorkflow:
    """Compile ``spec`` against the served bindings (``models``: binding name in the spec's
    namespace -> its model; every served model name is a value; ``prices``: served model -> its
    backends' prices, ``controller.workflow.cost.prices_by_model``)."""
    served = frozenset(models.values())
    priced = prices or {}
    steps = _order(spec.steps, "steps")
    exits = _order(spec.exit_steps, "exit steps")
    anc = _ancestors(steps)
    exit_anc = _ancestors(exits)
    main_names = {s.name for s in steps}
    compiled = tuple(_compile_step(s, anc[s.name], models, served, file_mode, priced) for s in steps)
    # Exit steps run after every step has finished: they may read any of them.
    compiled_exits = tuple(_compile_step(s, exit_anc[s.name] | main_names, models, served, file_mode, priced) for s in exits)
    return CompiledWorkflow(spec=spec, steps=compiled, exit_steps=compiled_exits)
