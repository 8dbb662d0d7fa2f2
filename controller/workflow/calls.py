"""Carrying out one step attempt: the calls a ``Call`` action asks for, through Envoy.

* ai-inference: ``POST /v1/chat/completions`` on the gateway listener, as an ordinary client with
  the run's API key, the run's session id (unless the step opts out) and an ``Idempotency-Key``.
* http-request: to the egress listener, naming the target in ``Host`` and the step in
  ``STEP_HEADER``; Envoy reaches only hosts the specs name.

Each returns the event the engine takes: ``StepSucceeded`` or ``StepFailed`` (final for a 4xx
other than 408/409/425/429 and for an egress refusal; ``retry_after`` from a 429's Retry-After).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jsonschema

from controller.workflow.accept import CompiledStep
from controller.workflow.cost import cost_micros
from controller.workflow.engine import Call, StepFailed, StepSucceeded
from crdgol.request_path import SESSION_HEADER
from crdgol.workflow_contract import IDEMPOTENCY_HEADER, STEP_HEADER

_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
# The most of an answer a step reads: its output goes into the run's status (on a cluster a
# resource, which the API server caps at about 1.5 MiB), and one controller serves every
# namespace, so a target that answers without end must not fill its memory.
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CallTarget:
    gateway: str  # base URL of the gateway listener, e.g. http://127.0.0.1:8080
    egress: str  # base URL of the egress listener


@dataclass(frozen=True, slots=True)
class CallContext:
    run_key: str  # namespace/name
    workflow_key: str
    api_key: str  # never logged, never recorded
    session: str
    traceparent: str = ""  # the attempt's span (tracing on): the gateway's spans become its children


def idempotency_key(run_key: str, step: str, attempt: int) -> str:
    return f"{run_key}/{step}/{attempt}"


def _error_message(status: int, text: str) -> str:
    try:
        detail = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = text[:200]
    return f"answered {status}: {detail}"


def _retry_after(headers: Any) -> float | None:
    raw = headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _failure(call: Call, status: int, text: str, headers: Any, who: str) -> StepFailed:
    final = 400 <= status < 500 and status not in _RETRYABLE_4XX
    return StepFailed(call.step, call.attempt, f"{who} {_error_message(status, text)}", time.time(), final=final, retry_after=_retry_after(headers) if status == 429 else None)


class _TooLarge(Exception):
    pass


async def _text(r: aiohttp.ClientResponse) -> str:
    """The answer's text, read no further than ``MAX_ANSWER_BYTES``; ``_TooLarge`` beyond."""
    if r.content_length is not None and r.content_length > MAX_ANSWER_BYTES:
        raise _TooLarge()
    body = bytearray()
    async for chunk in r.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise _TooLarge()
    return body.decode(r.charset or "utf-8", errors="replace")


def _too_large(call: Call, who: str) -> StepFailed:
    return StepFailed(call.step, call.attempt, f"{who} answered more than {MAX_ANSWER_BYTES} bytes", time.time(), final=True)


async def call_ai(http: aiohttp.ClientSession, target: CallTarget, ctx: CallContext, step: CompiledStep, call: Call) -> StepSucceeded | StepFailed:
    spec = step.spec
    assert spec.ai_inference is not None
    headers = {
        "authorization": f"Bearer {ctx.api_key}",
        "content-type": "application/json",
        IDEMPOTENCY_HEADER: idempotency_key(ctx.run_key, call.step, call.attempt),
    }
    if spec.ai_inference.session == "shared":
        headers[SESSION_HEADER] = ctx.session
    if ctx.traceparent:
        headers["traceparent"] = ctx.traceparent
    async with http.post(f"{target.gateway}/v1/chat/completions", json=call.request, headers=headers) as r:
        try:
            text = await _text(r)
        except _TooLarge:
            return _too_large(call, "the gateway")
        if r.status != 200:
            return _failure(call, r.status, text, r.headers, "the gateway")
    body = json.loads(text)
    reply = str(body["choices"][0]["message"].get("content") or "")
    usage = body.get("usage") or {}
    tokens = {"input": int(usage.get("prompt_tokens", 0)), "output": int(usage.get("completion_tokens", 0)), "total": int(usage.get("total_tokens", 0))}
    cost = cost_micros(step.prices, str(body.get("model") or ""), tokens["input"], tokens["output"])
    parsed: Any = None
    if step.output_validator is not None:
        try:
            parsed = json.loads(_strip_fence(reply))
        except ValueError:
            return StepFailed(call.step, call.attempt, "the reply does not match outputSchema: the reply is not JSON", time.time())
        error = jsonschema.exceptions.best_match(step.output_validator.iter_errors(parsed))
        if error is not None:
            return StepFailed(call.step, call.attempt, f"the reply does not match outputSchema: {error.message}", time.time())
    else:
        try:
            parsed = json.loads(reply)
        except ValueError:
            parsed = None
    return StepSucceeded(call.step, call.attempt, {"text": reply, "json": parsed, "usage": tokens}, time.time(), tokens=tokens, cost_micros=cost)


def _strip_fence(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t


async def call_http(http: aiohttp.ClientSession, target: CallTarget, ctx: CallContext, step: CompiledStep, call: Call) -> StepSucceeded | StepFailed:
    h = step.spec.http_request
    assert h is not None
    req = call.request
    scheme, host, port = h.origin
    prefix = f"{scheme}://"
    rest = str(req["url"])[len(prefix) :]
    path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    headers = {
        **req["headers"],
        "host": host if port == (443 if scheme == "https" else 80) else f"{host}:{port}",
        STEP_HEADER: f"{ctx.workflow_key}/{call.step}",
        IDEMPOTENCY_HEADER: idempotency_key(ctx.run_key, call.step, call.attempt),
    }
    body = req["body"].encode() if req["body"] is not None else None
    async with http.request(req["method"], f"{target.egress}{path}", data=body, headers=headers, allow_redirects=False) as r:
        try:
            text = await _text(r)
        except _TooLarge:
            return _too_large(call, host)
        if r.status >= 400:
            who = "the egress listener" if r.status == 403 and '"egress_not_allowed"' in text else f"{host}"
            return _failure(call, r.status, text, r.headers, who)
        out_headers = {k.lower(): v for k, v in r.headers.items()}
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return StepSucceeded(call.step, call.attempt, {"status": r.status, "headers": out_headers, "body": parsed}, time.time())
