"""Incremental Server-Sent-Events framing for streamed LLM responses.

Contract:

* ``SSEParser.feed(data)`` accepts bytes split at any offset and returns every frame completed so
  far, in order. A frame ends at a blank line (``\\n\\n``, ``\\r\\n\\r\\n`` or mixed ``\\n\\r\\n``).
* Each ``SSEEvent.raw`` is the exact bytes of its frame including the terminating blank line, so
  ``b"".join(e.raw for e in events) + parser.pending`` always equals everything fed. Callers that do
  not need to change a frame forward ``raw`` untouched.
* Frames with no ``data:`` line (comments such as ``: keep-alive``) are still returned, with
  ``data == b""``, so pass-through stays byte-exact; consumers skip them.
* ``event`` is ``""`` when the frame has no ``event:`` field (browsers would call it "message").
* CR-only line endings are not supported: no LLM provider emits them, and supporting them would
  cost a second scan per frame on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser", "encode_event"]

_LF = 10
_CR = 13


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: bytes
    raw: bytes


class SSEParser:
    """Splits a byte stream into SSE frames without rescanning bytes it has already looked at."""

    __slots__ = ("_buf", "_scan")

    def __init__(self) -> None:
        self._buf = bytearray()
        # Offset in _buf from which to resume looking for a line feed: everything before it is
        # known not to complete a frame, so a byte-by-byte feed stays linear.
        self._scan = 0

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[SSEEvent]:
        buf = self._buf
        buf += data
        n = len(buf)
        events: list[SSEEvent] = []
        start = 0
        pos = self._scan
        # Walk line feeds; a frame ends where a line feed is followed by an empty line. Frames
        # have two or three lines, so this loop runs a handful of times per frame while
        # bytearray.find does the byte scanning in C.
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                pos = n
                break
            nxt = nl + 1
            if nxt >= n:
                pos = nl  # cannot tell yet whether an empty line follows
                break
            c = buf[nxt]
            if c == _LF:
                end = nxt + 1
            elif c == _CR:
                if nxt + 1 >= n:
                    pos = nl
                    break
                if buf[nxt + 1] != _LF:
                    pos = nxt
                    continue
                end = nxt + 2
            else:
                pos = nxt
                continue
            events.append(_parse(bytes(buf[start:end])))
            start = pos = end
        if start:
            del buf[:start]  # one compaction per feed, not per frame
            pos -= start
        self._scan = pos
        return events


def _parse(raw: bytes) -> SSEEvent:
    # Fast path: the overwhelmingly common single-line frame ``data: {...}\n\n``.
    if raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.find(b"\n", 6) == len(raw) - 2:
        return SSEEvent("", raw[6:-2], raw)
    event = ""
    parts: list[bytes] = []
    for line in raw.splitlines():
        if not line or line[0] == 0x3A:  # blank line or ":" comment
            continue
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            parts.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    data = parts[0] if len(parts) == 1 else b"\n".join(parts)
    return SSEEvent(event, data, raw)


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE frame; multi-line data becomes several ``data:`` lines as the spec requires."""
    if b"\n" in data or b"\r" in data:
        body = b"".join(b"data: " + line + b"\n" for line in data.splitlines())
    else:
        body = b"data: " + data + b"\n"
    if event:
        return b"event: " + event.encode() + b"\n" + body + b"\n"
    return body + b"\n"
