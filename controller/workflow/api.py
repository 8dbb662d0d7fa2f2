"""The run API the gateway forwards ``/v1/workflows/...`` to (after extproc authenticated the caller).

Reachable only through Envoy: on a Unix socket (mode 0600) in the standalone stack. The caller's
tenants (comma-separated, qualified) come from ``TENANT_HEADER``, which extproc sets; a request
without it is refused. A caller sees only its own tenants' runs (another tenant's run is a 404, as if it did not exist). Errors are the
gateway's JSON shape ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from controller.models import SpecError
from controller.workflow.engine import RunState
from controller.workflow.status import run_status
from crdgol import tenancy
from crdgol.workflow_contract import TENANT_HEADER

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def error(status: int, type_: str, code: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"message": message, "type": type_, "code": code}}), content_type="application/json")


def ok(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class RunApi:
    """What the API needs from the workflow host."""

    def __init__(
        self,
        start: Callable[[str, str, dict[str, Any], str], RunState],
        get: Callable[[str], RunState | None],
        runs: Callable[[], list[RunState]],
        cancel: Callable[[str], Awaitable[RunState | None]],
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._start, self._get, self._runs, self._cancel, self._ready = start, get, runs, cancel, ready

    @web.middleware
    async def _starting(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # Until the recorded runs are loaded a run would look unknown (404) and a workflow missing:
        # say the engine is starting instead, which clients retry.
        if not self._ready():
            r = error(503, "api_error", "engine_starting", "the workflow engine is starting; retry in a moment")
            r.headers["Retry-After"] = "1"
            return r
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024, middlewares=[self._starting])
        app.router.add_post("/v1/workflows/{name}/runs", self.create)
        app.router.add_get("/v1/workflows/runs", self.list)
        app.router.add_get("/v1/workflows/runs/{run}", self.read)
        app.router.add_delete("/v1/workflows/runs/{run}", self.delete)
        return app

    @staticmethod
    def _tenants(request: web.Request) -> frozenset[str]:
        return frozenset(t for t in request.headers.get(TENANT_HEADER, "").split(",") if t)

    async def create(self, request: web.Request) -> web.Response:
        tenants = self._tenants(request)
        if not tenants:
            return error(401, "authentication_error", "invalid_api_key", "no authenticated caller")
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return error(400, "invalid_request_error", "invalid_json", "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("inputs", {}), dict) or set(body) - {"inputs"}:
            return error(400, "invalid_request_error", "invalid_request", 'the body must be {"inputs": {...}}')
        # The workflow is looked up in the caller's own namespaces only (a key may act as tenants of
        # several), and the run acts as the caller's tenant there: no namespace can start another's
        # workflow, whose steps would act on that namespace's behalf (its helpdesk, its prompts).
        missing = LookupError(f"no WorkflowSpec {request.match_info['name']!r}")
        for tenant in sorted(tenants):
            try:
                state = self._start(tenancy.namespace_of(tenant), request.match_info["name"], body.get("inputs", {}), tenant)
            except LookupError as exc:
                missing = exc
                continue
            except SpecError as exc:
                return error(409, "invalid_request_error", exc.reason, exc.message)
            return ok(201, run_status(state))
        return error(404, "not_found_error", "workflow_not_found", str(missing.args[0]))

    def _own(self, request: web.Request) -> RunState | web.Response:
        tenants = self._tenants(request)
        if not tenants:
            return error(401, "authentication_error", "invalid_api_key", "no authenticated caller")
        name = request.match_info["run"]
        found = (self._get(f"{tenancy.namespace_of(t)}/{name}") for t in sorted(tenants)) if _NAME.fullmatch(name) else iter(())
        state = next((s for s in found if s is not None and s.tenant in tenants), None)
        if state is None:
            return error(404, "not_found_error", "run_not_found", f"no workflow run {name!r}")
        return state

    async def read(self, request: web.Request) -> web.Response:
        state = self._own(request)
        return state if isinstance(state, web.Response) else ok(200, run_status(state))

    async def list(self, request: web.Request) -> web.Response:
        tenants = self._tenants(request)
        if not tenants:
            return error(401, "authentication_error", "invalid_api_key", "no authenticated caller")
        runs = sorted((r for r in self._runs() if r.tenant in tenants), key=lambda r: r.created_at)
        return ok(200, {"runs": [run_status(r) for r in runs]})

    async def delete(self, request: web.Request) -> web.Response:
        state = self._own(request)
        if isinstance(state, web.Response):
            return state
        after = await self._cancel(state.key)
        return ok(200, run_status(after or state))
