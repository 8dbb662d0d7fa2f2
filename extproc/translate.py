"""OpenAI Chat Completions <-> Anthropic Messages translation of requests and responses.

Contract:

* Request/response functions take a parsed body and return a new dict; they never mutate input.
  ``model`` is the name to write into the result (the backend's model for requests, the name the
  client asked for in responses). Parameters with no equivalent on the other side (OpenAI
  ``seed``, ``logprobs``, penalties; Anthropic ``top_k``, ``thinking``) are dropped; content the
  other side cannot represent raises ``TranslationError`` (the caller answers 400).

Error bodies are translated by ``extproc.translate_errors``, SSE streams by
``extproc.translate_stream``; both share the stop-reason tables and ``openai_usage`` defined here.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, ParamSpec

import orjson

from extproc.usage import Usage, anthropic_input_tokens

__all__ = [
    "FINISH_TO_STOP",
    "STOP_TO_FINISH",
    "TranslationError",
    "anthropic_request_to_openai",
    "anthropic_response_to_openai",
    "openai_request_to_anthropic",
    "openai_response_to_anthropic",
    "openai_usage",
]

Json = dict[str, Any]
P = ParamSpec("P")
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients often omit it

STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
FINISH_TO_STOP = {
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


def openai_usage(u: Usage) -> Json:
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
            "finish_reason": STOP_TO_FINISH.get(body.get("stop_reason") or "end_turn", "stop"),
        }],
        "usage": openai_usage(usage),
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
        "stop_reason": FINISH_TO_STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": int(u.get("prompt_tokens") or 0), "output_tokens": int(u.get("completion_tokens") or 0)},
    }
