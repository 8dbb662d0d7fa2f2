"""A native-path program Envoy refuses cannot keep a revoked key working.

Envoy keeps the last filter config it accepted when it NACKs a new one. For the native path's
program that would keep its old key table: a key the new policy removes would still be served by
Envoy alone. The controller, seeing the NACK, sends a program that decides nothing instead (every
call to extproc, which has the new policy). Here the controller runs in-process so the test can make
one program unloadable; Envoy, extproc and the mock are the real processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import controller.app as app
from controller.app import Controller, ControllerSettings
from controller.native_path import native_extension
from controller.render import RenderSettings, ads_bootstrap
from crdgol.control_plane import private_dir
from crdgol.stack import envoy_binary, free_port, stop_process, wait_http
from tests.dataplane.test_native_path import ALPHA, GAMMA, PROVIDER, chat, secrets, write_manifests

PY = [sys.executable, "-m", "crdgol.cli"]


class Parts:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port, self.admin, self.mock, self.metrics = free_port(), free_port(), free_port(), free_port()
        self.sockets = tmp / "s"
        self.folder = tmp / "manifests"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[Parts, Controller]]:
    p = Parts(tmp_path)
    private_dir(p.sockets)
    p.folder.mkdir()
    write_manifests(p.folder, f"http://127.0.0.1:{p.mock}")
    mock = p.spawn("mock", [*PY, "mock-llm", "--port", str(p.mock), "--require-key", PROVIDER])
    render = RenderSettings(listen_port=p.port, admin_port=p.admin, extproc_sockets=(str(p.sockets / "extproc.sock"),))
    ctl = Controller(
        ControllerSettings(
            render=render, xds_socket=str(p.sockets / "xds.sock"), policy_socket=str(p.sockets / "policy.sock"),
            metrics_port=0, manifests=p.folder, ack_timeout=3.0, health_interval=0,
        )
    )
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{p.mock}/healthz", (200,), 30, mock)
        await ctl.start()
        task = asyncio.create_task(ctl.run_file_mode(p.folder, stop))
        ext = p.spawn("extproc", [*PY, "extproc", "--port", "0", "--socket", str(p.sockets / "extproc.sock"),
                                  "--metrics-port", str(p.metrics), "--policy-server", f"unix:{p.sockets / 'policy.sock'}"])
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{p.metrics}/healthz", (200,), 30, ext)
        (p.tmp / "envoy.json").write_text(json.dumps(ads_bootstrap(render, "", 0, xds_socket=str(p.sockets / "xds.sock"))))
        envoy = p.spawn("envoy", [envoy_binary(), "-c", str(p.tmp / "envoy.json"), "--log-level", "warning", "--disable-hot-restart"])
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{p.port}/v1/models", (200, 401), 30, envoy)
        yield p, ctl
    finally:
        stop.set()
        if task is not None:
            await task
        await ctl.stop()
        p.stop()


async def _status(p: Parts, key: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"http://127.0.0.1:{p.port}/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key}"})
    return r.status_code, r.json()


async def _until(p: Parts, key: str, want: int, seconds: float = 20) -> Any:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        status, body = await _status(p, key)
        if status == want:
            return body
        assert asyncio.get_running_loop().time() < deadline, f"still {status} {body}\n{p.logs()}"
        await asyncio.sleep(0.2)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def test_a_refused_native_program_leaves_every_call_to_extproc(parts: tuple[Parts, Controller], monkeypatch: pytest.MonkeyPatch) -> None:
    p, ctl = parts
    await _until(p, GAMMA, 200)  # served natively (tests/dataplane/test_native_path.py)

    def unloadable_without_gamma(program: str) -> dict[str, Any]:
        # The program without GAMMA's key (the new policy's) is one Envoy's Lua filter refuses.
        if _digest(ALPHA) in program and _digest(GAMMA) not in program:
            program += "\nthis is not Lua ("
        return native_extension(program)

    monkeypatch.setattr(app, "native_extension", unloadable_without_gamma)
    nacks = ctl.xds.nacks
    (p.folder / "secrets.yaml").write_text(secrets(with_gamma=False))
    body = await _until(p, GAMMA, 401)  # Envoy's old table would still let it through natively
    assert body["error"]["code"] == "invalid_api_key"
    assert ctl.xds.nacks > nacks
    before = await _streams(p)
    status, _ = await _status(p, ALPHA)
    assert status == 200 and await _streams(p) > before  # the other keys still work, through extproc


async def _streams(p: Parts) -> int:
    """ext_proc streams Envoy opened so far (every ext_proc filter)."""
    async with httpx.AsyncClient(timeout=5) as c:
        text = (await c.get(f"http://127.0.0.1:{p.admin}/stats?filter=streams_started")).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if "ext_proc" in line and line.strip())
