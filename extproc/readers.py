"""Response readers: one object per response turns the backend's bytes into the client's, and in
the same pass reads what the gateway meters. Nothing re-parses what was just written.

A reader exists per (backend API, client API) pair:

=================  =================  ==================================================
backend            client             bytes                       / what is read
=================  =================  ==================================================
OpenAI             OpenAI             as they came (the usage     / usage, model, text
Anthropic          Anthropic          chunk dropped if the client / from the same parse
                                      did not ask for it)
Anthropic          OpenAI             ``AnthropicToOpenAIStream`` / ``anthropic_response_to_openai``
OpenAI             Anthropic          ``OpenAIToAnthropicStream`` / ``openai_response_to_anthropic``
=================  =================  ==================================================

Contract of ``ResponseReader``
------------------------------
* ``start(status, content_type)`` is called with the response headers and returns the body mode
  to ask Envoy for, or None when this reader need not see the body: an error response (status
  >= 300) is only read to translate it, and a reader with ``observe=False`` (the per-attempt
  filter, which only translates) skips responses already in the client's API.
* ``body(chunk, end_of_stream)`` returns the client's bytes for one chunk (the same object when
  nothing changes). After the last chunk, ``usage`` is the provider's usage (None when it reported
  none: a translator never makes up zeros), ``model`` the model the provider named (its response
  or first frame; "" when it named none), ``text`` the reply text and ``done`` whether the
  response ended cleanly (a JSON body, or a stream that reached its end marker); ``complete``
  whether ``usage`` is final (the charge rule's "complete" in ``extproc.admission``).
* ``rewrites`` says whether the bytes may differ from the backend's (the content-length must go).
* ``include_usage``: whether the client asked for an OpenAI stream's usage chunk. The gateway
  always asks the backend for it (to meter); when the client did not, the reader drops it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from extproc import translate, translate_errors
from extproc.phases import BUFFERED, STREAMED
from extproc.policy import Api
from extproc.translate_stream import AnthropicToOpenAIStream, OpenAIToAnthropicStream
from extproc.usage import StreamTap, Usage, text_of, usage_of

__all__ = ["BodyRead", "ResponseReader", "StreamReader", "metric_model", "read_body", "stream_reader"]

_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")


class StreamReader(Protocol):
    @property
    def usage(self) -> Usage | None: ...

    @property
    def text(self) -> str: ...

    model: str
    done: bool

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


def stream_reader(backend: Api, client: Api, client_model: str, *, include_usage: bool = True) -> StreamReader:
    """The reader of one SSE stream from ``backend`` for a client of ``client``."""
    if backend is client:
        return StreamTap(client, strip_usage=not include_usage)
    if client is Api.OPENAI:
        return AnthropicToOpenAIStream(client_model, include_usage=include_usage)
    return OpenAIToAnthropicStream(client_model)


@dataclass(slots=True)
class BodyRead:
    body: bytes
    usage: Usage | None = None
    model: str = ""
    text: str = ""


def read_body(backend: Api, client: Api, client_model: str, body: bytes) -> BodyRead:
    """A successful (2xx) JSON response body: the client's bytes, and what it says, in one parse.

    Not JSON: passed through unchanged in the same API, a 502 error body across APIs.
    """
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        if backend is client:
            return BodyRead(body)
        return BodyRead(_error(client, 502, body))
    model = doc.get("model") if isinstance(doc, dict) else None
    read = BodyRead(body, usage_of(backend, doc), model if isinstance(model, str) else "", text_of(backend, doc))
    if backend is client or not isinstance(doc, dict):
        return read
    try:
        if client is Api.OPENAI:
            out = translate.anthropic_response_to_openai(doc, client_model)
        else:
            out = translate.openai_response_to_anthropic(doc, client_model)
    except translate.TranslationError:
        return BodyRead(_error(client, 502, body))
    return BodyRead(orjson.dumps(out), read.usage, read.model, read.text)


def _error(client: Api, status: int, body: bytes) -> bytes:
    if client is Api.OPENAI:
        return translate_errors.error_to_openai(status, body)
    return translate_errors.error_to_anthropic(status, body)


def metric_model(reported: str, configured: str) -> str:
    """The ``gen_ai_response_model`` label: what the provider named, if it is a plausible model
    name (a label value must stay short and bounded), else the backend's configured model."""
    return reported if _MODEL_NAME.fullmatch(reported) else configured


class ResponseReader:
    """Backend API -> client API for one response (see the module docstring)."""

    def __init__(
        self, backend_api: Api, client_api: Api, model: str, *, include_usage: bool = True, observe: bool = False
    ) -> None:
        self.backend_api = backend_api
        self.client_api = client_api
        self.model_alias = model  # written into translated responses: the name the client called
        self.needed = backend_api is not client_api
        self.include_usage = include_usage
        self.observe = observe
        self.stream: StreamReader | None = None
        self.error_status = 0
        self.buffered = False
        self.read: BodyRead | None = None

    def start(self, status: int, content_type: str) -> int | None:
        if status >= 300:
            if not self.needed:
                return None
            self.error_status = status
            self.buffered = True
            return int(BUFFERED)
        if not (self.needed or self.observe):
            return None
        if "text/event-stream" in content_type:
            self.stream = stream_reader(self.backend_api, self.client_api, self.model_alias, include_usage=self.include_usage)
            return int(STREAMED)
        self.buffered = True
        return int(BUFFERED)

    @property
    def rewrites(self) -> bool:
        if self.needed:
            return True
        return self.stream is not None and self.client_api is Api.OPENAI and not self.include_usage

    def body(self, chunk: bytes, end_of_stream: bool) -> bytes:
        if self.stream is not None:
            out = self.stream.feed(chunk)
            return out + self.stream.finish() if end_of_stream else out
        if not end_of_stream or not self.buffered:
            return chunk
        if self.error_status:
            return _error(self.client_api, self.error_status, chunk) if self.needed else chunk
        self.read = read_body(self.backend_api, self.client_api, self.model_alias, chunk)
        return self.read.body

    @property
    def usage(self) -> Usage | None:
        if self.stream is not None:
            return self.stream.usage
        return self.read.usage if self.read is not None else None

    @property
    def model(self) -> str:
        if self.stream is not None:
            return self.stream.model
        return self.read.model if self.read is not None else ""

    @property
    def text(self) -> str:
        if self.stream is not None:
            return self.stream.text
        return self.read.text if self.read is not None else ""

    @property
    def done(self) -> bool:
        if self.stream is not None:
            return self.stream.done
        return self.read is not None

    @property
    def complete(self) -> bool:
        """Whether ``usage`` is final: a whole body, a stream that ended cleanly, or an OpenAI-format
        stream (its usage chunk is the last one by construction; Anthropic's counts grow until
        ``message_stop``)."""
        if self.stream is None:
            return self.read is not None
        return self.stream.done or self.backend_api is Api.OPENAI
