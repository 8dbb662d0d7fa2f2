"""OpenAI Chat Completions <-> Anthropic Messages translation: requests, responses, errors, streams.

Contract:

* Request/response functions take a parsed body and return a new dict; they never mutate input.
  ``model`` is the name to write into the result (the backend's model for requests, the name the
  client asked for in responses). Parameters with no equivalent on the other side (OpenAI
  ``seed``, ``logprobs``, penalties; Anthropic ``top_k``, ``thinking``) are dropped; content the
  other side cannot represent raises ``TranslationError`` (the caller answers 400).
* ``error_to_openai`` / ``error_to_anthropic`` accept any upstream error body (either shape or
  garbage) and always return a well-formed error body of the target shape.
* The stream classes take upstream SSE bytes split anywhere and return translated bytes as soon as
  each upstream frame is complete; ``finish()`` closes the stream properly even if the upstream
  stopped early.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, ParamSpec

import orjson

from extproc.sse import SSEParser, encode_event
from extproc.usage import Usage, anthropic_input_tokens

__all__ = [
    "AnthropicToOpenAIStream",
    "OpenAIToAnthropicStream",
    "TranslationError",
    "anthropic_request_to_openai",
    "anthropic_response_to_openai",
    "error_to_anthropic",
    "error_to_openai",
    "openai_request_to_anthropic",
    "openai_response_to_anthropic",
]

Json = dict[str, Any]
P = ParamSpec("P")
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients often omit it

_STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class TranslationError(ValueError):
    """The request uses something the target API cannot express."""


def _checked(fn: Callable[P, Json]) -> Callable[P, Json]:
    """Turn the AttributeError/TypeError a malformed body provokes (a message that is a string,
    ``tools`` that is a number) into TranslationError, so the caller answers 400/502, not 500;
    checking every field's type up front would double the work for well-formed bodies."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Json:
        try:
            return fn(*args, **kwargs)
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise TranslationError(f"malformed body: {exc}") from exc
        except ValueError as exc:
            if isinstance(exc, TranslationError):
                raise
            raise TranslationError(f"malformed body: {exc}") from exc

    return wrapper


def _text_of(content: Any) -> str:
    """Text of a string or of a list of text parts/blocks (system prompts, tool results)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


# ---------------------------------------------------------------- OpenAI request -> Anthropic


def _image_block(part: Json) -> Json:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise TranslationError("image_url part without a url")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64":
            raise TranslationError("image data URLs must be base64-encoded")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _openai_content_blocks(content: Any) -> list[Json]:
    if content is None:
        return []
    if isinstance(content, str):
        # Anthropic rejects empty text blocks.
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("message content must be a string or a list of parts")
    blocks: list[Json] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
            if isinstance(text, str) and text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part))
        else:
            raise TranslationError(f"content part type {kind!r} cannot be sent to this model")
    return blocks


def _tool_use_block(call: Json) -> Json:
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        parsed = orjson.loads(args)
    except orjson.JSONDecodeError:
        raise TranslationError("tool call arguments are not valid JSON") from None
    return {"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""), "input": parsed}


def _openai_tool_choice(choice: Any, parallel: Any) -> Json | None:
    out: Json | None
    if choice is None:
        out = None
    elif isinstance(choice, str):
        out = {"type": {"auto": "auto", "none": "none", "required": "any"}.get(choice, "auto")}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name", "")}
    else:
        raise TranslationError("unsupported tool_choice")
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


@_checked
def openai_request_to_anthropic(body: Json, model: str) -> Json:
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise TranslationError("n > 1 is not supported by this model")
    system: list[str] = []
    messages: list[Json] = []
    for msg in body.get("messages") or ():
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            text = _text_of(content)
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _openai_content_blocks(content)
        elif role == "assistant":
            blocks = _openai_content_blocks(content)
            blocks += [_tool_use_block(c) for c in msg.get("tool_calls") or ()]
        elif role == "tool":
            role = "user"  # Anthropic carries tool results inside a user turn
            blocks = [
                {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": _text_of(content)}
            ]
        else:
            raise TranslationError(f"message role {role!r} is not supported")
        if not blocks:
            continue
        # Anthropic requires alternating roles, so consecutive same-role turns become one.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    out: Json = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("temperature") is not None:
        # OpenAI allows 0..2, Anthropic 0..1 and rejects more: clamp rather than fail the call.
        out["temperature"] = min(float(body["temperature"]), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    if body.get("stream") is not None:
        out["stream"] = bool(body["stream"])
    tools = body.get("tools")
    if tools:
        out["tools"] = []
        for tool in tools:
            fn = tool.get("function")
            if tool.get("type") != "function" or not isinstance(fn, dict):
                raise TranslationError("only function tools can be sent to this model")
            t: Json = {"name": fn.get("name", "")}
            if fn.get("description"):
                t["description"] = fn["description"]
            t["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
            out["tools"].append(t)
    choice = _openai_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    return out


# ---------------------------------------------------------------- Anthropic request -> OpenAI


def _openai_image_part(block: Json) -> Json:
    src = block.get("source") or {}
    if src.get("type") == "base64":
        url = f"data:{src.get('media_type', '')};base64,{src.get('data', '')}"
    elif src.get("type") == "url":
        url = src.get("url", "")
    else:
        raise TranslationError("image source type is not supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_message_to_openai(msg: Json) -> list[Json]:
    role = msg.get("role")
    content = msg.get("content")
    if role not in ("user", "assistant"):
        raise TranslationError(f"message role {role!r} is not supported")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    tool_msgs: list[Json] = []
    parts: list[Json] = []
    calls: list[Json] = []
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append(_openai_image_part(block))
        elif kind == "tool_use":
            args = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {"id": block.get("id", ""), "type": "function", "function": {"name": block.get("name", ""), "arguments": args}}
            )
        elif kind == "tool_result":
            # OpenAI needs tool messages directly after the assistant turn that called the tool,
            # which is where Anthropic puts tool_result blocks: first in the next user turn.
            tool_msgs.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": _text_of(block.get("content"))})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # chat completions has no way to send reasoning back
        else:
            raise TranslationError(f"content block type {kind!r} cannot be sent to this model")
    out = tool_msgs
    if role == "assistant":
        if parts or calls:
            m: Json = {"role": "assistant", "content": _text_of(parts) or None}
            if calls:
                m["tool_calls"] = calls
            out.append(m)
    elif parts:
        all_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": _text_of(parts) if all_text else parts})
    return out


@_checked
def anthropic_request_to_openai(body: Json, model: str, include_usage: bool) -> Json:
    messages: list[Json] = []
    system = _text_of(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for msg in body.get("messages") or ():
        messages.extend(_anthropic_message_to_openai(msg))
    out: Json = {"model": model, "messages": messages}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": include_usage}
    elif body.get("stream") is not None:
        out["stream"] = False
    if body.get("tools"):
        tools = []
        for t in body["tools"]:
            if t.get("type") not in (None, "custom") or "input_schema" not in t:
                raise TranslationError(f"tool {t.get('name')!r} is a server tool this model cannot run")
            fn: Json = {"name": t.get("name", "")}
            if t.get("description"):
                fn["description"] = t["description"]
            fn["parameters"] = t["input_schema"]
            tools.append({"type": "function", "function": fn})
        out["tools"] = tools
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        kind = tc.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": tc.get("name", "")}}
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if tc.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    return out


# ---------------------------------------------------------------- responses


def _openai_usage(u: Usage) -> Json:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens, "total_tokens": u.total_tokens}


@_checked
def anthropic_response_to_openai(body: Json, model: str) -> Json:
    texts: list[str] = []
    calls: list[Json] = []
    for block in body.get("content") or ():
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            args = orjson.dumps(block.get("input") or {}).decode()
            calls.append({"id": block.get("id", ""), "type": "function", "function": {"name": block.get("name", ""), "arguments": args}})
    message: Json = {"role": "assistant", "content": "".join(texts) if texts else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    u = body.get("usage") or {}
    usage = Usage(anthropic_input_tokens(u), int(u.get("output_tokens") or 0))
    msg_id = str(body.get("id") or uuid.uuid4().hex)
    return {
        "id": "chatcmpl-" + msg_id.removeprefix("msg_"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": _STOP_TO_FINISH.get(body.get("stop_reason") or "end_turn", "stop"),
        }],
        "usage": _openai_usage(usage),
    }


@_checked
def openai_response_to_anthropic(body: Json, model: str) -> Json:
    choices = body.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[Json] = []
    text = message.get("content")
    if isinstance(text, list):
        text = _text_of(text)
    if text:
        content.append({"type": "text", "text": text})
    elif message.get("refusal"):
        content.append({"type": "text", "text": message["refusal"]})
    for call in message.get("tool_calls") or ():
        block = _tool_use_block(call)
        content.append(block)
    u = body.get("usage") or {}
    chat_id = str(body.get("id") or uuid.uuid4().hex)
    return {
        "id": "msg_" + chat_id.removeprefix("chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _FINISH_TO_STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": int(u.get("prompt_tokens") or 0), "output_tokens": int(u.get("completion_tokens") or 0)},
    }


# ---------------------------------------------------------------- errors

# Anthropic error type -> OpenAI error type, in the vocabulary extproc/errors.py uses.
_A2O_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "billing_error": "insufficient_quota",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
}
_STATUS_OPENAI = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_STATUS_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                     529: "overloaded_error"}


def _parse_error(status: int, body: bytes) -> tuple[str, str | None, Json]:
    """(message, anthropic-style type if the body had one, the OpenAI error object if it had one)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        msg = msg if isinstance(msg, str) and msg else f"upstream error (HTTP {status})"
        if obj.get("type") == "error":
            return msg, str(err.get("type") or ""), {}
        return msg, None, err
    if isinstance(err, str):  # some OpenAI-compatible servers send {"error": "text"}
        return err, None, {}
    # Garbage (an HTML page, Envoy's "upstream connect error ..."): keep a short, useful excerpt.
    excerpt = body[:200].decode("utf-8", "replace").strip()
    msg = f"upstream error (HTTP {status})" + (f": {excerpt}" if excerpt else "")
    return msg, None, {}


def error_to_openai(status: int, body: bytes) -> bytes:
    msg, a_type, err = _parse_error(status, body)
    fallback = _STATUS_OPENAI.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if a_type is not None:
        out = {"message": msg, "type": _A2O_TYPE.get(a_type, "server_error" if a_type else fallback), "code": a_type or None}
    else:
        out = {"message": msg, "type": err.get("type") or fallback, "code": err.get("code")}
        if "param" in err:
            out["param"] = err["param"]
    return orjson.dumps({"error": out})


def error_to_anthropic(status: int, body: bytes) -> bytes:
    msg, a_type, _ = _parse_error(status, body)
    if not a_type:
        a_type = _STATUS_ANTHROPIC.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": a_type, "message": msg}})


# ---------------------------------------------------------------- streams

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
        self._finished = self._done = False

    @property
    def usage(self) -> Usage:
        return Usage(self._input, self._output)

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
                 "choices": [], "usage": _openai_usage(self.usage)}
            out = b"data: " + orjson.dumps(u) + b"\n\n"
        return out + _DONE

    def _event(self, data: bytes) -> bytes:
        try:
            ev = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        kind = ev.get("type")
        if kind == "content_block_delta":
            delta = ev.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if dtype == "input_json_delta" and ev.get("index") in self._tools:
                call = {"index": self._tools[ev["index"]], "function": {"arguments": delta.get("partial_json", "")}}
                return self._chunk({"tool_calls": [call]})
            return b""  # thinking/signature/citations deltas have no chat-completions form
        if kind == "message_start":
            msg = ev.get("message") or {}
            if msg.get("id"):
                self._set_id("chatcmpl-" + str(msg["id"]).removeprefix("msg_"))
            self._input = anthropic_input_tokens(msg.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            if block.get("type") == "tool_use":
                idx = self._tools[ev.get("index", 0)] = len(self._tools)
                call = {"index": idx, "id": block.get("id", ""), "type": "function",
                        "function": {"name": block.get("name", ""), "arguments": ""}}
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "message_delta":
            u = ev.get("usage") or {}
            self._output = int(u.get("output_tokens") or self._output)
            self._input = anthropic_input_tokens(u) or self._input
            stop = (ev.get("delta") or {}).get("stop_reason")
            self._finished = True
            finish = orjson.dumps(_STOP_TO_FINISH.get(stop or "end_turn", "stop"))
            tail = b',"logprobs":null,"finish_reason":' + finish + b"}]" + self._usage_tail
            return b"data: " + self._head + b"{}" + tail + b"\n\n"
        if kind == "message_stop":
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

    @property
    def usage(self) -> Usage | None:
        return self._usage

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
            self._end(out)
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict) or self._ended:
            return
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
            if text:
                if self._block_kind != "text":
                    self._open("text", {"type": "text", "text": ""}, out)
                out.append(self._ev("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                            "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call, out)
            if choice.get("finish_reason"):
                self._stop = _FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")
                self._close_block(out)
        u = obj.get("usage")
        if isinstance(u, dict):
            self._usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
            if self._stop is not None:
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
