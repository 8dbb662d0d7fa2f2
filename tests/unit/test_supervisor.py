"""The standalone supervisor's decisions: restart a dead child with growing delays, say so, give up
on a crash loop; and ``crdgol up``'s port check tells a listener from connections in TIME_WAIT."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from crdgol.stack import free_port
from crdgol.supervisor import Backoff, Supervisor
from crdgol.up import _free


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeStack:
    """Children that are real (short-lived) processes, so ``poll`` and return codes are real."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    spawned: list[str] = field(default_factory=list)
    exit_code: int = 0

    def start(self, name: str, code: int | None = None) -> subprocess.Popen[bytes]:
        script = "import time; time.sleep(60)" if code is None else f"raise SystemExit({code})"
        proc = subprocess.Popen([sys.executable, "-c", script])
        self.procs[name] = proc
        return proc

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        self.spawned.append(name)
        return self.start(name, self.exit_code)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def stack() -> FakeStack:
    s = FakeStack()
    yield s  # type: ignore[misc]
    s.close()


def test_a_dead_child_is_restarted_after_a_delay_that_doubles_while_it_keeps_dying(stack: FakeStack) -> None:
    clock, said = Clock(), []
    stack.start("extproc", code=None)
    stack.start("controller", code=3)
    stack.procs["controller"].wait()
    sup = Supervisor(stack, said.append, Backoff(initial=0.2, cap=1.0, healthy_after=30, give_up=10), clock=clock)
    sup.tick()
    assert said == ["crdgol up: controller exited with status 3; restarting it in 0.2s"]
    assert stack.spawned == []
    clock.now += 0.2
    sup.tick()
    assert stack.spawned == ["controller"]
    assert said[-1].startswith("crdgol up: controller restarted (pid ") and said[-1].endswith("restart 1)")
    delays = []
    stack.exit_code = 1  # it keeps dying at once
    for _ in range(4):
        stack.procs["controller"].wait()
        clock.now += 0.05
        sup.tick()
        delays.append(said[-1].rsplit(" in ", 1)[1])
        clock.now += 5
        sup.tick()
    assert delays == ["0.4s", "0.8s", "1.0s", "1.0s"]  # doubling, capped
    assert stack.procs["extproc"].poll() is None and "extproc" not in stack.spawned  # the healthy one is left alone


def test_a_child_that_stayed_up_long_enough_starts_over_from_the_shortest_delay(stack: FakeStack) -> None:
    clock, said = Clock(), []
    sup = Supervisor(stack, said.append, Backoff(initial=0.2, healthy_after=30), clock=clock)
    stack.start("envoy", code=1)
    stack.procs["envoy"].wait()
    sup.tick()
    clock.now += 0.2
    sup.tick()
    stack.procs["envoy"].wait()
    clock.now += 0.1
    sup.tick()
    assert said[-1].endswith("in 0.4s")
    clock.now += 1
    stack.exit_code = 0
    sup.tick()
    stack.procs["envoy"].wait()
    clock.now += 60  # it ran a minute before dying: a fresh incident
    sup.tick()
    assert said[-1] == "crdgol up: envoy exited with status 0; restarting it in 0.2s"


def test_a_crash_loop_is_given_up_on_and_reported(stack: FakeStack) -> None:
    clock, said = Clock(), []
    sup = Supervisor(stack, said.append, Backoff(initial=0.1, cap=0.1, give_up=3), clock=clock)
    stack.exit_code = 2
    stack.start("mock-llm", code=2)
    for _ in range(10):
        stack.procs["mock-llm"].wait()
        sup.tick()
        clock.now += 0.1
        sup.tick()
    assert stack.spawned == ["mock-llm"] * 3
    assert said[-1] == "crdgol up: mock-llm exited with status 2 3 times in a row; not restarting it"
    assert sup.failed == ["mock-llm"]


def test_a_killed_child_is_reported_by_its_signal(stack: FakeStack) -> None:
    said: list[str] = []
    proc = stack.start("extproc")
    proc.kill()
    proc.wait()
    Supervisor(stack, said.append, clock=Clock()).tick()
    assert said == ["crdgol up: extproc exited with signal 9; restarting it in 0.2s"]


def test_the_port_check_refuses_a_listener_but_not_connections_in_time_wait() -> None:
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    assert not _free("127.0.0.1", port)
    # The server side closes first, as Envoy does when a stack stops: its end stays in TIME_WAIT.
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()
    client.recv(1)
    client.close()
    listener.close()
    with socket.socket() as plain, pytest.raises(OSError):  # the state the old check tripped on
        plain.bind(("127.0.0.1", port))
    assert _free("127.0.0.1", port)
