"""Single flight: identical cache misses in one extproc wait for one provider call, not one each.

Contract
--------
* ``Flights.lead(key)`` opens a flight for ``key`` and makes the caller its leader (it goes to
  the provider and will store the answer), or returns None when one is already open (or
  coalescing is off: ``wait`` <= 0). An open flight closes after ``wait`` seconds at the latest,
  whatever its leader does: a leader whose response never comes back to this process (handed to
  another replica, a lost response stream) cannot hold anyone longer than that.
* ``Flights.follow(key)`` waits for the open flight of ``key``, at most until it closes, and
  returns what its leader stored, or None: no flight open, the leader failed or stored nothing,
  or the time ran out. The follower then goes to the provider as it would have without a flight.
  A follower that is cancelled (its client left) does not disturb the flight or other followers.
* ``Flights.land(flight, value)`` closes the leader's own flight with what it stored (None:
  nothing). It runs at most once per flight (later calls, the timer's included, do nothing) and
  never closes a newer flight of the same key.

Keys are exact cache keys (``extproc.cache_key``), which carry the tenant scope: only requests
that could share a stored answer share a flight. Flights are per process; replicas sharing Redis
each let one request through.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

__all__ = ["Flight", "Flights"]

T = TypeVar("T")


class Flight(Generic[T]):
    __slots__ = ("future", "key", "timer")

    def __init__(self, key: str, future: asyncio.Future[T | None]) -> None:
        self.key = key
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


class Flights(Generic[T]):
    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._open: dict[str, Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, key: str) -> bool:
        return key in self._open

    def open_flight(self, key: str) -> Flight[T] | None:
        """The open flight of ``key``, for a leader's response handled by another stream (the
        one-message path's response side) to land."""
        return self._open.get(key)

    def lead(self, key: str) -> Flight[T] | None:
        if self.wait <= 0 or key in self._open:
            return None
        loop = asyncio.get_running_loop()
        flight: Flight[T] = Flight(key, loop.create_future())
        flight.timer = loop.call_later(self.wait, self.land, flight, None)
        self._open[key] = flight
        return flight

    async def follow(self, key: str) -> T | None:
        flight = self._open.get(key)
        if flight is None:
            return None
        # Shielded: a follower's cancellation must not cancel the future the others wait on.
        return await asyncio.shield(flight.future)

    def land(self, flight: Flight[T], value: T | None) -> None:
        if self._open.get(flight.key) is flight:
            del self._open[flight.key]
        if flight.timer is not None:
            flight.timer.cancel()
        if not flight.future.done():
            flight.future.set_result(value)
