"""``/v1/workflows/...``: the workflow run API, authenticated here, served by the controller.

extproc checks the method and path, authenticates the caller like any gateway client, and hands
the request on to the controller's run API with the caller's tenant in ``TENANT_HEADER`` (set
here, overwriting any client value). Unknown paths get a 404 and wrong methods a 405 in the
gateway's usual JSON shape, before anything reaches the controller.
"""

from __future__ import annotations

import hashlib
import re

from crdgol.request_path import ROUTE_HEADER
from crdgol.workflow_contract import KEY_DIGEST_HEADER, PREFIX, ROUTE, TENANT_HEADER
from extproc.auth import credential_from_headers
from extproc.errors import MethodNotAllowed, NotFound
from extproc.phases import Continue, Handler, Headers, Reply
from extproc.services import Services

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
    """Authenticate, then route to the controller's run API with the caller's tenants and the
    digest of its API key; its credential is not forwarded."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        credential = credential_from_headers(headers.get("authorization"), headers.get("x-api-key"))
        identity = await self.services.authenticate(credential)
        # Every tenant the credential may act as (qualified names hold no ','); the controller
        # picks the one of the workflow's namespace.
        set_headers = {ROUTE_HEADER: ROUTE, TENANT_HEADER: ",".join(identity.tenants)}
        # On a cluster a run calls with the key its caller sent, named by the Secret holding it:
        # the controller finds that Secret by the key's digest (the key itself goes no further).
        # Set or removed here, never the client's own value.
        remove = ["authorization", "x-api-key"]
        if identity.method == "api_key":
            set_headers[KEY_DIGEST_HEADER] = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()
        else:
            remove.append(KEY_DIGEST_HEADER)
        return Continue(set_headers=set_headers, remove_headers=remove, clear_route_cache=True)
