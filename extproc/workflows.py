"""``/v1/workflows/...``: the workflow run API, authenticated here, served by the controller.

extproc checks the method and path, authenticates the caller like any gateway client, and hands
the request on to the controller's run API with the caller's tenant in ``TENANT_HEADER`` (set
here, overwriting any client value). Unknown paths get a 404 and wrong methods a 405 in the
gateway's usual JSON shape, before anything reaches the controller.
"""

from __future__ import annotations

import re

from crdgol.workflow_contract import PREFIX, ROUTE, TENANT_HEADER
from extproc.auth import credential_from_headers
from extproc.errors import MethodNotAllowed, NotFound
from extproc.phases import Continue, Handler, Headers, Reply
from extproc.services import ROUTE_HEADER, Services

_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_PATHS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"^{PREFIX}/{_NAME}/runs$"), "POST"),
    (re.compile(rf"^{PREFIX}/runs/{_NAME}$"), "GET,DELETE"),
    (re.compile(rf"^{PREFIX}/runs$"), "GET"),
)


def handles(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def choose(services: Services, method: str, path: str) -> Handler:
    from extproc.gateway import Refuse  # the shared refusal strategy

    for pattern, allowed in _PATHS:
        if pattern.fullmatch(path):
            if method not in allowed.split(","):
                return Refuse(MethodNotAllowed(f"{path} accepts {allowed.replace(',', ', ')}, not {method}"), allow=allowed.replace(",", ", "))
            return WorkflowRuns(services)
    return Refuse(
        NotFound(
            f"unknown path {path}: the workflow API serves POST {PREFIX}/NAME/runs, GET {PREFIX}/runs, GET and DELETE {PREFIX}/runs/RUN",
            code="unknown_url",
        )
    )


class WorkflowRuns(Handler):
    """Authenticate, then route to the controller's run API with the caller's tenant."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        credential = credential_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        identity = await self.services.authenticate(credential)
        # Every tenant the credential may act as (qualified names hold no ','); the controller
        # picks the one of the workflow's namespace.
        return Continue(set_headers={ROUTE_HEADER: ROUTE, TENANT_HEADER: ",".join(identity.tenants)}, clear_route_cache=True)
