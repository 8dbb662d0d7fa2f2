"""Typed models of WorkflowSpec and WorkflowRun, parsed from plain manifests at the edge.

This is the single source for what the controller reads: every field that the parser reads is a
dataclass field here, named in the manifest by its ``json`` metadata (camelCase of the field name
by default), and ``tests/unit/test_workflow_spec.py`` walks these classes against the CRD schemas
in ``deploy/crds`` so the two cannot drift apart.

``parse_workflow`` and ``parse_run`` raise ``SpecError``; a problem inside a step names the step.
Shape only: expressions, cycles and bindings are checked when the spec is accepted
(``controller.workflow.accept``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from controller.models import SecretRef, SpecError, parse_duration

STEP_TYPES = ("ai-inference", "http-request", "transform", "container")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
MAX_STEPS = 100
MAX_KEEP_FINISHED = 10_000  # finished runs of one spec and tenant kept in memory (file mode) or the API server
# scheme://host[:port] with no template in it, then the path (which may hold templates).
_ORIGIN = re.compile(r"^(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?(?=/|$)")


def _json(name: str | None) -> dict[str, Any]:
    """Field metadata: the manifest's name for the field (None: not read from the spec)."""
    return {"json": name}


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    limit: int = 0  # retries after the first attempt
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str  # a template


@dataclass(frozen=True, slots=True)
class AiInference:
    binding: str = ""
    model: str = ""
    messages: tuple[Message, ...] = ()
    prompt: str = ""  # a template, sent as one user message
    output_schema: dict[str, Any] | None = None
    max_tokens: int | None = None
    # "shared": the run's AI steps share one x-session-id; "none": this step sends none.
    session: str = "shared"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str  # a template; its scheme, host and port are fixed text (the egress listener names them)
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()  # values are templates
    body: str | None = None  # a template

    @property
    def origin(self) -> tuple[str, str, int]:
        """(scheme, host, port) of the target, from the URL's fixed prefix."""
        m = _ORIGIN.match(self.url)
        assert m is not None, "checked by the parser"
        scheme, host = m.group(1).lower(), m.group(2).lower()
        port = int(m.group(3)) if m.group(3) else (443 if scheme == "https" else 80)
        return scheme, host, port

    @property
    def path(self) -> str:
        m = _ORIGIN.match(self.url)
        assert m is not None
        return self.url[m.end() :] or "/"


@dataclass(frozen=True, slots=True)
class Transform:
    expression: str


@dataclass(frozen=True, slots=True)
class EnvVar:
    name: str
    value: str = ""


@dataclass(frozen=True, slots=True)
class Container:
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    type: str
    depends_on: tuple[str, ...] = ()
    when: str = ""
    inputs: tuple[tuple[str, str], ...] = ()  # name -> template
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = None  # seconds, per attempt
    on_failure: str = "fail"  # fail | continue
    # A dependency that was Skipped skips this step too ("skip") or not ("run").
    on_dependency_skipped: str = "skip"
    ai_inference: AiInference | None = None
    http_request: HttpRequest | None = None
    transform: Transform | None = None
    container: Container | None = None


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    namespace: str = field(metadata=_json(None))
    name: str = field(metadata=_json(None))
    generation: int = field(default=1, metadata=_json(None))
    steps: tuple[StepSpec, ...] = ()
    # Run when the steps are done, whatever their outcome (exit handlers); ``run.phase`` tells.
    exit_steps: tuple[StepSpec, ...] = ()
    parallelism: int = 0  # steps of one run in flight at once; 0 = no limit
    timeout: float | None = None  # the whole run, seconds
    # Finished runs of this spec, all of them (also those created as resources), are removed this
    # many seconds after they ended / beyond the newest this many per tenant. None: the
    # controller's defaults, which apply to runs started over HTTP only (``retention``).
    ttl_after_finished: float | None = None
    keep_finished_runs: int | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def step(self, name: str) -> StepSpec:
        for s in (*self.steps, *self.exit_steps):
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class WorkflowRef:
    name: str


@dataclass(frozen=True, slots=True)
class RunSpec:
    namespace: str = field(metadata=_json(None))
    name: str = field(metadata=_json(None))
    workflow_ref: WorkflowRef = field(default_factory=lambda: WorkflowRef(""))
    inputs: dict[str, Any] = field(default_factory=dict)
    # The API key the run's calls use (so the tenant they are charged to); required for a run
    # started from a resource, absent for one started over HTTP (the caller's tenant decides).
    api_key_secret_ref: SecretRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def json_name(f: dataclasses.Field[Any]) -> str | None:
    """The manifest's name of a model field (camelCase unless its metadata says otherwise)."""
    if "json" in f.metadata:
        name: str | None = f.metadata["json"]
        return name
    head, *rest = f.name.split("_")
    return head + "".join(p.capitalize() for p in rest)


# --- parsing -----------------------------------------------------------------------------------


def _obj(raw: object, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError("InvalidSpec", f"{what}: must be an object")
    return raw


def _arr(raw: object, what: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError("InvalidSpec", f"{what}: must be a list")
    return raw


def _str(raw: object, what: str, *, required: bool = False) -> str:
    if raw is None and not required:
        return ""
    if not isinstance(raw, str) or (required and not raw):
        raise SpecError("InvalidSpec", f"{what}: must be a non-empty string")
    return raw


def _int(raw: object, what: str, lo: int, hi: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise SpecError("InvalidSpec", f"{what}: must be an integer from {lo} to {hi}, got {raw!r}")
    return raw


def _one_of(raw: object, what: str, allowed: tuple[str, ...], default: str) -> str:
    value = default if raw is None else raw
    if value not in allowed:
        raise SpecError("InvalidSpec", f"{what}: must be one of {', '.join(allowed)}, got {raw!r}")
    return str(value)


def _retry(raw: object, what: str) -> RetryPolicy:
    r = _obj(raw, what)
    b = _obj(r.get("backoff"), f"{what}.backoff")
    factor = b.get("factor", 2)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1:
        raise SpecError("InvalidSpec", f"{what}.backoff.factor: must be a number >= 1")
    backoff = Backoff(
        initial=parse_duration(b.get("initial", "1s"), f"{what}.backoff.initial"),
        factor=float(factor),
        max=parse_duration(b.get("max", "60s"), f"{what}.backoff.max"),
    )
    return RetryPolicy(limit=_int(r.get("limit", 0), f"{what}.limit", 0, 10), backoff=backoff)


def _ai(raw: object, what: str) -> AiInference:
    a = _obj(raw, what)
    binding, model = _str(a.get("binding"), f"{what}.binding"), _str(a.get("model"), f"{what}.model")
    if bool(binding) == bool(model):
        raise SpecError("InvalidSpec", f"{what}: give exactly one of binding or model")
    if binding and not _NAME.fullmatch(binding):
        raise SpecError("InvalidSpec", f"{what}.binding: {binding!r} is not a resource name")
    if model and not _MODEL.fullmatch(model):
        raise SpecError("InvalidSpec", f"{what}.model: {model!r} is not a model name")
    messages = []
    for i, m in enumerate(_arr(a.get("messages"), f"{what}.messages")):
        m = _obj(m, f"{what}.messages[{i}]")
        role = _one_of(m.get("role"), f"{what}.messages[{i}].role", ("system", "user", "assistant"), "")
        messages.append(Message(role, _str(m.get("content"), f"{what}.messages[{i}].content", required=True)))
    prompt = _str(a.get("prompt"), f"{what}.prompt")
    if bool(messages) == bool(prompt):
        raise SpecError("InvalidSpec", f"{what}: give exactly one of messages or prompt")
    schema = a.get("outputSchema")
    if schema is not None and not isinstance(schema, dict):
        raise SpecError("InvalidSpec", f"{what}.outputSchema: must be a JSON Schema object")
    max_tokens = a.get("maxTokens")
    return AiInference(
        binding=binding,
        model=model,
        messages=tuple(messages),
        prompt=prompt,
        output_schema=schema,
        max_tokens=None if max_tokens is None else _int(max_tokens, f"{what}.maxTokens", 1, 1_000_000),
        session=_one_of(a.get("session"), f"{what}.session", ("shared", "none"), "shared"),
    )


def _http(raw: object, what: str) -> HttpRequest:
    h = _obj(raw, what)
    headers = []
    for k, v in sorted(_obj(h.get("headers"), f"{what}.headers").items()):
        if not _HEADER.fullmatch(str(k)) or not isinstance(v, str):
            raise SpecError("InvalidSpec", f"{what}.headers: {k!r} must be a header name with a string value")
        headers.append((str(k).lower(), v))
    body = h.get("body")
    url = _str(h.get("url"), f"{what}.url", required=True)
    if not _ORIGIN.match(url):
        raise SpecError(
            "InvalidURL",
            f"{what}.url: must start with http:// or https:// and a fixed host (templates only after it): "
            "the egress listener reaches only the hosts the specs name",
        )
    return HttpRequest(
        url=url,
        method=_one_of(h.get("method"), f"{what}.method", HTTP_METHODS, "GET"),
        headers=tuple(headers),
        body=None if body is None else _str(body, f"{what}.body"),
    )


def _container(raw: object, what: str) -> Container:
    c = _obj(raw, what)
    env = []
    for i, e in enumerate(_arr(c.get("env"), f"{what}.env")):
        e = _obj(e, f"{what}.env[{i}]")
        env.append(EnvVar(_str(e.get("name"), f"{what}.env[{i}].name", required=True), _str(e.get("value"), f"{what}.env[{i}].value")))
    return Container(
        image=_str(c.get("image"), f"{what}.image", required=True),
        command=tuple(_str(x, f"{what}.command", required=True) for x in _arr(c.get("command"), f"{what}.command")),
        args=tuple(str(x) for x in _arr(c.get("args"), f"{what}.args")),
        env=tuple(env),
    )


_BODIES = {"ai-inference": "aiInference", "http-request": "httpRequest", "transform": "transform", "container": "container"}


def parse_step(raw: object, where: str) -> StepSpec:
    s = _obj(raw, where)
    name = s.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 63:
        raise SpecError("InvalidStep", f"{where}.name: {name!r} is not a DNS label (lower-case letters, digits, '-')")
    what = f"step {name!r}"
    try:
        type_ = _one_of(s.get("type"), f"{what}: type", STEP_TYPES, "")
        for t, key in _BODIES.items():
            if (t == type_) != (key in s):
                raise SpecError("InvalidStep", f"{what}: a {type_} step needs {_BODIES[type_]}, and no other step body")
        deps = [_str(d, f"{what}: dependsOn", required=True) for d in _arr(s.get("dependsOn"), f"{what}: dependsOn")]
        inputs = {str(k): v for k, v in _obj(s.get("inputs"), f"{what}: inputs").items()}
        for k, v in inputs.items():
            if not isinstance(v, str):
                raise SpecError("InvalidStep", f"{what}: inputs.{k} must be a template string")
        timeout = s.get("timeout")
        return StepSpec(
            name=name,
            type=type_,
            depends_on=tuple(deps),
            when=_str(s.get("when"), f"{what}: when"),
            inputs=tuple(sorted(inputs.items())),
            retry=_retry(s.get("retry"), f"{what}: retry"),
            timeout=None if timeout is None else parse_duration(timeout, f"{what}: timeout"),
            on_failure=_one_of(s.get("onFailure"), f"{what}: onFailure", ("fail", "continue"), "fail"),
            on_dependency_skipped=_one_of(s.get("onDependencySkipped"), f"{what}: onDependencySkipped", ("skip", "run"), "skip"),
            ai_inference=_ai(s["aiInference"], f"{what}: aiInference") if type_ == "ai-inference" else None,
            http_request=_http(s["httpRequest"], f"{what}: httpRequest") if type_ == "http-request" else None,
            transform=Transform(_str(_obj(s["transform"], what).get("expression"), f"{what}: transform.expression", required=True))
            if type_ == "transform"
            else None,
            container=_container(s["container"], f"{what}: container") if type_ == "container" else None,
        )
    except SpecError as exc:
        if exc.message.startswith(what):
            raise
        raise SpecError(exc.reason, f"{what}: {exc.message}") from exc


def parse_workflow(obj: dict[str, Any]) -> WorkflowSpec:
    """A WorkflowSpec manifest -> ``WorkflowSpec``; shape problems raise ``SpecError``."""
    meta = _obj(obj.get("metadata"), "metadata")
    spec = _obj(obj.get("spec"), "spec")
    steps = tuple(parse_step(s, f"spec.steps[{i}]") for i, s in enumerate(_arr(spec.get("steps"), "spec.steps")))
    exit_steps = tuple(parse_step(s, f"spec.exitSteps[{i}]") for i, s in enumerate(_arr(spec.get("exitSteps"), "spec.exitSteps")))
    if not steps:
        raise SpecError("InvalidSpec", "spec.steps: a workflow needs at least one step")
    if len(steps) + len(exit_steps) > MAX_STEPS:
        raise SpecError("InvalidSpec", f"a workflow has at most {MAX_STEPS} steps")
    seen: set[str] = set()
    for s in (*steps, *exit_steps):
        if s.name in seen:
            raise SpecError("DuplicateStep", f"step {s.name!r}: step names must be unique")
        seen.add(s.name)
    timeout = spec.get("timeout")
    ttl, keep = spec.get("ttlAfterFinished"), spec.get("keepFinishedRuns")
    return WorkflowSpec(
        namespace=str(meta.get("namespace") or "default"),
        name=_str(meta.get("name"), "metadata.name", required=True),
        generation=int(meta.get("generation") or 1),
        steps=steps,
        exit_steps=exit_steps,
        parallelism=_int(spec.get("parallelism", 0), "spec.parallelism", 0, 1000),
        timeout=None if timeout is None else parse_duration(timeout, "spec.timeout"),
        ttl_after_finished=None if ttl is None else parse_duration(ttl, "spec.ttlAfterFinished"),
        keep_finished_runs=None if keep is None else _int(keep, "spec.keepFinishedRuns", 0, MAX_KEEP_FINISHED),
    )


def parse_run(obj: dict[str, Any]) -> RunSpec:
    """A WorkflowRun manifest -> ``RunSpec``."""
    meta = _obj(obj.get("metadata"), "metadata")
    spec = _obj(obj.get("spec"), "spec")
    namespace = str(meta.get("namespace") or "default")
    ref = _obj(spec.get("workflowRef"), "spec.workflowRef")
    inputs = spec.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise SpecError("InvalidSpec", "spec.inputs: must be an object")
    secret = spec.get("apiKeySecretRef")
    secret_ref = None
    if secret is not None:
        s = _obj(secret, "spec.apiKeySecretRef")
        secret_ref = SecretRef(
            name=_str(s.get("name"), "spec.apiKeySecretRef.name", required=True),
            key=_str(s.get("key"), "spec.apiKeySecretRef.key", required=True),
            namespace=namespace,
        )
    return RunSpec(
        namespace=namespace,
        name=_str(meta.get("name"), "metadata.name", required=True),
        workflow_ref=WorkflowRef(_str(ref.get("name"), "spec.workflowRef.name", required=True)),
        inputs=inputs,
        api_key_secret_ref=secret_ref,
    )
