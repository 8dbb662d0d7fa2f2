"""The mock's helpdesk: an HTTP API a workflow posts to, which records what it received.

* ``POST|PUT /helpdesk/{kind}`` records ``{kind, method, headers, body}`` (body parsed as JSON when
  it is JSON) and answers ``201 {"id": n}``.
* ``GET /_mock/helpdesk`` lists what was recorded, oldest first; ``DELETE`` clears it.
* ``POST /_mock/helpdesk/config`` ``{"fail_next": n, "status": s, "delay_ms": d}``: the next ``n``
  helpdesk requests answer ``s`` (default 503) without being recorded; every request waits ``d``
  ms first (so tests can cancel or time out a call in flight); a request whose client went away
  meanwhile is not recorded, its Idempotency-Key is listed in ``abandoned`` instead.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web


@dataclass
class Helpdesk:
    records: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0
    fail_status: int = 503
    delay_ms: float = 0.0
    attempts: int = 0  # every helpdesk request, failed or not
    # Idempotency keys (or "-") of requests whose client went away during the delay: not recorded.
    abandoned: list[str] = field(default_factory=list)


_DESK: Final = web.AppKey("crdgol_mock_helpdesk", Helpdesk)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def post(request: web.Request) -> web.Response:
    desk = request.app[_DESK]
    desk.attempts += 1
    raw = await request.read()
    if desk.delay_ms:
        await asyncio.sleep(desk.delay_ms / 1000)
        if request.transport is None or request.transport.is_closing():
            desk.abandoned.append(request.headers.get("idempotency-key", "-"))
            return web.Response(status=499)
    if desk.fail_next > 0:
        desk.fail_next -= 1
        return _json({"error": {"message": f"helpdesk unavailable ({desk.fail_status})"}}, status=desk.fail_status)
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    desk.records.append(
        {"kind": request.match_info["kind"], "method": request.method, "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body}
    )
    return _json({"id": len(desk.records)}, status=201)


async def listing(request: web.Request) -> web.Response:
    return _json(request.app[_DESK].records)


async def clear(request: web.Request) -> web.Response:
    desk = request.app[_DESK]
    desk.records.clear()
    desk.abandoned.clear()
    desk.attempts = 0
    return _json({"cleared": True})


async def configure(request: web.Request) -> web.Response:
    desk = request.app[_DESK]
    try:
        cfg = orjson.loads(await request.read())
        desk.fail_next = int(cfg.get("fail_next", desk.fail_next))
        desk.fail_status = int(cfg.get("status", desk.fail_status))
        desk.delay_ms = float(cfg.get("delay_ms", desk.delay_ms))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return _json({"error": {"message": "expected {fail_next, status, delay_ms}"}}, status=400)
    return _json({"fail_next": desk.fail_next, "status": desk.fail_status, "delay_ms": desk.delay_ms, "attempts": desk.attempts, "abandoned": desk.abandoned})


def install(app: web.Application) -> None:
    app[_DESK] = Helpdesk()
    app.router.add_post("/helpdesk/{kind}", post)
    app.router.add_put("/helpdesk/{kind}", post)
    app.router.add_get("/_mock/helpdesk", listing)
    app.router.add_delete("/_mock/helpdesk", clear)
    app.router.add_post("/_mock/helpdesk/config", configure)
