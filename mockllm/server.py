"""Bundled mock LLM upstream (``crdgol mock-llm``): the aiohttp app, its knobs and the CLI.

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

* Replies are deterministic and reveal what was received (``[<name>] model=<model>
  messages=<n> system=<S> last=<U>``); reply text, token counts, response bodies, SSE
  frames and error bodies are built by ``mockllm.wire``, which documents them.

* Knobs (``MockSettings``; runtime-adjustable via ``POST /_mock/config``): latency
  before answering, delay between stream chunks, injected failure status and rate
  (seeded RNG; with a fail_status set, fail_rate 0 -- the default -- or 1 means every
  request fails, and fail_status 0 turns failures off).  Per-request headers
  ``x-mock-fail-status`` and ``x-mock-latency-ms`` take precedence over the instance
  knobs.  Injected failures carry ``x-mock-failed: 1``; with ``x-mock-echo-credential: 1``
  their message quotes the credential the request carried, as some providers do.  Latency applies before any
  answer, errors included.  ``x-mock-fault`` asks for an answer that breaks after it has
  begun (``mockllm.faults``).

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
import collections
import dataclasses
import logging
import math
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from mockllm import faults, helpdesk, rules, wire
from mockllm.wire import Flavor

log = logging.getLogger("crdgol.mockllm")


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
_RULES: Final = web.AppKey("crdgol_mock_rules", tuple)


# --------------------------------------------------------------------------- helpers


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


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
    return _json(wire.error_body(flavor, status, message), status=status, headers=headers)


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
        message = f"mock {s.name}: injected failure {status}"
        if request.headers.get("x-mock-echo-credential"):
            # Like providers that quote the key they were sent back in their error message.
            sent = request.headers.get("x-api-key") or request.headers.get("authorization", "")
            message += f"; credential presented: {sent}"
        return (
            _error(
                flavor,
                status,
                message,
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

    fault = faults.requested(request)
    if fault:
        return await faults.openai_answer(request, fault, body, name)
    model: str = body["model"]
    reply, usage = wire.openai_reply(name, model, body["messages"])
    ruled = rules.answer(request.app[_RULES], body["messages"])
    if ruled is not None:
        reply = ruled
        usage = {**usage, "completion_tokens": len(reply.split()), "total_tokens": usage["prompt_tokens"] + len(reply.split())}
    if body.get("stream") is not True:
        return _json(wire.openai_completion(model, reply, usage), headers={"x-mock-name": name})
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    return await _sse(request, wire.openai_stream(model, reply, usage, include_usage), name)


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
    return _json(
        wire.embeddings_list(body["model"], texts, as_base64), headers={"x-mock-name": name}
    )


async def models(request: web.Request) -> web.StreamResponse:
    name = request.app[_STATE].settings.name
    err, _ = await _prologue(request, "openai")
    if err is not None:
        return err
    return _json(wire.models_list(), headers={"x-mock-name": name})


async def messages(request: web.Request) -> web.StreamResponse:
    name = request.app[_STATE].settings.name
    err, body = await _prologue(request, "anthropic")
    if err is not None:
        return err
    problem = _validate_chat(body)
    if problem:
        return _error("anthropic", 400, problem, name)

    model: str = body["model"]
    reply, input_tokens, output_tokens = wire.anthropic_reply(
        name, model, body["messages"], body.get("system")
    )
    ruled = rules.answer(request.app[_RULES], body["messages"])
    if ruled is not None:
        reply, output_tokens = ruled, len(ruled.split())
    if body.get("stream") is not True:
        return _json(
            wire.anthropic_message(model, reply, input_tokens, output_tokens),
            headers={"x-mock-name": name},
        )
    frames = wire.anthropic_stream(model, reply, input_tokens, output_tokens)
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


def build_app(settings: MockSettings, answer_rules: tuple[rules.Rule, ...] = ()) -> web.Application:
    """Build the aiohttp application for one mock instance."""
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    app[_STATE] = _State(settings)
    app[_RULES] = answer_rules
    helpdesk.install(app)
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


async def serve(host: str, port: int, settings: MockSettings, answer_rules: tuple[rules.Rule, ...] = ()) -> None:
    """Serve until cancelled.  With ``port=0`` the logged URL shows the bound port."""
    runner = web.AppRunner(build_app(settings, answer_rules), access_log=None, handle_signals=False)
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
    p.add_argument("--rules-from", default="", help="answer from the MockRules documents in this folder (see mockllm.rules)")
    return p


async def _run_until_signal(host: str, port: int, settings: MockSettings, answer_rules: tuple[rules.Rule, ...] = ()) -> None:
    task = asyncio.create_task(serve(host, port, settings, answer_rules))
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
        answer_rules = rules.load_rules(Path(args.rules_from)) if args.rules_from else ()
    except ValueError as exc:
        log.error("mock-llm: bad rules in %s: %s", args.rules_from, exc)
        return 2
    try:
        import uvloop  # optional speed-up, imported only when serving

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(_run_until_signal(args.host, args.port, settings, answer_rules))
    except OSError as exc:  # e.g. port already in use
        log.error("mock-llm failed to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
