"""Per-attempt strategy: what the upstream ext_proc filter does on every try at a backend.

Envoy runs this filter in the upstream filter chain of every backend cluster that can be reached
by a fallback (or by a weighted choice), so each attempt is processed with that backend's
settings. The cluster tells extproc which backend it is through gRPC initial metadata
(``x-crdgol-backend``). Per attempt it points the request at the backend, swaps in the provider
credential, rewrites the model and translates the body from whatever API it is in
(``x-crdgol-body-api``: the client's, or the first backend's when the downstream filter already
rewrote it), and translates the response back into the client's API. It tags the response with
the backend id for the downstream filter's accounting.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.attempt import STRIP, ResponseTranslation, api_of, rewrite_body, target_headers
from extproc.errors import Unavailable
from extproc.phases import PASS, Continue, Handler, Headers, Reply
from extproc.policy import Api, Backend, Binding
from extproc.services import BACKEND_HEADER, BODY_API_HEADER, CLIENT_API_HEADER, Services


class Attempt(Handler):
    def __init__(self, services: Services, backend_id: str) -> None:
        entry = services.policy.backend(backend_id)
        if entry is None:
            # The policy and the Envoy config disagree (an update in flight): fail this attempt.
            raise Unavailable(f"backend {backend_id} is not in the policy in force")
        self.binding: Binding = entry[0]
        self.backend: Backend = entry[1]
        self.body_api = Api.OPENAI
        self.response = ResponseTranslation(self.backend.api, Api.OPENAI, self.binding.model)

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        client_api = api_of(headers.get(CLIENT_API_HEADER))
        self.body_api = api_of(headers.get(BODY_API_HEADER, headers.get(CLIENT_API_HEADER)))
        self.response = ResponseTranslation(self.backend.api, client_api, self.binding.model)
        embeddings = headers.get(":path", "").endswith("/embeddings")
        set_headers = target_headers(self.backend, embeddings, "anthropic-version" in headers)
        remove = [h for h in STRIP if h in headers and h not in set_headers]
        return Continue(set_headers=set_headers, remove_headers=remove)

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        doc: dict[str, Any] = orjson.loads(body)
        out = rewrite_body(self.backend, doc, self.body_api)
        return Continue(body=out, set_headers={"content-length": str(len(out))})

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        reply = Continue(set_headers={BACKEND_HEADER: self.backend.id})
        if end_of_stream:
            return reply
        mode = self.response.start(int(headers.get(":status", "0") or 0), headers.get("content-type", ""))
        if mode is not None:
            reply.remove_headers.append("content-length")
            reply.response_body_mode = mode
        return reply

    async def response_body(self, body: bytes, end_of_stream: bool) -> Reply:
        if not self.response.needed:
            return PASS
        return Continue(body=self.response.body(body, end_of_stream))
