"""A step's target cannot fill the controller's memory (one controller serves every namespace):
an answer is read up to ``MAX_ANSWER_BYTES`` and the step fails, finally, past it; a normal answer
is unchanged. Real HTTP over loopback, straight at the target (the egress listener's part is
Envoy's and tested with it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from controller.workflow.accept import accept
from controller.workflow.calls import MAX_ANSWER_BYTES, CallContext, CallTarget, call_http
from controller.workflow.engine import Call, StepFailed, StepSucceeded
from controller.workflow.spec import parse_workflow

CHUNK = b"x" * 65536


@pytest.fixture
async def target() -> AsyncIterator[str]:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10_000):  # 640 MiB, chunked: no length announced
            await resp.write(CHUNK)
            await asyncio.sleep(0)
        return resp

    async def announced(_req: web.Request) -> web.Response:
        return web.Response(body=b"y" * (MAX_ANSWER_BYTES + 1), content_type="text/plain")

    async def small(_req: web.Request) -> web.Response:
        return web.json_response({"ticket": 42})

    app = web.Application()
    app.router.add_get("/endless", endless)
    app.router.add_get("/announced", announced)
    app.router.add_get("/small", small)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _run(base: str, path: str) -> StepSucceeded | StepFailed:
    doc = {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "WorkflowSpec",
        "metadata": {"name": "wf", "namespace": "team-a"},
        "spec": {"steps": [{"name": "call", "type": "http-request", "httpRequest": {"url": f"{base}{path}"}}]},
    }
    step = accept(parse_workflow(doc), {}, file_mode=True).steps[0]
    call = Call("call", 1, "http-request", {"url": f"{base}{path}", "method": "GET", "headers": {}, "body": None}, None, 0.0)
    async with aiohttp.ClientSession() as http:
        return await call_http(http, CallTarget(gateway=base, egress=base), CallContext("team-a/run", "team-a/wf", "", ""), step, call)


async def test_an_answer_without_end_fails_the_step_once_past_the_cap(target: str) -> None:
    outcome = await asyncio.wait_for(_run(target, "/endless"), 30)
    assert isinstance(outcome, StepFailed) and outcome.final
    assert f"more than {MAX_ANSWER_BYTES} bytes" in outcome.message


async def test_an_answer_announced_too_large_is_not_read(target: str) -> None:
    outcome = await _run(target, "/announced")
    assert isinstance(outcome, StepFailed) and outcome.final


async def test_a_normal_answer_is_the_steps_output(target: str) -> None:
    outcome = await _run(target, "/small")
    assert isinstance(outcome, StepSucceeded)
    assert outcome.outputs["body"] == {"ticket": 42} and outcome.outputs["status"] == 200
