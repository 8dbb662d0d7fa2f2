"""The run API the gateway forwards ``/v1/workflows/...`` to (after extproc authenticated the caller).

Reachable only through Envoy: on a Unix socket (mode 0600) in the standalone stack; on a cluster
on a TCP port whose requests must carry the per-controller token Envoy's route adds
(``API_TOKEN_HEADER``). The caller's tenants (comma-separated, qualified) come from
``TENANT_HEADER`` and the digest of the API key it called with from ``KEY_DIGEST_HEADER``, both
set by extproc; a request without tenants is refused. A caller sees only its own tenants' runs
(another tenant's run is a 404, as if it did not exist). Errors are the gateway's JSON shape
``{"error": {"message", "type", "code"}}``.

Where runs live is a ``RunBackend``: the file-mode engine (``host.FileRuns``) or WorkflowRun
resources on a cluster (``cluster_api.ClusterRuns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from controller.models import SpecError
from controller.workflow.retention import RETRY_AFTER_SECONDS
from crdgol import tenancy
from crdgol.workflow_contract import API_TOKEN_HEADER, KEY_DIGEST_HEADER, TENANT_HEADER

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def error(status: int, type_: str, code: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"message": message, "type": type_, "code": code}}), content_type="application/json")


def ok(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as extproc authenticated it: the qualified tenants its credential acts
    as, and the SHA-256 (hex) of the API key it sent ("" for a JWT)."""

    tenants: frozenset[str]
    key_digest: str = ""


class BackendUnavailable(Exception):
    """Where runs are kept cannot be reached (the API server failed): a 502/503 to the caller."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class TooManyRuns(Exception):
    """The tenant has as many active runs as it may (``retention.RunLimits``): a 429."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


# The body of a start: {"inputs": {...}}. The inputs are kept with the run (its journal, rewritten
# on every transition, in file mode; the WorkflowRun resource, which shares etcd's ~1.5 MiB with
# its status, on a cluster), so they are bounded well below that.
MAX_BODY_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Started:
    """A run just started: its status for the 201, and (file mode) its first step's call with
    the steps that follow from it, which the handler runs in its own task as soon as the 201 is
    written (``Runner.start_here``)."""

    status: dict[str, Any]
    then: Coroutine[Any, Any, None] | None = None


class RunBackend(Protocol):
    """Where runs are started, read and cancelled. Status documents are ``status.run_status``'s shape."""

    def ready(self) -> bool:
        """False until the recorded runs are known (the API answers 503 meanwhile)."""

    async def start(self, caller: Caller, namespace: str, workflow: str, inputs: dict[str, Any], tenant: str) -> Started:
        """Start a run of ``namespace/workflow`` as ``tenant``. ``LookupError``: no such workflow
        there; ``SpecError``: it cannot run (refused, no API key): a 409; ``TooManyRuns``: the
        tenant is at its cap of active runs: a 429 (checked and the run counted without an await
        in between, so concurrent starts cannot pass the cap together)."""

    async def read(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        """The run's status, None unless it exists and belongs to one of the caller's tenants."""

    async def runs(self, caller: Caller) -> list[dict[str, Any]]:
        """The caller's tenants' runs, oldest first."""

    async def cancel(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        """Cancel the caller's run; its status after, None as for ``read``."""


class RunApi:
    def __init__(self, backend: RunBackend, token: str = "") -> None:
        self.backend, self.token = backend, token

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # On a TCP port only requests Envoy's route forwarded (it adds the token) are served: the
        # tenant header is trusted, so nothing else may set it.
        if self.token and not hmac.compare_digest(request.headers.get(API_TOKEN_HEADER, "").encode(), self.token.encode()):
            return error(403, "permission_error", "not_through_gateway", "the workflow run API is served only through the gateway")
        # Until the recorded runs are loaded a run would look unknown (404) and a workflow missing:
        # say the engine is starting instead, which clients retry.
        if not self.backend.ready():
            r = error(503, "api_error", "engine_starting", "the workflow engine is starting; retry in a moment")
            r.headers["Retry-After"] = "1"
            return r
        try:
            return await handler(request)
        except BackendUnavailable as exc:
            return error(exc.status, "api_error", "workflow_store_unavailable", exc.message)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        app.router.add_post("/v1/workflows/{name}/runs", self.create)
        app.router.add_get("/v1/workflows/runs", self.list)
        app.router.add_get("/v1/workflows/runs/{run}", self.read)
        app.router.add_delete("/v1/workflows/runs/{run}", self.delete)
        return app

    @staticmethod
    def _caller(request: web.Request) -> Caller | None:
        tenants = frozenset(t for t in request.headers.get(TENANT_HEADER, "").split(",") if t)
        if not tenants:
            return None
        digest = request.headers.get(KEY_DIGEST_HEADER, "")
        return Caller(tenants, digest if _DIGEST.fullmatch(digest) else "")

    async def create(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        if caller is None:
            return error(401, "authentication_error", "invalid_api_key", "no authenticated caller")
        too_large = error(413, "invalid_request_error", "request_too_large", f"the body is over {MAX_BODY_BYTES // 1024} KiB; a run's inputs must be smaller")
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return too_large
        try:
            body = orjson.loads(await request.read() or b"{}")
        except web.HTTPRequestEntityTooLarge:  # a chunked body that grew past the limit
            return too_large
        except orjson.JSONDecodeError:
            return error(400, "invalid_request_error", "invalid_json", "the body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("inputs", {}), dict) or set(body) - {"inputs"}:
            return error(400, "invalid_request_error", "invalid_request", 'the body must be {"inputs": {...}}')
        # The workflow is looked up in the caller's own namespaces only (a key may act as tenants of
        # several), and the run acts as the caller's tenant there: no namespace can start another's
        # workflow, whose steps would act on that namespace's behalf (its helpdesk, its prompts).
        missing = LookupError(f"no WorkflowSpec {request.match_info['name']!r}")
        for tenant in sorted(caller.tenants):
            try:
                doc = await self.backend.start(caller, tenancy.namespace_of(tenant), request.match_info["name"], body.get("inputs", {}), tenant)
            except LookupError as exc:
                missing = exc
                continue
            except SpecError as exc:
                return error(409, "invalid_request_error", exc.reason, exc.message)
            except TooManyRuns as exc:
                r = error(429, "rate_limit_error", "too_many_active_runs", exc.message)
                r.headers["Retry-After"] = str(exc.retry_after)
                return r
            return await self._created(request, doc)
        return error(404, "not_found_error", "workflow_not_found", str(missing.args[0]))

    @staticmethod
    async def _created(request: web.Request, started: Started) -> web.StreamResponse:
        """The 201; then, in this same task, the run's first call (``Started.then``)."""
        r = ok(201, started.status)
        if started.then is None:
            return r
        # This connection stays with the handler until that call ends: Envoy must not send its
        # next request down it (aiohttp would hold it until then).
        r.force_close()
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client left; the run goes on
            await r.prepare(request)
            await r.write_eof()
        # The step's abort (its run cancelled or failed) cancels the task running it; the answer
        # is long sent. (aiohttp does not cancel handlers when a client leaves.)
        with contextlib.suppress(asyncio.CancelledError):
            await started.then
        return r

    async def _own(self, request: web.Request, act: Callable[[Caller, str, str], Awaitable[dict[str, Any] | None]]) -> web.Response:
        caller = self._caller(request)
        if caller is None:
            return error(401, "authentication_error", "invalid_api_key", "no authenticated caller")
        name = request.match_info["run"]
        if _NAME.fullmatch(name):
            for namespace in sorted({tenancy.namespace_of(t) for t in caller.tenants}):
                doc = await act(caller, namespace, name)
                if doc is not None:
                    return ok(200, doc)
        return error(404, "not_found_error", "run_not_found", f"no workflow run {name!r}")

    async def read(self, request: web.Request) -> web.Response:
        return await self._own(request, self.backend.read)

    async def list(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if caller is None:
            return error(401, "authentication_error", "invalid_api_key", "no authenticated caller")
        return ok(200, {"runs": await self.backend.runs(caller)})

    async def delete(self, request: web.Request) -> web.Response:
        return await self._own(request, self.backend.cancel)
