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


def gone_within(pids: dict[str, int], seconds: float) -> list[str]:
    """The names whose process still exists after ``seconds`` (zombies count as gone)."""
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [n for n in alive if _running(pids[n])]
    return alive


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_up_takes_its_children_with_it_and_a_closed_terminal_stops_it_cleanly(tmp_path: Path) -> None:
    # kill -9 (the OOM killer, a crashed terminal multiplexer): nothing can drain, but nothing
    # may keep running either, or the next `crdgol up` finds its ports taken.
    folder, port, mock_port, metrics_port = quickstart_copy(tmp_path)
    up = start_up(folder, port, mock_port, metrics_port, tmp_path / "up-1.log")
    children = up.children()
    try:
        assert set(children) >= {"envoy", "extproc", "controller", "mock-llm"}, children
        up.proc.kill()
        up.proc.wait(10)
        assert gone_within(children, 20) == [], f"outlived crdgol up: {up.story()}"
    finally:
        for pid in children.values():
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    # The terminal closes (SIGHUP): the same clean stop as Ctrl-C, on ports free again at once.
    again = start_up(folder, port, mock_port, metrics_port, tmp_path / "up-2.log")
    children = again.children()
    try:
        again.proc.send_signal(signal.SIGHUP)
        assert again.proc.wait(60) == 0
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
    assert "crdgol up: stopped" in again.said()
    assert gone_within(children, 5) == []
