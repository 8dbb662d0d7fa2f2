"""What extproc holds at once, capped, and load shed before Envoy's fail-closed timeout.

Contract
--------
* **Streams.** At most ``max_streams`` gateway (downstream) ext_proc streams are open at once;
  the next request is answered 503 ``gateway_overloaded`` with ``Retry-After`` at its first
  message. Upstream (per-attempt) streams are not counted: each belongs to an admitted request.
* **Body bytes in flight.** Request and response bodies being processed are counted from the
  moment their message arrives until extproc has answered it. A request body that would take the
  total over ``max_body_bytes`` is refused with the same 503; a response body is never refused
  (its request was already answered by a provider), only counted.
* **Messages per stream.** A stream that sends more than ``max_messages`` messages (an endless
  response in streamed mode) is cut with a 503 (Envoy resets it; the charge rule charges it).
* **Event-loop lag.** A monitor measures how late the loop runs a timer; while it lags more than
  ``shed_lag`` seconds (default 0.5 s, a quarter of Envoy's 2 s message timeout) new requests are
  refused at their first message, so the ones already admitted finish well within the timeout.
* **Memory returns to baseline.** glibc's malloc is told to serve large blocks (bodies) with
  ``mmap`` at a fixed threshold (it otherwise raises the threshold after the first big free and
  keeps later bodies on a heap it never shrinks), and ``malloc_trim`` runs once a burst of body
  bytes has drained. Both are no-ops where glibc is absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from extproc.errors import Unavailable

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameters (malloc.h)
_M_ARENA_MAX = -8


@dataclass(frozen=True, slots=True)
class CapacitySettings:
    max_streams: int = 4096
    max_body_bytes: int = 64 * 1024 * 1024
    max_messages: int = 100_000
    shed_lag: float = 0.5
    lag_interval: float = 0.05
    # Trim the heap once this many body bytes passed through since the last trim and none are
    # held any more.
    trim_after_bytes: int = 8 * 1024 * 1024
    mmap_threshold: int = 256 * 1024
    trim_delay: float = 0.5


class Overloaded(Unavailable):
    code = "gateway_overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 - glibc only: probe before relying on it
        lib.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return lib


class Capacity:
    """Counters of what is held, shared by every stream of one extproc process."""

    def __init__(self, settings: CapacitySettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or CapacitySettings()
        self.clock = clock
        self.streams = 0
        self.body_bytes = 0
        self.lag = 0.0
        self.shed = 0  # requests refused for capacity, since start
        self._since_trim = 0
        self._trim_pending = False
        self._libc = _libc()

    def tune_malloc(self) -> bool:
        """Fix glibc's mmap threshold (bodies go back to the OS on free) and cap its arenas."""
        if self._libc is None:
            return False
        ok = bool(self._libc.mallopt(_M_MMAP_THRESHOLD, self.settings.mmap_threshold))
        self._libc.mallopt(_M_ARENA_MAX, 2)
        return ok

    # --- streams ---------------------------------------------------------------------------

    def open_stream(self) -> None:
        """Count a new gateway stream, or raise ``Overloaded`` (nothing is counted then)."""
        s = self.settings
        if self.streams >= s.max_streams:
            self.shed += 1
            raise Overloaded(f"the gateway is at capacity ({s.max_streams} requests in progress); retry shortly")
        if self.lag > s.shed_lag:
            self.shed += 1
            raise Overloaded(f"the gateway is overloaded (running {self.lag * 1000:.0f} ms behind); retry shortly")
        self.streams += 1

    def close_stream(self) -> None:
        self.streams -= 1

    # --- body bytes ---------------------------------------------------------------------------

    def take_request_body(self, n: int) -> None:
        """Hold ``n`` bytes of a request body, or raise ``Overloaded`` (nothing held then)."""
        limit = self.settings.max_body_bytes
        if n and self.body_bytes + n > limit:
            self.shed += 1
            raise Overloaded(
                f"the gateway is at capacity ({math.ceil(limit / 1048576)} MiB of request bodies in progress); retry shortly"
            )
        self.body_bytes += n

    def take_response_body(self, n: int) -> None:
        self.body_bytes += n

    def give(self, n: int) -> None:
        self.body_bytes -= n
        self._since_trim += n
        if self.body_bytes == 0 and self._since_trim >= self.settings.trim_after_bytes and not self._trim_pending:
            self._trim_pending = True
            with contextlib.suppress(RuntimeError):  # no running loop: trim now
                # A moment later: gRPC lets go of its buffers for the last messages only after
                # they are on the wire, and a burst often has a tail.
                asyncio.get_running_loop().call_later(self.settings.trim_delay, self._trim)
                return
            self._trim()

    def _trim(self, follow_up: bool = True) -> None:
        self._trim_pending = False
        if self.body_bytes:
            return  # a new burst started: trim when it drains
        self._since_trim = 0
        # Streams that ended by cancellation leave frames in reference cycles (traceback <->
        # frame) that hold their bodies until the cycle collector runs, which an idle process
        # may not do for a long time.
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if follow_up:
            # Once more when the last streams of the burst have been closed by Envoy and gRPC
            # has freed their calls (that happens after their answers, on Envoy's schedule).
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(self.settings.trim_delay * 4, self._trim, False)

    # --- event-loop lag ---------------------------------------------------------------------

    async def watch_lag(self) -> None:
        """Measure the loop's lateness forever (a task started by the server)."""
        interval = self.settings.lag_interval
        while True:
            before = self.clock()
            await asyncio.sleep(interval)
            late = self.clock() - before - interval
            # A single late tick counts at once; recovery is gradual, so shedding does not flap.
            self.lag = max(late, self.lag * 0.5)
