"""``crdgol up`` keeps the gateway up: a child killed with -9 is restarted and the gateway answers
again within seconds; Ctrl-C stops everything; and a new ``crdgol up`` on the same ports starts at
once, even with the last run's connections still in TIME_WAIT."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from crdgol.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def said(self) -> str:
        return self.stderr.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """The stack's processes by role, found through /proc (children of ``crdgol up``)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid != self.proc.pid:
                continue
            if argv[0].endswith(b"envoy"):
                found["envoy"] = int(entry.name)
            elif b"crdgol.cli" in argv:
                found[argv[argv.index(b"crdgol.cli") + 1].decode()] = int(entry.name)
        return found


def answered_within(up: Up, seconds: float) -> float:
    """Seconds until the gateway answers a good request with 200 again."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if httpx.post(up.url, json=BODY, headers=HEADERS, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no 200 within {seconds}s; crdgol up said:\n{up.said()[-3000:]}")


def start_up(folder: Path, port: int, mock_port: int, metrics_port: int, log: Path) -> Up:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "crdgol.cli", "up", "--manifests", str(folder), "--port", str(port),
                "--mock-port", str(mock_port), "--metrics-port", str(metrics_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "CRDGOL_LOG_LEVEL": "warning"},
        )
    up = Up(proc, port, log)
    answered_within(up, 60)
    return up


def stop_up(up: Up) -> int:
    up.proc.send_signal(signal.SIGINT)
    return up.proc.wait(60)


@pytest.fixture
def ports(tmp_path: Path) -> Iterator[tuple[Path, int, int, int]]:
    folder = tmp_path / "quickstart"
    shutil.copytree(ROOT / "examples" / "quickstart", folder)
    mock_port = free_port()
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{mock_port}"))
    yield folder, free_port(), mock_port, free_port()


def time_wait_on(port: int) -> int:
    """Connections in TIME_WAIT whose local port is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "06" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_up_restarts_each_killed_child_and_restarts_at_once_on_the_same_ports(ports: tuple[Path, int, int, int], tmp_path: Path) -> None:
    folder, port, mock_port, metrics_port = ports
    up = start_up(folder, port, mock_port, metrics_port, tmp_path / "up-1.log")
    try:
        assert set(up.children()) == {"envoy", "extproc", "controller", "mock-llm"}
        for name in ("extproc", "envoy", "controller", "mock-llm"):
            old = up.children()[name]
            os.kill(old, signal.SIGKILL)
            recovered = answered_within(up, 20)
            deadline = time.monotonic() + 20
            while up.children().get(name) in (None, old) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert up.children().get(name) not in (None, old), f"{name} was not restarted"
            assert f"{name} exited with signal 9; restarting it in" in up.said()
            assert recovered < 15, f"{name}: {recovered:.1f}s"
        answered_within(up, 20)
        assert "restarted (pid" in up.said()
        # Keep-alive connections open at shutdown: Envoy closes them, leaving TIME_WAIT on the port.
        clients = [httpx.Client() for _ in range(4)]
        for c in clients:
            assert c.post(up.url, json=BODY, headers=HEADERS, timeout=10).status_code == 200
        children = up.children()
        assert stop_up(up) == 0
        for c in clients:
            c.close()
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    assert "crdgol up: stopped" in up.said()
    assert not [name for name, pid in children.items() if Path(f"/proc/{pid}").exists()]
    assert time_wait_on(port) > 0  # the situation the old port check refused
    again = start_up(folder, port, mock_port, metrics_port, tmp_path / "up-2.log")
    try:
        assert "already in use" not in again.said()
    finally:
        assert stop_up(again) == 0
