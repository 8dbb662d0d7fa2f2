"""Token usage and reply text, read from responses of either API, buffered or streamed.

Contract:

* ``usage_of`` / ``text_of`` read an already parsed non-streaming response (``usage_from_json`` /
  ``text_from_json`` parse the bytes first); they never raise.
  Anthropic's cached prompt tokens (``cache_creation_input_tokens``, ``cache_read_input_tokens``)
  are counted in ``input_tokens`` so both APIs mean "every prompt token", as OpenAI's
  ``prompt_tokens`` does.
* ``StreamTap`` watches a streamed response in the client's format. Without stripping it forwards
  each chunk as-is (zero copy, zero delay) and only observes. With ``strip_usage`` (OpenAI only:
  the gateway forced ``stream_options.include_usage`` to meter a client that did not ask for it)
  it drops the usage-only chunk and the ``"usage"`` keys of other chunks, re-serialising only
  those frames; it then holds back at most the incomplete trailing frame. Each frame is parsed
  once, for usage, the reply text and the ``model`` the provider named (first frame that names one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.policy import Api
from extproc.sse import SSEParser

__all__ = ["StreamTap", "Usage", "text_from_json", "text_of", "usage_from_json", "usage_of"]


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def anthropic_input_tokens(u: dict[str, Any]) -> int:
    """All prompt tokens of an Anthropic usage object, cached ones included."""
    return (
        _int(u.get("input_tokens"))
        + _int(u.get("cache_creation_input_tokens"))
        + _int(u.get("cache_read_input_tokens"))
    )


def _usage_of(api: Api, u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    if api is Api.OPENAI:
        return Usage(_int(u.get("prompt_tokens")), _int(u.get("completion_tokens")))
    return Usage(anthropic_input_tokens(u), _int(u.get("output_tokens")))


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def usage_of(api: Api, doc: Any) -> Usage | None:
    """The usage block of a parsed response body in ``api``; None when there is none."""
    return _usage_of(api, doc.get("usage")) if isinstance(doc, dict) else None


def usage_from_json(api: Api, body: bytes) -> Usage | None:
    return usage_of(api, _loads(body))


def text_from_json(api: Api, body: bytes) -> str:
    return text_of(api, _loads(body))


def text_of(api: Api, obj: Any) -> str:
    """The reply text of a parsed response body in ``api`` ("" when it has none)."""
    if not isinstance(obj, dict):
        return ""
    if api is Api.OPENAI:
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return ""
        msg = choices[0].get("message")
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # content parts, as some compatible servers return
            return "".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        return ""
    blocks = obj.get("content")
    if not isinstance(blocks, list):
        return ""
    return "".join(
        b["text"]
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    )


class StreamTap:
    """Observes a client-format stream: usage, reply text, and whether it finished cleanly."""

    __slots__ = ("_api", "_parser", "_strip", "_text", "done", "model", "usage")

    def __init__(self, api: Api, strip_usage: bool) -> None:
        self._api = api
        # Anthropic streams carry usage by design, so there is never anything to strip there.
        self._strip = strip_usage and api is Api.OPENAI
        self._parser = SSEParser()
        self._text: list[str] = []
        self.usage: Usage | None = None
        self.model = ""
        self.done = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def feed(self, chunk: bytes) -> bytes:
        events = self._parser.feed(chunk)
        if self._api is Api.ANTHROPIC:
            for ev in events:
                self._anthropic(ev.data)
            return chunk
        if not self._strip:
            for ev in events:
                self._openai(ev.data)
            return chunk
        out: list[bytes] = []
        for ev in events:
            replacement = self._openai(ev.data)
            out.append(ev.raw if replacement is None else replacement)
        return b"".join(out)

    def finish(self) -> bytes:
        # Unterminated trailing bytes are forwarded as they are: the client should see exactly
        # how the upstream stream ended.
        return self._parser.pending if self._strip else b""

    def _openai(self, data: bytes) -> bytes | None:
        """Observe one frame; return replacement bytes for it (b"" to drop) or None to keep it."""
        if not data or data[0] != 0x7B:  # not a JSON object: "[DONE]", comments
            if data == b"[DONE]":
                self.done = True
            return None
        obj = _loads(data)
        if not isinstance(obj, dict):
            return None
        if not self.model:
            model = obj.get("model")
            if isinstance(model, str):
                self.model = model
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            c0 = choices[0]
            delta = c0.get("delta") if isinstance(c0, dict) else None
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str) and content:
                    self._text.append(content)
        if "usage" not in obj:
            return None
        u = obj["usage"]
        if u is not None:
            self.usage = _usage_of(Api.OPENAI, u) or self.usage
        if not self._strip:
            return None
        if u is not None and not choices:
            return b""  # the usage-only chunk the client never asked for
        del obj["usage"]
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _anthropic(self, data: bytes) -> None:
        if not data:
            return
        obj = _loads(data)
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str):
                    self._text.append(text)
        elif kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("model"), str):
                self.model = msg["model"]
            u = _usage_of(Api.ANTHROPIC, msg.get("usage") if isinstance(msg, dict) else None)
            if u is not None:
                self.usage = u
        elif kind == "message_delta":
            u = _usage_of(Api.ANTHROPIC, obj.get("usage"))
            if u is not None:
                prev = self.usage or Usage()
                # message_delta's counts are cumulative; newer API versions repeat input_tokens
                # there, older ones omit it (0 here), so a nonzero value wins.
                self.usage = Usage(
                    u.input_tokens or prev.input_tokens, u.output_tokens or prev.output_tokens
                )
        elif kind == "message_stop":
            self.done = True
