"""Answers that go wrong after the provider has started answering: the charge rule's test cases.

A request asks for one with the ``x-mock-fault`` header (it reaches the mock through the gateway,
which forwards client headers upstream):

* ``reset-mid-stream``: a streamed answer whose connection is aborted after its first frame
  (Envoy sees an upstream reset once the response has begun);
* ``invalid-json``: a 200 ``application/json`` answer whose body is not JSON;
* ``no-usage``: a complete, valid answer (streamed or not) without any usage block.

Anything else is ignored (the request is answered normally), so a typo shows up as a test that
does not see its fault rather than as a mock error.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
from aiohttp import web

from mockllm import wire

FAULT_HEADER: Final = "x-mock-fault"
FAULTS: Final = frozenset({"reset-mid-stream", "invalid-json", "no-usage"})


def requested(request: web.Request) -> str:
    """The fault this request asks for, or "" for none."""
    fault = request.headers.get(FAULT_HEADER, "")
    return fault if fault in FAULTS else ""


def _without_usage(frames: list[bytes]) -> list[bytes]:
    return [f for f in frames if b'"usage"' not in f]


async def openai_answer(request: web.Request, fault: str, body: dict[str, Any], name: str) -> web.StreamResponse:
    """The faulty form of an OpenAI chat answer to ``body``."""
    model: str = body["model"]
    reply, usage = wire.openai_reply(name, model, body["messages"])
    headers = {"x-mock-name": name, "x-mock-fault": fault}
    if fault == "invalid-json":
        return web.Response(body=b'{"id": "chatcmpl-broken", "choices": [', content_type="application/json", headers=headers)
    if body.get("stream") is not True:
        doc = wire.openai_completion(model, reply, usage)
        doc.pop("usage", None)
        return web.Response(body=orjson.dumps(doc), content_type="application/json", headers=headers)
    frames = wire.openai_stream(model, reply, usage, True)
    if fault == "no-usage":
        frames = _without_usage(frames)
    resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8", **headers})
    await resp.prepare(request)
    if fault == "reset-mid-stream":
        await resp.write(frames[0])
        await asyncio.sleep(0.05)  # let the headers and the frame leave: abort() drops what is buffered
        transport = request.transport
        if transport is not None:
            transport.abort()  # no terminating chunk: the upstream connection just dies
        return resp
    for frame in frames:
        await resp.write(frame)
    await resp.write_eof()
    return resp
