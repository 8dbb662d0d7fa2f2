"""``crdgol up`` keeps the gateway up: a child killed with -9 is restarted and the gateway answers
again within seconds; Ctrl-C stops everything; and a new ``crdgol up`` on the same ports starts at
once, even with the last run's connections still in TIME_WAIT."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.up_process import BODY, HEADERS, answered_within, quickstart_copy, start_up, stop_up


def time_wait_on(port: int) -> int:
    """Connections in TIME_WAIT whose local port is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "06" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_up_restarts_each_killed_child_and_restarts_at_once_on_the_same_ports(tmp_path: Path) -> None:
    folder, port, mock_port, metrics_port = quickstart_copy(tmp_path)
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
