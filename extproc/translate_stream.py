"""OpenAI <-> Anthropic translation of SSE streams.

The stream classes take upstream SSE bytes split anywhere and return translated bytes as soon as
each upstream frame is complete; ``finish()`` closes the stream properly even if the upstream
stopped early. An upstream error event becomes the client API's error frame
(``extproc.translate_errors``).

Each upstream frame is parsed once, and that one parse also yields what the gateway meters (the
``extproc.readers.StreamReader`` contract): ``usage`` (None until the provider reported some),
``model`` (the model the *provider* named; the frames written carry the client's name),
``text`` (the reply text, for session history) and ``done`` (the upstream ended cleanly).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from extproc.sse import SSEParser, encode_event
from extproc.translate import FINISH_TO_STOP, STOP_TO_FINISH, openai_usage
from extproc.translate_errors import error_to_anthropic, error_to_openai
from extproc.usage import Usage, anthropic_input_tokens

__all__ = ["AnthropicToOpenAIStream", "OpenAIToAnthropicStream"]

Json = dict[str, Any]

_DONE = b"data: [DONE]\n\n"


class AnthropicToOpenAIStream:
    """Anthropic message events in, ``chat.completion.chunk`` frames out."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self._parser = SSEParser()
        self._model = model
        self._include_usage = include_usage
        self._created = int(time.time())
        self._head = b""
        # OpenAI sends "usage": null on every chunk but the last when include_usage is on.
        self._usage_tail = b',"usage":null}' if include_usage else b"}"
        self._tail = b',"logprobs":null,"finish_reason":null}]' + self._usage_tail
        self._set_id("chatcmpl-" + uuid.uuid4().hex)
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._input = self._output = 0
        self._reported = False  # whether the provider sent any usage
        self._finished = self._done = False
        self._text: list[str] = []
        self.model = ""
        self.done = False

    @property
    def usage(self) -> Usage | None:
        return Usage(self._input, self._output) if self._reported else None

    @property
    def text(self) -> str:
        return "".join(self._text)

    def _set_id(self, chunk_id: str) -> None:
        # Every chunk shares id/created/model, so that prefix is serialised once per stream and
        # a text delta costs one small orjson.dumps.
        self._id = chunk_id
        self._head = orjson.dumps({"id": chunk_id, "object": "chat.completion.chunk", "created": self._created, "model": self._model})[:-1] + b',"choices":[{"index":0,"delta":'

    def _chunk(self, delta: Json) -> bytes:
        return b"data: " + self._head + orjson.dumps(delta) + self._tail + b"\n\n"

    def feed(self, chunk: bytes) -> bytes:
        out = [self._event(ev.data) for ev in self._parser.feed(chunk) if ev.data]
        return b"".join(out)

    def finish(self) -> bytes:
        return self._close()

    def _close(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        out = b""
        if self._include_usage and self._finished:
            u = {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model,
                 "choices": [], "usage": openai_usage(Usage(self._input, self._output))}
            out = b"data: " + orjson.dumps(u) + b"\n\n"
        return out + _DONE

    def _event(self, data: bytes) -> bytes:
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(ev, dict):
            return b""
        kind = ev.get("type")
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text", "")
                if isinstance(text, str):
                    self._text.append(text)
                return self._chunk({"content": text})
            if dtype == "input_json_delta" and ev.get("index") in self._tools:
                call = {"index": self._tools[ev["index"]], "function": {"arguments": delta.get("partial_json", "")}}
                return self._chunk({"tool_calls": [call]})
            return b""  # thinking/signature/citations deltas have no chat-completions form
        if kind == "message_start":
            msg = ev.get("message") or {}
            if msg.get("id"):
                self._set_id("chatcmpl-" + str(msg["id"]).removeprefix("msg_"))
            if isinstance(msg.get("model"), str):
                self.model = msg["model"]
            if isinstance(msg.get("usage"), dict):
                self._input = anthropic_input_tokens(msg["usage"])
                self._reported = True
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                idx = self._tools[ev.get("index", 0)] = len(self._tools)
                call = {"index": idx, "id": block.get("id", ""), "type": "function",
                        "function": {"name": block.get("name", ""), "arguments": ""}}
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                self._text.append(str(block["text"]))
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "message_delta":
            u = ev.get("usage") or {}
            if u:
                self._reported = True
            self._output = int(u.get("output_tokens") or self._output)
            self._input = anthropic_input_tokens(u) or self._input
            stop = (ev.get("delta") or {}).get("stop_reason")
            self._finished = True
            finish = orjson.dumps(STOP_TO_FINISH.get(stop or "end_turn", "stop"))
            tail = b',"logprobs":null,"finish_reason":' + finish + b"}]" + self._usage_tail
            return b"data: " + self._head + b"{}" + tail + b"\n\n"
        if kind == "message_stop":
            self.done = True
            return self._close()
        if kind == "error":
            return b"data: " + error_to_openai(500, data) + b"\n\n"
        return b""  # ping, content_block_stop


class OpenAIToAnthropicStream:
    """``chat.completion.chunk`` frames (include_usage forced upstream) in, Anthropic events out."""

    def __init__(self, model: str) -> None:
        self._parser = SSEParser()
        self._model = model
        self._id = "msg_" + uuid.uuid4().hex
        self._started = self._ended = False
        self._block = -1  # index of the open content block, -1 when none
        self._block_kind = ""  # "text" or the OpenAI tool index as a string
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index
        self._next_block = 0
        self._stop: str | None = None
        self._usage: Usage | None = None
        self._text: list[str] = []
        self.model = ""
        self.done = False

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def text(self) -> str:
        return "".join(self._text)

    @staticmethod
    def _ev(kind: str, payload: Json) -> bytes:
        return encode_event(orjson.dumps(payload), kind)

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for ev in self._parser.feed(chunk):
            if ev.data:
                self._frame(ev.data, out)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        self._end(out)
        return b"".join(out)

    def _start(self, out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        msg: Json = {"id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        out.append(self._ev("message_start", {"type": "message_start", "message": msg}))
        out.append(b'event: ping\ndata: {"type":"ping"}\n\n')

    def _open(self, kind: str, block: Json, out: list[bytes]) -> int:
        self._close_block(out)
        self._block, self._block_kind = self._next_block, kind
        self._next_block += 1
        out.append(self._ev("content_block_start", {"type": "content_block_start", "index": self._block, "content_block": block}))
        return self._block

    def _close_block(self, out: list[bytes]) -> None:
        if self._block >= 0:
            out.append(self._ev("content_block_stop", {"type": "content_block_stop", "index": self._block}))
            self._block, self._block_kind = -1, ""

    def _end(self, out: list[bytes]) -> None:
        if self._ended:
            return
        self._start(out)
        self._close_block(out)
        self._ended = True
        u = self._usage or Usage()
        delta = {"type": "message_delta", "delta": {"stop_reason": self._stop, "stop_sequence": None},
                 "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens}}
        out.append(self._ev("message_delta", delta))
        out.append(self._ev("message_stop", {"type": "message_stop"}))

    def _frame(self, data: bytes, out: list[bytes]) -> None:
        if data == b"[DONE]":
            self.done = True
            self._end(out)
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict) or self._ended:
            return
        if not self.model and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if "error" in obj and "choices" not in obj:
            # An Anthropic stream ends at its error event: nothing may follow it.
            self._ended = True
            out.append(encode_event(error_to_anthropic(500, data), "error"))
            return
        self._start(out)
        for choice in obj.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text and isinstance(text, str):
                self._text.append(text)
                if self._block_kind != "text":
                    self._open("text", {"type": "text", "text": ""}, out)
                out.append(self._ev("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                            "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call, out)
            if choice.get("finish_reason"):
                self._stop = FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")
                self._close_block(out)
        u = obj.get("usage")
        if isinstance(u, dict):
            self._usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
            if self._stop is not None:
                self.done = True
                self._end(out)  # the usage chunk is the last one; don't wait for [DONE]

    def _tool_delta(self, call: Json, out: list[bytes]) -> None:
        oi = call.get("index", 0)
        fn = call.get("function") or {}
        if oi not in self._tools:
            block = {"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""), "input": {}}
            self._tools[oi] = self._open(str(oi), block, out)
        elif self._block_kind != str(oi):
            return  # Anthropic blocks cannot interleave; OpenAI never interleaves tool calls
        args = fn.get("arguments")
        if args:
            out.append(self._ev("content_block_delta", {"type": "content_block_delta", "index": self._tools[oi],
                                                        "delta": {"type": "input_json_delta", "partial_json": args}}))
