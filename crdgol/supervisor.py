"""Keep the standalone stack's children running: restart the one that died, with backoff, and say so.

``Supervisor.tick`` is called a few times a second by ``crdgol up``. A child that exited is
started again after a delay that doubles with each quick death (0.2 s, 0.4 s, ... up to 10 s) and
resets once the child has stayed up for ``healthy_after`` seconds. After ``give_up`` quick deaths
in a row the supervisor stops trying and reports it, so a child that cannot start (a bad flag, a
broken install) does not loop forever. What keeps the gateway answering meanwhile: Envoy keeps its
last xDS config and extproc its last policy while the controller is away; while extproc is away
Envoy answers 503 (fail closed).

The decisions are a pure function of exits and a clock (``Backoff``, ``Plan``), so they are tested
without processes; ``Supervisor`` applies them to a ``Stack``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.2
    factor: float = 2.0
    cap: float = 10.0
    healthy_after: float = 30.0  # a child up this long has recovered: the next death starts over
    give_up: int = 10  # quick deaths in a row before giving up

    def delay(self, quick_deaths: int) -> float:
        """Seconds to wait before restart number ``quick_deaths`` (1 = the first)."""
        return float(min(self.cap, self.initial * self.factor ** max(0, quick_deaths - 1)))


@dataclass(slots=True)
class Plan:
    """One child's restart state."""

    started: float
    quick_deaths: int = 0
    restart_at: float | None = None
    restarts: int = 0

    def exited(self, now: float, backoff: Backoff) -> float | None:
        """Record an exit; the delay before restarting, or None to give up."""
        self.quick_deaths = 1 if now - self.started >= backoff.healthy_after else self.quick_deaths + 1
        if self.quick_deaths > backoff.give_up:
            return None
        delay = backoff.delay(self.quick_deaths)
        self.restart_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        return self.restart_at is not None and now >= self.restart_at

    def restarted(self, now: float) -> None:
        self.started, self.restart_at = now, None
        self.restarts += 1


class Children(Protocol):
    """What the supervisor needs of a stack (``crdgol.stack.Stack`` is one)."""

    procs: dict[str, subprocess.Popen[bytes]]

    def respawn(self, name: str) -> subprocess.Popen[bytes]: ...


@dataclass
class Supervisor:
    stack: Children
    say: Callable[[str], None]
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.monotonic
    plans: dict[str, Plan] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # children given up on

    def tick(self) -> None:
        """Notice exits and restart what is due. Never raises for a child that fails to start."""
        now = self.clock()
        for name, proc in list(self.stack.procs.items()):
            plan = self.plans.setdefault(name, Plan(started=now))
            if name in self.failed:
                continue
            if plan.restart_at is None and proc.poll() is not None:
                delay = plan.exited(now, self.backoff)
                if delay is None:
                    self.failed.append(name)
                    self.say(f"crdgol up: {name} exited with {_code(proc.returncode)} {self.backoff.give_up} times in a row; not restarting it")
                    continue
                self.say(f"crdgol up: {name} exited with {_code(proc.returncode)}; restarting it in {delay:.1f}s")
            if plan.due(now):
                try:
                    new = self.stack.respawn(name)
                except OSError as exc:
                    self.say(f"crdgol up: could not restart {name}: {exc}")
                    plan.restart_at = None  # counted as another quick death at the next tick
                    plan.started = now
                    continue
                plan.restarted(now)
                self.say(f"crdgol up: {name} restarted (pid {new.pid}, restart {plan.restarts})")


def _code(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"signal {-returncode}"
    return f"status {returncode}"
