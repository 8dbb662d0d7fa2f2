"""What the mock LLM says, in the providers' wire formats: pure builders, no I/O.

``mockllm.server`` decides *whether* and *when* to answer; this module decides *what*:
response bodies, SSE frames, error bodies, reply text and token counts.  Contract:

* Replies are deterministic and reveal what was received::

      [<name>] model=<model> messages=<n> system=<S> last=<U>

  ``S`` is the full system text ("-" if none; OpenAI ``system``/``developer`` messages
  and Anthropic ``system`` blocks are joined with " | "), ``U`` the text of the last
  user message ("-" if none; text parts joined with " ").  Prompt/input tokens are
  ``max(1, ceil(chars / 4))`` over all message texts plus system; completion/output
  tokens are the number of whitespace-separated words of the reply.

* Streams split the reply into at least three content pieces (word by word, at most
  ``_MAX_CONTENT_CHUNKS``) whose concatenation is exactly the reply.

* Errors use the provider's real shape: OpenAI ``{"error": {message, type, param,
  code}}``; Anthropic ``{"type": "error", "error": {type, message}}``.

* Embeddings are 8-dim, unit-norm and derived from a hash of the input text.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import time
import uuid
from collections.abc import Iterable
from typing import Any, Final, Literal

import orjson

Flavor = Literal["openai", "anthropic"]
Json = dict[str, Any]

MODEL_IDS: Final = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "claude-sonnet-4-5")
EMBEDDING_DIM: Final = 8
# Fixed so /v1/models is byte-for-byte stable across runs.
_MODELS_CREATED: Final = 1_700_000_000
# Streams are split into at most this many content chunks: word-by-word for normal
# replies, but a huge injected system prompt must not turn into thousands of frames.
_MAX_CONTENT_CHUNKS: Final = 16
_WORD_RE: Final = re.compile(r"\S+\s*")


# --------------------------------------------------------------------------- errors


def _openai_error_type(status: int) -> tuple[str, str | None]:
    """Map a status to OpenAI's (type, code) pair as the real API reports them."""
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if status == 404:
        return "invalid_request_error", "not_found"
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _anthropic_error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(flavor: Flavor, status: int, message: str) -> Json:
    """The provider's error body for ``status``."""
    if flavor == "anthropic":
        return {
            "type": "error",
            "error": {"type": _anthropic_error_type(status), "message": message},
        }
    etype, code = _openai_error_type(status)
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


# ------------------------------------------------------------ reply text and tokens


def _content_text(content: Any) -> str:
    """Text of a message content: a plain string, or the text parts of a list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _dicts(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [m for m in items if isinstance(m, dict)]


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return _content_text(m.get("content"))
    return "-"


def _prompt_tokens(chars: int) -> int:
    return max(1, math.ceil(chars / 4))


def _reply(name: str, model: str, n: int, system: str, last: str) -> str:
    return f"[{name}] model={model} messages={n} system={system or '-'} last={last}"


def _split_reply(reply: str) -> list[str]:
    """Split into >= 3 content pieces whose concatenation is exactly ``reply``."""
    words = _WORD_RE.findall(reply)
    if "".join(words) != reply:  # leading whitespace cannot happen, but never lose text
        words = [reply]
    per = max(1, math.ceil(len(words) / _MAX_CONTENT_CHUNKS))
    pieces = ["".join(words[i : i + per]) for i in range(0, len(words), per)]
    while len(pieces) < 3:  # only reachable through the fallback above
        pieces.append("")
    return pieces


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [v / 2**31 for v in struct.unpack("<8i", digest)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


# --------------------------------------------------------------------------- OpenAI


def openai_reply(name: str, model: str, raw_messages: list[Any]) -> tuple[str, dict[str, int]]:
    """Reply text and ``usage`` for a chat completions request."""
    messages = _dicts(raw_messages)
    system = " | ".join(
        _content_text(m.get("content"))
        for m in messages
        if m.get("role") in ("system", "developer")
    )
    chars = sum(len(_content_text(m.get("content"))) for m in messages)
    reply = _reply(name, model, len(raw_messages), system, _last_user(messages))
    usage = {
        "prompt_tokens": _prompt_tokens(chars),
        "completion_tokens": len(reply.split()),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return reply, usage


def openai_completion(model: str, reply: str, usage: dict[str, int]) -> Json:
    """A complete ``chat.completion`` body."""
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def openai_stream(
    model: str, reply: str, usage: dict[str, int], include_usage: bool
) -> list[bytes]:
    """The ``chat.completion.chunk`` SSE frames of a streamed reply, ``[DONE]`` included."""
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None  # the real API marks every non-final chunk this way
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    frames = [chunk({"role": "assistant", "content": ""}, None)]
    frames.extend(chunk({"content": piece}, None) for piece in _split_reply(reply))
    frames.append(chunk({}, "stop"))
    if include_usage:
        tail = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage,
        }
        frames.append(b"data: " + orjson.dumps(tail) + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    return frames


def embeddings_list(model: str, texts: list[str], as_base64: bool) -> Json:
    """The embeddings ``list`` body for ``texts``."""
    data = []
    for i, text in enumerate(texts):
        vec = _embedding(text)
        emb: Any = (
            base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vec)).decode() if as_base64 else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = _prompt_tokens(sum(len(t) for t in texts))
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models_list() -> Json:
    """The ``/v1/models`` body."""
    return {
        "object": "list",
        "data": [
            {"id": mid, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}
            for mid in MODEL_IDS
        ],
    }


# ------------------------------------------------------------------------ Anthropic


def anthropic_reply(
    name: str, model: str, raw_messages: list[Any], raw_system: Any
) -> tuple[str, int, int]:
    """Reply text, input tokens and output tokens for a Messages request."""
    msgs = _dicts(raw_messages)
    if isinstance(raw_system, list):
        system = " | ".join(
            b["text"] for b in raw_system if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    else:
        system = raw_system if isinstance(raw_system, str) else ""
    chars = len(system) + sum(len(_content_text(m.get("content"))) for m in msgs)
    reply = _reply(name, model, len(raw_messages), system, _last_user(msgs))
    return reply, _prompt_tokens(chars), len(reply.split())


def _new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def anthropic_message(model: str, reply: str, input_tokens: int, output_tokens: int) -> Json:
    """A complete Messages ``message`` body."""
    return {
        "id": _new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_stream(model: str, reply: str, input_tokens: int, output_tokens: int) -> list[bytes]:
    """The Messages SSE events of a streamed reply, ``message_stop`` included."""
    frames = [
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": _new_message_id(),
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        ),
        _event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _event("ping", {"type": "ping"}),
    ]
    frames.extend(
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in _split_reply(reply)
    )
    frames.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    frames.append(
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    frames.append(_event("message_stop", {"type": "message_stop"}))
    return frames
