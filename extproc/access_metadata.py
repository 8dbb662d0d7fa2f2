"""What extproc tells Envoy's access log about a request, and the latency and spend it measures.

A model call (``extproc.model_call.ModelCall``) owns one ``AccessRecord``. The phase machinery asks
it after every message (``take``) whether there is dynamic metadata to hand to Envoy; it answers
twice at most:

* when extproc refuses the request (the reply is an immediate response): who asked, for what,
  and the error code, so a 401/403/404/429 line still says as much as extproc knew;
* when the response ended (``finish``, called from the call's accounting): the full record --
  tenant, binding, backend, provider, models, tokens, cost, policy version;
* or, for an answer whose usage Envoy's usage log settles (``settled_elsewhere``), with the
  response headers: the same without tokens and cost (the line's tokens then come from Envoy's
  usage filters).

A successful request therefore pays for one metadata message, not one per phase. Keys and the
namespace are ``crdgol.access_log``'s. Nothing here reads a header or a body: no credential and
no prompt text can reach the log through it.

``finish`` also records what only the end of a response tells: money spent (from the pricing
table), and for a streamed answer the time to its first token and the time per output token after
it (the GenAI histograms in ``extproc.metrics``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.phases import Respond
from extproc.quota import cost_micros

if TYPE_CHECKING:
    from extproc.model_call import ModelCall
    from extproc.phases import Reply
    from extproc.policy import Backend
    from extproc.usage import Usage

_MICROS = 1_000_000


class AccessRecord:
    __slots__ = ("error", "first_token_at", "pending", "sent_final")

    def __init__(self) -> None:
        self.error = ""  # the gateway's error code, when it refused the request
        self.first_token_at: float | None = None
        self.pending: dict[str, Any] | None = None
        self.sent_final = False

    def take(self, call: ModelCall, phase: str, reply: Reply) -> dict[str, Any] | None:
        """The metadata to send with ``reply`` (None: nothing new)."""
        if self.first_token_at is None and phase == "response_body" and streamed(call):
            # The first chunk of a streamed answer: its first token(s).
            self.first_token_at = call.services.clock()
        if self.pending is not None and not self.sent_final:
            self.sent_final = True
            out, self.pending = self.pending, None
            return out
        if isinstance(reply, Respond) and not self.sent_final:
            self.sent_final = True
            return request_fields(call, self.error)
        return None

    def finish(self, call: ModelCall, usage: Usage | None) -> None:
        """The response ended (or was cut): build the full record and record spend and latency."""
        if self.sent_final or self.pending is not None:
            return
        fields, backend = answer_fields(call, self.error)
        if usage is not None:
            fields["input_tokens"] = usage.input_tokens
            fields["output_tokens"] = usage.output_tokens
            price = backend.price if backend is not None else None
            cost = cost_micros(price, usage.input_tokens, usage.output_tokens) / _MICROS if price is not None else 0.0
            fields["cost"] = cost
            self._measure(call, usage, cost)
        self.pending = fields

    def settled_elsewhere(self, call: ModelCall) -> None:
        """The answer's usage is settled from Envoy's usage log, not here: send what is known now
        (who, which backend). Its token counts reach the line from Envoy's usage filters
        (``crdgol.access_log.json_format``); its cost, which needs them, is left out."""
        if not self.sent_final and self.pending is None:
            self.pending = answer_fields(call, self.error)[0]

    def _measure(self, call: ModelCall, usage: Usage, cost: float) -> None:
        m = call.services.metrics
        binding = call.binding.key if call.binding is not None else ""
        tenant = call.services.current.metric_tenant(call.identity.tenant) if call.identity is not None else ""
        if cost > 0:
            m.spend.labels(tenant, binding, call.backend).inc(cost)
        if not streamed(call) or call.status != 200:
            return
        now = call.services.clock()
        # A stream whose every chunk came in one message ends in that message's dispatch, before
        # ``take`` saw it: its first token came now, and there is no time between tokens to tell.
        first = self.first_token_at if self.first_token_at is not None else now
        base = (call.operation, call.request_model, binding, call.backend)
        m.time_to_first_token.labels(*base).observe(first - call.started)
        if usage.output_tokens > 1 and self.first_token_at is not None:
            after_first = now - self.first_token_at
            m.time_per_output_token.labels(*base).observe(after_first / (usage.output_tokens - 1))


def streamed(call: ModelCall) -> bool:
    """Whether the answer is a stream (server-sent events) extproc reads as it passes."""
    return call.reader is not None and call.reader.stream is not None


def answer_fields(call: ModelCall, error: str) -> tuple[dict[str, Any], Backend | None]:
    """``request_fields`` plus the backend that answered (and that backend, for its price)."""
    fields = request_fields(call, error)
    entry = call.services.current.backends.get(call.backend) if call.backend else None
    backend = entry[1] if entry is not None else None
    if backend is not None:
        fields["backend"] = backend.id
        fields["provider"] = backend.api.value
        fields["model_served"] = call.response_model()
    return fields, backend


def request_fields(call: ModelCall, error: str) -> dict[str, Any]:
    """What extproc knows about the request itself (before any backend answered)."""
    fields: dict[str, Any] = {
        "operation": call.operation,
        "api": call.api.value,
        "policy_version": call.services.current.version,
    }
    if call.identity is not None and call.identity.tenant:
        fields["tenant"] = call.identity.tenant
    if call.binding is not None:
        fields["binding"] = call.binding.key
    if call.request_model:
        fields["model_requested"] = call.request_model
    if error:
        fields["error"] = error
    return fields
