"""A state machine over the ext_proc phases: every reservation ends charged or released exactly once.

Hypothesis opens many concurrent streams and advances them in random interleavings: each sends the
next message of its request (headers, body, an answer from a provider or from Envoy itself,
streamed or buffered, with or without usage), or is cancelled (client gone, upstream reset, a
timeout), or half-closed early. After every step the invariant is checked on the streams that
have ended: a reservation is finished exactly once, released only when the request never left
extproc or Envoy answered it itself, charged its reservation when the stream ended after the
request went on but before any response, and never charged less than its reservation when an
answer was cut short.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from crdgol.usage_log import SETTLE_NAMESPACE, USAGE_NAMESPACE
from extproc import phases
from extproc.admission import PROVIDER_ERROR_CHARGE
from extproc.gateway import Downstream
from extproc.model_call import ModelCall
from extproc.quota import Demand, Price
from extproc.usage_log import settle_entry
from tests.unit.request_path import (
    RecordingStore,
    chat,
    openai_completion,
    openai_frames,
    policy_services,
    quiesce,
    request_body,
    request_headers,
    response_body,
    response_headers,
)

PRICE = Price(1_000_000, 2_000_000)


@dataclass(frozen=True)
class Answer:
    """How the upstream side of one request goes, if Envoy gets that far."""

    provider: bool  # False: Envoy's own reply (503: connect failure, no healthy upstream; 504 when status is 500: its upstream timeout)
    status: int
    streamed: bool
    with_usage: bool
    chunks: int


answers = st.builds(
    Answer,
    provider=st.booleans(),
    status=st.sampled_from([200, 200, 200, 429, 500]),
    streamed=st.booleans(),
    with_usage=st.booleans(),
    chunks=st.integers(1, 3),
)


def plan(model: str, answer: Answer) -> list[ep.ProcessingRequest]:
    """The messages Envoy would send for this request, in order."""
    msgs = [request_headers(), request_body(chat(model, stream=answer.streamed))]
    if not answer.provider:
        if answer.status == 500:  # Envoy's upstream timeout: the provider had the request
            return [*msgs, response_headers(504, "text/plain", upstream=False), response_body(b"upstream request timeout")]
        return [*msgs, response_headers(503, "text/plain", upstream=False), response_body(b"upstream connect error")]
    if answer.status != 200:
        return [*msgs, response_headers(answer.status), response_body(b'{"error": {"message": "provider says no"}}')]
    if not answer.streamed:
        body = openai_completion(7, 11) if answer.with_usage else b'{"choices": []}'
        return [*msgs, response_headers(), response_body(body)]
    frames = openai_frames(7, 11)
    if not answer.with_usage:
        frames = [f for f in frames if b'"usage"' not in f]
    per = max(1, len(frames) // answer.chunks)
    parts = [b"".join(frames[i : i + per]) for i in range(0, len(frames), per)]
    return [*msgs, response_headers(content_type="text/event-stream")] + [response_body(p, i == len(parts) - 1) for i, p in enumerate(parts)]


@dataclass
class Stream:
    handler: Downstream
    answer: Answer
    messages: list[ep.ProcessingRequest]
    inbox: asyncio.Queue[ep.ProcessingRequest | None]
    task: asyncio.Task[None]
    responses: list[ep.ProcessingResponse] = field(default_factory=list)
    sent: int = 0
    cancelled: bool = False

    @property
    def call(self) -> ModelCall | None:
        inner = self.handler.inner
        return inner if isinstance(inner, ModelCall) else None

    def answered_by_provider(self) -> bool:
        """extproc processed response headers that came from a provider."""
        return self.answer.provider and self.sent >= 3 and len(self.responses) >= 3

    def abandoned(self) -> bool:
        """extproc sent the request on (its body answered, not refused), and the stream ended
        before extproc saw any response: the provider may be working on it."""
        forwarded = len(self.responses) >= 2 and not self.responses[1].HasField("immediate_response")
        return forwarded and len(self.responses) == 2


class RequestPath(RuleBasedStateMachine):
    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.store = RecordingStore()
        self.services = self.loop.run_until_complete(self._services())
        self.ended: list[Stream] = []
        self.opened: list[Stream] = []

    async def _services(self):  # type: ignore[no-untyped-def]
        return policy_services(Path(self.tmp.name), self.store)

    def teardown(self) -> None:
        # Envoy goes away: every stream still open is cancelled, and must then obey the rule too.
        for stream in self.opened:
            if stream not in self.ended:
                self.cancel(stream)
        self.every_ended_reservation_is_finished_once_by_the_charge_rule()
        # Nothing is held once every stream has ended, however it ended.
        assert self.services.capacity.streams == 0 and self.services.capacity.body_bytes == 0
        self.loop.close()
        self.tmp.cleanup()

    def _run(self, stream: Stream) -> None:
        """Let the loop run until the stream has answered what it was sent, or has ended."""

        async def until_quiet() -> None:
            for _ in range(50):
                if stream.task.done() or len(stream.responses) >= stream.sent:
                    break
                await asyncio.sleep(0)

        self.loop.run_until_complete(until_quiet())

    @rule(target=streams, model=st.sampled_from(["roomy", "roomy-claude"]), answer=answers, usage_log=st.booleans())
    def open(self, model: str, answer: Answer, usage_log: bool) -> Stream:
        # usage_log: Envoy's access log brings usage, so extproc skips bodies it does not need.
        handler = Downstream(self.services, usage_log=usage_log)
        inbox: asyncio.Queue[ep.ProcessingRequest | None] = asyncio.Queue()
        responses: list[ep.ProcessingResponse] = []

        async def requests():  # type: ignore[no-untyped-def]
            while (msg := await inbox.get()) is not None:
                yield msg

        async def serve() -> None:
            async for resp in phases.run(requests(), handler, capacity=self.services.capacity, count_stream=True):
                responses.append(resp)

        task = self.loop.create_task(serve())
        msgs = plan(model, answer)
        if model == "roomy-claude" and answer.provider and answer.status == 200:
            msgs = [m if not m.HasField("response_body") else response_body(_anthropic(answer, m.response_body), m.response_body.end_of_stream) for m in msgs]
        stream = Stream(handler, answer, msgs, inbox, task, responses)
        self.opened.append(stream)
        return stream

    @rule(stream=streams)
    def send_next(self, stream: Stream) -> None:
        if stream.task.done() or stream.sent >= len(stream.messages):
            return
        stream.inbox.put_nowait(stream.messages[stream.sent])
        stream.sent += 1
        self._run(stream)

    @rule(stream=consumes(streams))
    def cancel(self, stream: Stream) -> None:
        """Envoy cancels the stream: client gone, upstream reset, or a timeout."""
        if not stream.task.done():
            stream.task.cancel()
            # Only a cancel before the whole answer was delivered cuts anything short.
            stream.cancelled = stream.sent < len(stream.messages)
        self._end(stream)

    @rule(stream=consumes(streams))
    def half_close(self, stream: Stream) -> None:
        """Envoy sends nothing more and ends the stream cleanly (possibly early)."""
        stream.inbox.put_nowait(None)
        self._end(stream)

    @rule(stream=consumes(streams))
    def run_to_the_end(self, stream: Stream) -> None:
        while not stream.task.done() and stream.sent < len(stream.messages):
            self.send_next(stream)
        stream.inbox.put_nowait(None)
        self._end(stream)

    def _end(self, stream: Stream) -> None:
        async def wait() -> None:
            await asyncio.gather(stream.task, return_exceptions=True)
            call = stream.call
            if call is not None and call.deferred:
                # Envoy logs the request when it ends: the entry settles what extproc deferred.
                settle_entry(self.services, log_entry(stream))
            await quiesce(self.services)

        self.loop.run_until_complete(wait())
        self.ended.append(stream)

    @invariant()
    def every_ended_reservation_is_finished_once_by_the_charge_rule(self) -> None:
        for stream in self.ended:
            call = stream.call
            if call is None or call.admission.reservation is None:
                continue
            reservation = call.admission.reservation
            outcome = self.store.outcome(reservation.id)
            assert len(outcome) == 1, (stream.answer, outcome)
            [charged] = outcome
            timed_out = not stream.answer.provider and stream.answer.status == 500 and len(stream.responses) >= 3
            if stream.abandoned() or timed_out:
                assert charged == reservation.demand, (stream.answer, stream.sent, charged)
                continue
            if not stream.answered_by_provider():
                assert charged is None, (stream.answer, stream.sent, charged)
                continue
            assert charged is not None, (stream.answer, stream.sent)
            assert charged.requests == 1
            whole = stream.sent == len(stream.messages) or (call.deferred and stream.sent >= 3)
            if stream.answer.status != 200:
                assert charged == PROVIDER_ERROR_CHARGE
            elif stream.answer.with_usage and not stream.cancelled and whole:
                assert charged == Demand.used(7, 11, PRICE)
            else:
                r = reservation.demand
                assert charged.input_tokens >= r.input_tokens and charged.output_tokens >= r.output_tokens
                assert charged.cost_micros >= r.cost_micros

    @invariant()
    def an_open_stream_holds_its_reservation_until_its_response_ends(self) -> None:
        for stream in self.opened:
            call = stream.call
            if stream in self.ended or call is None or call.admission.reservation is None:
                continue
            outcome = self.store.outcome(call.admission.reservation.id)
            assert len(outcome) <= (1 if call.finished else 0), (stream.answer, stream.sent, outcome)


def log_entry(stream: Stream) -> al.HTTPAccessLogEntry:
    """The access-log entry Envoy writes for a request whose response extproc did not read."""
    e = al.HTTPAccessLogEntry()
    e.response.response_code.value = stream.answer.status
    md = e.common_properties.metadata.filter_metadata
    md[SETTLE_NAMESPACE].CopyFrom(stream.responses[2].dynamic_metadata.fields[SETTLE_NAMESPACE].struct_value)
    if stream.cancelled:
        e.common_properties.response_flags.downstream_connection_termination = True
    # A deferred answer's body never passes extproc: the native filters saw its usage, and
    # only the flags say how it ended.
    if stream.answer.with_usage:
        md[USAGE_NAMESPACE].update({"input_tokens": 7.0, "output_tokens": 11.0})
    return e


def _anthropic(answer: Answer, body: ep.HttpBody) -> bytes:
    """The same answer in Anthropic's wire format (for the translated binding)."""
    if not answer.streamed:
        if not answer.with_usage:
            return b'{"type": "message", "content": []}'
        return json.dumps(
            {"id": "m", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 7, "output_tokens": 11}}
        ).encode()
    # One Anthropic stream per chunk index, cut where the OpenAI one was cut.
    events = [
        {"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [], "usage": {"input_tokens": 7, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 11}},
        {"type": "message_stop"},
    ]
    if not answer.with_usage:
        events = [e for e in events if e["type"] not in ("message_delta", "message_stop")]
    raw = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    return raw if body.end_of_stream else b""


TestRequestPath = RequestPath.TestCase
TestRequestPath.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
