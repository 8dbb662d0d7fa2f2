"""Bundled mock LLM upstream (``crdgol mock-llm``).

No real provider is reachable from tests or the quickstart, so this server stands in
for OpenAI and Anthropic behind Envoy.  Contract:

* It speaks the providers' real wire formats closely enough that the official
  ``openai`` and ``anthropic`` Python SDKs parse its responses, streaming included:

  - ``POST /v1/chat/completions``  OpenAI chat (``stream`` and
    ``stream_options.include_usage`` honoured)
  - ``POST /v1/embeddings``        OpenAI embeddings (8-dim, unit-norm, hash-derived;
    ``encoding_format: "base64"`` honoured)
  - ``GET  /v1/models``            OpenAI model list
  - ``POST /v1/messages``          Anthropic Messages (needs ``anthropic-version``)

* Replies are deterministic and reveal what was received::

      [<name>] model=<model> messages=<n> system=<S> last=<U>

  ``S`` is the full system text ("-" if none; OpenAI ``system``/``developer`` messages
  and Anthropic ``system`` blocks are joined with " | "), ``U`` the text of the last
  user message ("-" if none; text parts joined with " ").  Prompt/input tokens are
  ``max(1, ceil(chars / 4))`` over all message texts plus system; completion/output
  tokens are the number of whitespace-separated words of the reply.

* Knobs (``MockSettings``; runtime-adjustable via ``POST /_mock/config``): latency
  before answering, delay between stream chunks, injected failure status and rate
  (seeded RNG; with a fail_status set, fail_rate 0 -- the default -- or 1 means every
  request fails, and fail_status 0 turns failures off).  Per-request headers
  ``x-mock-fail-status`` and ``x-mock-latency-ms`` take precedence over the instance
  knobs.  Injected failures carry ``x-mock-failed: 1``.  Latency applies before any
  answer, errors included.

* Errors use the provider's real shape: OpenAI ``{"error": {message, type, param,
  code}}``; Anthropic ``{"type": "error", "error": {type, message}}``.

* ``require_key``: OpenAI paths need ``Authorization: Bearer <key>``; ``/v1/messages``
  takes ``x-api-key: <key>`` or (as current anthropic SDKs send it) the bearer form.

* Control plane: ``GET/DELETE /_mock/requests`` (the last ``record`` provider requests,
  most recent last: method, path, lower-cased headers, parsed JSON body or null),
  ``GET/POST /_mock/config``, ``GET /healthz``.  Control-plane and health requests are
  not recorded and never fail, so probes do not pollute what tests inspect.

Every provider response carries ``x-mock-name`` so tests can tell instances apart.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import hashlib
import logging
import math
import random
import re
import signal
import struct
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from aiohttp import web

log = logging.getLogger("crdgol.mockllm")

Flavor = Literal["openai", "anthropic"]


@dataclass(frozen=True)
class MockSettings:
    """Behaviour of one mock instance (see module docstring)."""

    latency_ms: float = 0.0  # delay before answering (and before first stream chunk)
    chunk_delay_ms: float = 0.0  # delay between stream chunks
    fail_status: int = 0  # if non-zero, failing requests answer this status
    fail_rate: float = 0.0  # P(fail) when fail_status is set; 0 (default) or 1 = always
    require_key: str = ""  # if set, requests must carry this credential, else 401
    name: str = "mock"  # appears in replies, so tests can tell two instances apart
    seed: int = 0  # seeds the failure RNG
    record: int = 50  # how many recent requests to keep for GET /_mock/requests


# Knobs that POST /_mock/config may change; identity (name, key, seed) stays fixed so a
# test cannot accidentally make two instances indistinguishable.
_RUNTIME_KNOBS: Final = ("latency_ms", "chunk_delay_ms", "fail_status", "fail_rate")

MODEL_IDS: Final = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "claude-sonnet-4-5")
EMBEDDING_DIM: Final = 8
# Fixed so /v1/models is byte-for-byte stable across runs.
_MODELS_CREATED: Final = 1_700_000_000
# Streams are split into at most this many content chunks: word-by-word for normal
# replies, but a huge injected system prompt must not turn into thousands of frames.
_MAX_CONTENT_CHUNKS: Final = 16
_WORD_RE: Final = re.compile(r"\S+\s*")
# Large prompts (context-injection tests, benchmarks) exceed aiohttp's 1 MiB default.
_CLIENT_MAX_SIZE: Final = 64 * 1024 * 1024

_INVALID: Final = object()  # sentinel: body present but not valid JSON


class _State:
    """Mutable per-app state: current knobs, failure RNG and the request log."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.requests: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=max(0, settings.record)
        )


_STATE: Final = web.AppKey("crdgol_mock_state", _State)


# --------------------------------------------------------------------------- helpers


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


def _openai_error_type(status: int) -> tuple[str, str | None]:
    """Map a status to OpenAI's (type, code) pair as the real API reports them."""
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if status == 404:
        return "invalid_request_error", "not_found"
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _anthropic_error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _error(
    flavor: Flavor,
    status: int,
    message: str,
    name: str,
    extra_headers: dict[str, str] | None = None,
) -> web.Response:
    headers = {"x-mock-name": name}
    if extra_headers:
        headers.update(extra_headers)
    if flavor == "anthropic":
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": _anthropic_error_type(status), "message": message},
        }
    else:
        etype, code = _openai_error_type(status)
        body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return _json(body, status=status, headers=headers)


def _content_text(content: Any) -> str:
    """Text of a message content: a plain string, or the text parts of a list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _dicts(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [m for m in items if isinstance(m, dict)]


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return _content_text(m.get("content"))
    return "-"


def _prompt_tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def _reply(name: str, model: str, n: int, system: str, last: str) -> str:
    return f"[{name}] model={model} messages={n} system={system or '-'} last={last}"


def _split_reply(reply: str) -> list[str]:
    """Split into >= 3 content pieces whose concatenation is exactly ``reply``."""
    words = _WORD_RE.findall(reply)
    if "".join(words) != reply:  # leading whitespace cannot happen, but never lose text
        words = [reply]
    per = max(1, math.ceil(len(words) / _MAX_CONTENT_CHUNKS))
    pieces = ["".join(words[i : i + per]) for i in range(0, len(words), per)]
    while len(pieces) < 3:  # only reachable through the fallback above
        pieces.append("")
    return pieces


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [v / 2**31 for v in struct.unpack("<8i", digest)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _parse_float_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        parsed = float(value)
    except ValueError:
        return None
    return parsed if parsed >= 0 and math.isfinite(parsed) else None


def _parse_status_header(value: str | None) -> int:
    if value is None:
        return 0
    try:
        status = int(value)
    except ValueError:
        return 0
    return status if 400 <= status <= 599 else 0


# ------------------------------------------------------------------------- prologue


async def _prologue(request: web.Request, flavor: Flavor) -> tuple[web.Response | None, Any]:
    """Record, delay, authenticate and maybe fail a provider request.

    Returns ``(error_response, parsed_body)``; the body is ``_INVALID`` when it was not
    valid JSON (the handler answers 400 only if nothing earlier failed the request).
    """
    state = request.app[_STATE]
    s = state.settings
    raw = await request.read()
    body: Any = None
    if raw:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = _INVALID
    if state.requests.maxlen:
        state.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": None if body is _INVALID else body,
            }
        )

    latency = _parse_float_header(request.headers.get("x-mock-latency-ms"))
    if latency is None:
        latency = s.latency_ms
    if latency > 0:
        await asyncio.sleep(latency / 1000.0)

    if flavor == "anthropic" and "anthropic-version" not in request.headers:
        return _error(flavor, 400, "anthropic-version: header is required", s.name), body

    if s.require_key:
        auth = request.headers.get("authorization", "")
        presented = auth[7:] if auth[:7].lower() == "bearer " else ""
        if flavor == "anthropic":
            # The real API takes x-api-key; current anthropic SDKs send the key as a
            # bearer token instead, so accept either.
            presented = request.headers.get("x-api-key", "") or presented
        if presented != s.require_key:
            msg = "Incorrect API key provided." if presented else "Missing API key."
            return _error(flavor, 401, msg, s.name), body

    status = _parse_status_header(request.headers.get("x-mock-fail-status"))
    # fail_rate 0 (the default) or >= 1 means "always": setting a fail_status alone is the
    # common way to break a backend.  The RNG is drawn only for a partial rate, so the
    # seeded sequence depends on those requests alone.
    if (
        not status
        and s.fail_status
        and (not 0.0 < s.fail_rate < 1.0 or state.rng.random() < s.fail_rate)
    ):
        status = s.fail_status
    if status:
        return (
            _error(
                flavor,
                status,
                f"mock {s.name}: injected failure {status}",
                s.name,
                {"x-mock-failed": "1"},
            ),
            body,
        )
    return None, body


def _validate_chat(body: Any) -> str | None:
    """Return an error message if the chat/messages body is unusable."""
    if body is _INVALID:
        return "We could not parse the JSON body of your request."
    if not isinstance(body, dict):
        return "Request body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required (non-empty array)"
    return None


# ------------------------------------------------------------------------- handlers


async def _sse(request: web.Request, frames: list[bytes], name: str) -> web.StreamResponse:
    """Write SSE frames, honouring chunk_delay_ms; one write when there is no delay."""
    resp = web.StreamResponse(
        headers={
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "x-mock-name": name,
        }
    )
    await resp.prepare(request)
    delay = request.app[_STATE].settings.chunk_delay_ms / 1000.0
    try:
        if delay <= 0:
            # Benchmark path: a single chunked write instead of one syscall per frame.
            await resp.write(b"".join(frames))
        else:
            for i, frame in enumerate(frames):
                if i:
                    await asyncio.sleep(delay)
                await resp.write(frame)
        await resp.write_eof()
    except ConnectionResetError:
        pass  # client went away mid-stream; nothing to report to anyone
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    name = request.app[_STATE].settings.name
    err, body = await _prologue(request, "openai")
    if err is not None:
        return err
    problem = _validate_chat(body)
    if problem:
        return _error("openai", 400, problem, name)

    model: str = body["model"]
    messages = _dicts(body["messages"])
    system = " | ".join(
        _content_text(m.get("content"))
        for m in messages
        if m.get("role") in ("system", "developer")
    )
    chars = sum(len(_content_text(m.get("content"))) for m in messages)
    reply = _reply(name, model, len(body["messages"]), system, _last_user(messages))
    usage = {
        "prompt_tokens": _prompt_tokens(chars),
        "completion_tokens": len(reply.split()),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())

    if body.get("stream") is not True:
        return _json(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            },
            headers={"x-mock-name": name},
        )

    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None  # the real API marks every non-final chunk this way
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    frames = [chunk({"role": "assistant", "content": ""}, None)]
    frames.extend(chunk({"content": piece}, None) for piece in _split_reply(reply))
    frames.append(chunk({}, "stop"))
    if include_usage:
        tail = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage,
        }
        frames.append(b"data: " + orjson.dumps(tail) + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    return await _sse(request, frames, name)


async def embeddings(request: web.Request) -> web.StreamResponse:
    name = request.app[_STATE].settings.name
    err, body = await _prologue(request, "openai")
    if err is not None:
        return err
    if body is _INVALID:
        return _error("openai", 400, "We could not parse the JSON body of your request.", name)
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        return _error("openai", 400, "model: Field required", name)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        texts = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        # Token-id arrays are legal input; hash their JSON form so they stay deterministic.
        texts = [t if isinstance(t, str) else orjson.dumps(t).decode() for t in raw_input]
    else:
        return _error("openai", 400, "input: Field required", name)

    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(texts):
        vec = _embedding(text)
        emb: Any = (
            base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vec)).decode() if as_base64 else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = _prompt_tokens(sum(len(t) for t in texts))
    return _json(
        {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers={"x-mock-name": name},
    )


async def models(request: web.Request) -> web.StreamResponse:
    name = request.app[_STATE].settings.name
    err, _ = await _prologue(request, "openai")
    if err is not None:
        return err
    return _json(
        {
            "object": "list",
            "data": [
                {"id": mid, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}
                for mid in MODEL_IDS
            ],
        },
        headers={"x-mock-name": name},
    )


async def messages(request: web.Request) -> web.StreamResponse:
    name = request.app[_STATE].settings.name
    err, body = await _prologue(request, "anthropic")
    if err is not None:
        return err
    problem = _validate_chat(body)
    if problem:
        return _error("anthropic", 400, problem, name)

    model: str = body["model"]
    msgs = _dicts(body["messages"])
    raw_system = body.get("system")
    if isinstance(raw_system, list):
        system = " | ".join(
            b["text"] for b in raw_system if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    else:
        system = raw_system if isinstance(raw_system, str) else ""
    chars = len(system) + sum(len(_content_text(m.get("content"))) for m in msgs)
    reply = _reply(name, model, len(body["messages"]), system, _last_user(msgs))
    input_tokens = _prompt_tokens(chars)
    output_tokens = len(reply.split())
    mid = "msg_" + uuid.uuid4().hex[:24]

    if body.get("stream") is not True:
        return _json(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": reply}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            },
            headers={"x-mock-name": name},
        )

    def event(kind: str, data: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    frames = [
        event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        ),
        event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        event("ping", {"type": "ping"}),
    ]
    frames.extend(
        event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in _split_reply(reply)
    )
    frames.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    frames.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    frames.append(event("message_stop", {"type": "message_stop"}))
    return await _sse(request, frames, name)


# -------------------------------------------------------------------- control plane


async def get_requests(request: web.Request) -> web.StreamResponse:
    return _json(list(request.app[_STATE].requests))


async def delete_requests(request: web.Request) -> web.StreamResponse:
    request.app[_STATE].requests.clear()
    return _json({"cleared": True})


def _config_view(s: MockSettings) -> dict[str, Any]:
    view = dataclasses.asdict(s)
    view["require_key"] = bool(s.require_key)  # say whether, never echo the secret
    return view


async def get_config(request: web.Request) -> web.StreamResponse:
    return _json(_config_view(request.app[_STATE].settings))


async def post_config(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json({"error": "body must be a JSON object"}, status=400)
    if not isinstance(body, dict):
        return _json({"error": "body must be a JSON object"}, status=400)
    unknown = sorted(set(body) - set(_RUNTIME_KNOBS))
    if unknown:
        # Reject rather than ignore so a typo in a test fails loudly.
        return _json({"error": f"unknown or immutable keys: {unknown}"}, status=400)
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _json({"error": f"{key} must be a number"}, status=400)
        if key == "fail_status":
            if value != int(value) or not (value == 0 or 400 <= value <= 599):
                return _json({"error": "fail_status must be 0 or 400..599"}, status=400)
            changes[key] = int(value)
        elif key == "fail_rate":
            if not 0.0 <= value <= 1.0:
                return _json({"error": "fail_rate must be within [0, 1]"}, status=400)
            changes[key] = float(value)
        else:
            if value < 0 or not math.isfinite(value):
                return _json({"error": f"{key} must be >= 0"}, status=400)
            changes[key] = float(value)
    state.settings = dataclasses.replace(state.settings, **changes)
    return _json(_config_view(state.settings))


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


# ---------------------------------------------------------------------- public API


def build_app(settings: MockSettings) -> web.Application:
    """Build the aiohttp application for one mock instance."""
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[_STATE] = _State(settings)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/_mock/requests", get_requests)
    app.router.add_delete("/_mock/requests", delete_requests)
    app.router.add_get("/_mock/config", get_config)
    app.router.add_post("/_mock/config", post_config)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, settings: MockSettings) -> None:
    """Serve until cancelled.  With ``port=0`` the logged URL shows the bound port."""
    runner = web.AppRunner(build_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = port
        for addr in runner.addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                bound = int(addr[1])
                break
        log.info("mock-llm listening on http://%s:%d", host, bound)
        await asyncio.Event().wait()  # forever; cancellation is the only way out
    finally:
        await runner.cleanup()


def _non_negative(value: str) -> float:
    parsed = float(value)
    if parsed < 0 or not math.isfinite(parsed):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return parsed


def _fail_status(value: str) -> int:
    parsed = int(value)
    if parsed != 0 and not 400 <= parsed <= 599:
        raise argparse.ArgumentTypeError("must be 0 or 400..599")
    return parsed


def _rate(value: str) -> float:
    parsed = float(value)
    if not 0.0 <= parsed <= 1.0:
        raise argparse.ArgumentTypeError("must be within [0, 1]")
    return parsed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crdgol mock-llm", description="Mock OpenAI/Anthropic upstream for crdgol."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--latency-ms", type=_non_negative, default=0.0)
    p.add_argument("--chunk-delay-ms", type=_non_negative, default=0.0)
    p.add_argument("--fail-status", type=_fail_status, default=0)
    p.add_argument("--fail-rate", type=_rate, default=0.0)
    p.add_argument("--require-key", default="")
    p.add_argument("--name", default="mock")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", type=int, default=50, help="requests kept for /_mock/requests")
    return p


async def _run_until_signal(host: str, port: int, settings: MockSettings) -> None:
    task = asyncio.create_task(serve(host, port, settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("mock-llm stopped")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns a process exit code."""
    args = _parser().parse_args(argv)
    settings = MockSettings(
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        fail_status=args.fail_status,
        fail_rate=args.fail_rate,
        require_key=args.require_key,
        name=args.name,
        seed=args.seed,
        record=args.record,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop  # optional speed-up, imported only when serving

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(_run_until_signal(args.host, args.port, settings))
    except OSError as exc:  # e.g. port already in use
        log.error("mock-llm failed to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
