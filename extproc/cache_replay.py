"""Cached answers between their two forms: a stream turned into the whole response, and the whole
response played back as a stream.

The cache stores one form, the complete non-streamed body in the client's API (an OpenAI
``chat.completion`` or an Anthropic ``message``), so a streamed request can be answered from an
entry a non-streamed one stored and the other way round.

* ``StreamAssembler(api)`` is fed the SSE bytes the client received; ``result()`` is the whole
  response they add up to, or None unless the stream reached its end cleanly (OpenAI: a finish
  reason and ``[DONE]``; Anthropic: ``message_stop``) with no error event in it.
* ``replay(api, doc, include_usage)`` is the SSE stream of the response ``doc``, framed as the
  provider frames it (``extproc.sse.encode_event``), so the official SDKs read it as any stream:
  OpenAI: role, content, tool calls, finish reason, the usage chunk when asked for, ``[DONE]``;
  Anthropic: ``message_start``, each content block's start, delta and stop, ``message_delta``
  (stop reason, usage), ``message_stop``.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.policy import Api
from extproc.sse import SSEParser, encode_event

__all__ = ["StreamAssembler", "replay"]

Json = dict[str, Any]


class StreamAssembler:
    def __init__(self, api: Api) -> None:
        self.api = api
        self._parser = SSEParser()
        self._failed = False
        self._done = False
        # OpenAI
        self._head: Json = {}
        self._text: list[str] = []
        self._role = "assistant"
        self._tools: dict[int, Json] = {}
        self._finish: str | None = None
        self._usage: Any = None
        # Anthropic
        self._message: Json = {}
        self._blocks: dict[int, Json] = {}
        self._partial: dict[int, list[str]] = {}

    def feed(self, chunk: bytes) -> None:
        if self._failed or self._done:
            return
        for ev in self._parser.feed(chunk):
            if not ev.data:
                continue
            if ev.data == b"[DONE]":
                self._done = self._finish is not None
                self._failed = not self._done
                return
            try:
                obj = orjson.loads(ev.data)
            except orjson.JSONDecodeError:
                self._failed = True
                return
            if not isinstance(obj, dict) or "error" in obj or obj.get("type") == "error":
                self._failed = True
                return
            if self.api is Api.OPENAI:
                self._openai(obj)
            else:
                self._anthropic(obj)

    def _openai(self, obj: Json) -> None:
        if not self._head:
            self._head = {k: obj.get(k) for k in ("id", "created", "model", "system_fingerprint") if k in obj}
        if obj.get("usage"):
            self._usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                self._failed = True  # several choices are never cached
                return
            delta = choice.get("delta") or {}
            if isinstance(delta.get("role"), str):
                self._role = delta["role"]
            if isinstance(delta.get("content"), str):
                self._text.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                tool = self._tools.setdefault(int(call.get("index", 0)), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                if call.get("id"):
                    tool["id"] = call["id"]
                fn = call.get("function") or {}
                tool["function"]["name"] += fn.get("name") or ""
                tool["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    def _anthropic(self, obj: Json) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            self._message = dict(obj.get("message") or {})
        elif kind == "content_block_start":
            i = int(obj.get("index", 0))
            self._blocks[i] = dict(obj.get("content_block") or {})
            self._partial[i] = []
        elif kind == "content_block_delta":
            i = int(obj.get("index", 0))
            block, delta = self._blocks.get(i), obj.get("delta") or {}
            if block is None:
                self._failed = True
                return
            match delta.get("type"):
                case "text_delta":
                    block["text"] = block.get("text", "") + str(delta.get("text", ""))
                case "input_json_delta":
                    self._partial[i].append(str(delta.get("partial_json", "")))
                case "thinking_delta":
                    block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
                case "signature_delta":
                    block["signature"] = block.get("signature", "") + str(delta.get("signature", ""))
        elif kind == "content_block_stop":
            i = int(obj.get("index", 0))
            if self._partial.get(i) and i in self._blocks:
                try:
                    self._blocks[i]["input"] = orjson.loads("".join(self._partial[i]))
                except orjson.JSONDecodeError:
                    self._failed = True
        elif kind == "message_delta":
            delta = obj.get("delta") or {}
            self._message.update({k: v for k, v in delta.items() if k in ("stop_reason", "stop_sequence")})
            usage = {**(self._message.get("usage") or {}), **(obj.get("usage") or {})}
            self._message["usage"] = usage
        elif kind == "message_stop":
            self._done = bool(self._message) and self._message.get("stop_reason") is not None

    def result(self, usage: Json | None = None) -> Json | None:
        """The whole response (None unless the stream ended cleanly); ``usage`` replaces the
        stream's own (an OpenAI usage chunk the client did not ask for was stripped from it)."""
        if self._failed or not self._done:
            return None
        if self.api is Api.OPENAI:
            message: Json = {"role": self._role, "content": "".join(self._text) if self._text or not self._tools else None}
            if self._tools:
                message["tool_calls"] = [self._tools[i] for i in sorted(self._tools)]
            doc: Json = {**self._head, "object": "chat.completion"}
            doc["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": self._finish}]
            if usage is not None or self._usage:
                doc["usage"] = usage if usage is not None else self._usage
            return doc
        out = {**self._message, "content": [self._blocks[i] for i in sorted(self._blocks)]}
        if usage is not None:
            out["usage"] = usage
        return out


def replay(api: Api, doc: Json, include_usage: bool = False) -> bytes:
    return _replay_openai(doc, include_usage) if api is Api.OPENAI else _replay_anthropic(doc)


def _openai_frame(head: Json, delta: Json, finish: str | None = None) -> bytes:
    chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return encode_event(orjson.dumps(chunk))


def _replay_openai(doc: Json, include_usage: bool) -> bytes:
    head = {"id": doc.get("id", ""), "object": "chat.completion.chunk", "created": doc.get("created", 0), "model": doc.get("model", "")}
    choice = (doc.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    out = [_openai_frame(head, {"role": message.get("role", "assistant"), "content": ""})]
    if message.get("content"):
        out.append(_openai_frame(head, {"content": message["content"]}))
    calls = message.get("tool_calls") or []
    if calls:
        out.append(_openai_frame(head, {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
    out.append(_openai_frame(head, {}, choice.get("finish_reason") or "stop"))
    if include_usage and doc.get("usage"):
        out.append(encode_event(orjson.dumps({**head, "choices": [], "usage": doc["usage"]})))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _event(kind: str, payload: Json) -> bytes:
    return encode_event(orjson.dumps({"type": kind, **payload}), kind)


def _replay_anthropic(doc: Json) -> bytes:
    usage = doc.get("usage") or {}
    start = {k: v for k, v in doc.items() if k not in ("content", "stop_reason", "stop_sequence")}
    start.update(content=[], stop_reason=None, stop_sequence=None, usage={**usage, "output_tokens": 0})
    out = [_event("message_start", {"message": start}), _event("ping", {})]
    for i, block in enumerate(doc.get("content") or []):
        kind = block.get("type")
        if kind == "text":
            out.append(_event("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}))
            out.append(_event("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": block.get("text", "")}}))
        elif kind == "tool_use":
            out.append(_event("content_block_start", {"index": i, "content_block": {**block, "input": {}}}))
            partial = orjson.dumps(block.get("input", {})).decode()
            out.append(_event("content_block_delta", {"index": i, "delta": {"type": "input_json_delta", "partial_json": partial}}))
        elif kind == "thinking":
            out.append(_event("content_block_start", {"index": i, "content_block": {"type": "thinking", "thinking": ""}}))
            out.append(_event("content_block_delta", {"index": i, "delta": {"type": "thinking_delta", "thinking": block.get("thinking", "")}}))
            if block.get("signature"):
                out.append(_event("content_block_delta", {"index": i, "delta": {"type": "signature_delta", "signature": block["signature"]}}))
        else:
            out.append(_event("content_block_start", {"index": i, "content_block": block}))
        out.append(_event("content_block_stop", {"index": i}))
    delta = {"stop_reason": doc.get("stop_reason") or "end_turn", "stop_sequence": doc.get("stop_sequence")}
    out.append(_event("message_delta", {"delta": delta, "usage": {"output_tokens": usage.get("output_tokens", 0)}}))
    out.append(_event("message_stop", {}))
    return b"".join(out)
