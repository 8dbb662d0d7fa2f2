"""A harness that drives extproc's request path without Envoy.

It feeds ``ProcessingRequest`` protos, in the order Envoy would send them, through the real
phase machinery (``extproc.phases.run``) and the real strategies (``Downstream`` for the gateway
filter, ``Attempt`` for a fallback's upstream filter), with a real policy compiled from manifests
and a memory quota store wrapped to record every reserve, settle and release. A "close" is how
the stream ends: Envoy half-closes it after the last message, or cancels it (client gone,
upstream reset, a timeout) at any point; both are modelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from controller.manifests import load_folder
from controller.render import RenderSettings, render
from extproc import phases
from extproc.gateway import Downstream
from extproc.phases import Handler
from extproc.policy import Policy, PolicyHolder, compile_policy
from extproc.quota import Decision, Demand, Limit
from extproc.quota_store import MemoryQuotaStore, Reservation
from extproc.services import Services

KEY = "sk-harness-key"
OTHER_KEY = "sk-harness-other"
COLLEAGUE_KEY = "sk-harness-colleague"  # another caller of KEY's tenant
T0 = 1_800_000_000.0  # quota windows are epoch-aligned: a fixed wall clock keeps them still

MANIFESTS = textwrap.dedent(f"""
    apiVersion: v1
    kind: Secret
    metadata: {{name: key, namespace: ns, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: acme}}}}
    stringData: {{key: {KEY}}}
    ---
    apiVersion: v1
    kind: Secret
    metadata: {{name: other, namespace: ns, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: globex}}}}
    stringData: {{key: {OTHER_KEY}}}
    ---
    apiVersion: v1
    kind: Secret
    metadata: {{name: colleague, namespace: ns, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: acme}}}}
    stringData: {{key: {COLLEAGUE_KEY}}}
    ---
    apiVersion: v1
    kind: Secret
    metadata: {{name: provider, namespace: ns}}
    stringData: {{apiKey: sk-provider}}
""")

QUOTAS = {
    "tenants": {
        "acme": {
            "requests": [{"amount": 5, "per": "minute"}],
            "tokens": [{"amount": 100000, "per": "hour", "type": "total"}],
            "concurrent": 3,
            "budget": {"amount": "10.00", "per": "day"},
            "defaultMaxTokens": 100,
        }
    }
}
PRICING = {"inputPerMillion": "1.00", "outputPerMillion": "2.00"}
# Room for many requests at once (the state machine opens dozens of streams).
ROOMY = {"tenants": {"acme": {"requests": [{"amount": 100000, "per": "minute"}], "tokens": [{"amount": 10**9, "per": "hour", "type": "total"}], "concurrent": 1000, "defaultMaxTokens": 100}}}


def _backend(name: str, provider: str = "openai-compatible", model: str = "up-gpt", priority: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "provider": provider,
        "endpoint": "http://127.0.0.1:9/v1" if provider != "anthropic" else "http://127.0.0.1:9",
        "model": model,
        "priority": priority,
        "credentialsRef": {"name": "provider", "key": "apiKey"},
        "pricing": PRICING,
    }


def _binding(name: str, backends: list[dict[str, Any]], **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "crdgol.io/v1alpha1",
            "kind": "AIModelBinding",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"model": name, "tenants": ["acme", "globex"], "backends": backends, "quotas": QUOTAS} | spec,
        }
    )


BINDINGS = [
    _binding("metered", [_backend("a")]),
    _binding("claude", [_backend("c", "anthropic", "up-claude")]),
    _binding("history", [_backend("a")], context={"systemPrompt": "Be brief.", "history": {"enabled": True, "maxTurns": 4, "maxTokens": 2000}}),
    _binding("roomy", [_backend("a")], quotas=ROOMY),
    _binding("roomy-claude", [_backend("c", "anthropic", "up-claude")], quotas=ROOMY),
    _binding("fallback", [_backend("first"), _backend("second", "anthropic", "up-claude", priority=1)]),
]


@dataclass
class RecordingStore(MemoryQuotaStore):
    """The memory store, recording each call so tests can check charged-or-released-once."""

    reserved: dict[str, Reservation] = field(default_factory=dict)
    finished: list[tuple[str, Demand | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        MemoryQuotaStore.__init__(self)

    async def reserve(
        self, scope: str, limits: Sequence[Limit], demand: Demand, now: float, ttl_hint: float
    ) -> tuple[Decision, Reservation | None]:
        decision, r = await super().reserve(scope, limits, demand, now, ttl_hint)
        if r is not None:
            self.reserved[r.id] = r
        return decision, r

    async def settle(self, reservation: Reservation, actual: Demand, now: float) -> None:
        self.finished.append((reservation.id, actual))
        await super().settle(reservation, actual, now)

    async def release(self, reservation: Reservation, now: float) -> None:
        self.finished.append((reservation.id, None))
        await super().release(reservation, now)

    def outcome(self, rid: str) -> list[Demand | None]:
        """Every settle (the demand charged) or release (None) of reservation ``rid``."""
        return [d for i, d in self.finished if i == rid]


_compiled: list[Policy] = []


def harness_policy(folder: Path) -> Policy:
    """The harness's policy, rendered from its manifests once per process (it never changes)."""
    if not _compiled:
        (folder / "secrets.yaml").write_text(MANIFESTS)
        (folder / "bindings.yaml").write_text("---\n".join(b + "\n" for b in BINDINGS))
        m = load_folder(folder)
        _compiled.append(compile_policy(render(m.bindings, m.secrets, RenderSettings()).snapshot))
    return _compiled[0]


def policy_services(folder: Path, store: RecordingStore | None = None) -> Services:
    return Services(policy=PolicyHolder(harness_policy(folder)), quotas=store or RecordingStore(), wall=lambda: T0)


# --- ProcessingRequests as Envoy sends them ----------------------------------------------------


def _header_map(h: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in h.items()])


def request_headers(path: str = "/v1/chat/completions", key: str | None = KEY, method: str = "POST", **extra: str) -> ep.ProcessingRequest:
    h = {":method": method, ":path": path, ":authority": "gw", "content-type": "application/json", **extra}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=_header_map(h), end_of_stream=method == "GET"))


def request_body(doc: Any) -> ep.ProcessingRequest:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))


def chat(model: str = "metered", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream, "max_tokens": 50, **extra}


def response_headers(
    status: int = 200, content_type: str = "application/json", upstream: bool = True, end_of_stream: bool = False, **extra: str
) -> ep.ProcessingRequest:
    h = {":status": str(status), "content-type": content_type, **extra}
    if upstream:
        h["x-envoy-upstream-service-time"] = "3"  # the router's mark: a provider answered
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=_header_map(h), end_of_stream=end_of_stream))


def response_body(raw: bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=raw, end_of_stream=end_of_stream))


def openai_completion(prompt: int = 7, completion: int = 11, text: str = "hi there") -> bytes:
    return json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": "up-gpt",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
    ).encode()


def openai_frames(prompt: int = 7, completion: int = 11, words: Sequence[str] = ("Hel", "lo")) -> list[bytes]:
    frames = [
        b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}}]}).encode() + b"\n\n"
        for w in words
    ]
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    frames.append(b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage}).encode() + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    return frames


# --- running a stream ----------------------------------------------------------------------------


@dataclass
class Run:
    """What extproc answered on one stream, and whether the stream ended by cancellation."""

    responses: list[ep.ProcessingResponse]
    cancelled: bool

    @property
    def immediate(self) -> ep.ImmediateResponse | None:
        last = self.responses[-1] if self.responses else None
        return last.immediate_response if last is not None and last.HasField("immediate_response") else None

    def status(self) -> int:
        imm = self.immediate
        return imm.status.code if imm is not None else 0

    def error(self) -> dict[str, Any]:
        imm = self.immediate
        assert imm is not None
        out: dict[str, Any] = json.loads(imm.body)
        return out

    def set_headers(self, i: int) -> dict[str, str]:
        """Header mutations of the ``i``-th response (whatever its phase)."""
        r = self.responses[i]
        phase = r.WhichOneof("response")
        assert phase is not None
        common = getattr(r, phase).response
        return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}

    def body(self, i: int) -> bytes | None:
        r = self.responses[i]
        phase = r.WhichOneof("response")
        assert phase is not None
        common = getattr(r, phase).response
        return common.body_mutation.body if common.HasField("body_mutation") else None


async def drive(
    handler: Handler, messages: Sequence[ep.ProcessingRequest], *, cancel_after: int | None = None, settle: bool = True, services: Services | None = None
) -> Run:
    """Send ``messages`` one at a time, each after the previous answer, as Envoy does.

    ``cancel_after=n``: after the n-th answer Envoy cancels the stream (client disconnect, upstream
    reset, a timeout) instead of sending the rest. Otherwise the stream half-closes after the last
    message. ``settle`` waits for the background quota work the stream started.
    """
    responses: list[ep.ProcessingResponse] = []
    answered = asyncio.Event()
    cancelled = False

    async def requests() -> AsyncIterator[ep.ProcessingRequest]:
        for i, msg in enumerate(messages):
            if cancel_after is not None and i >= cancel_after:
                break
            yield msg
            await answered.wait()
            answered.clear()
        if cancel_after is not None:
            await asyncio.Event().wait()  # Envoy sends nothing more; the cancel below ends it

    capacity = services.capacity if services is not None else None

    async def consume() -> None:
        async for resp in phases.run(requests(), handler, capacity=capacity, count_stream=isinstance(handler, Downstream)):
            responses.append(resp)
            answered.set()

    task = asyncio.create_task(consume())
    if cancel_after is None:
        await task
    else:
        while not task.done() and len(responses) < cancel_after:
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # let the stream go back to waiting for Envoy's next message
        if not task.done():
            task.cancel()
            cancelled = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if settle and services is not None:
        await quiesce(services)
    return Run(responses, cancelled)


async def quiesce(services: Services) -> None:
    """Wait for every background settle/release the request path started."""
    while services.background:
        await asyncio.gather(*list(services.background), return_exceptions=True)


def downstream(services: Services) -> Downstream:
    return Downstream(services)
