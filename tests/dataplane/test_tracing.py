"""OpenTelemetry traces through real Envoy and extproc, received by an OTLP/gRPC collector the test
starts (the opentelemetry-proto TraceService on loopback).

One request carries a client's ``traceparent``; Envoy continues that trace, and extproc's spans for
the same request join it as children of Envoy's ext_proc span, with the GenAI attributes. Canary
values (the client's key, the provider's key, the prompt) must appear in no span.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from crdgol.stack import Stack, StackSettings, free_port

CLIENT_KEY = "sk-canary-trace-client-93be1"
PROVIDER_KEY = "sk-canary-trace-provider-0c77d"
PROMPT = "canary prompt: the otter counts pebbles"
TRACE_ID = uuid.uuid4().hex
CLIENT_SPAN = uuid.uuid4().hex[:16]


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    error: bool


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class Collector(ts_grpc.TraceServiceServicer):  # type: ignore[misc]
    """A real OTLP/gRPC trace receiver: keeps every export request as it arrived."""

    requests: list[ts.ExportTraceServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext) -> ts.ExportTraceServiceResponse:
        with self.lock:
            self.requests.append(request)
        return ts.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        out = []
        with self.lock:
            requests = list(self.requests)
        for req in requests:
            for rs in req.resource_spans:
                service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            Span(
                                service=service,
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent=s.parent_span_id.hex(),
                                kind=s.kind,
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                error=s.status.code == 2,
                            )
                        )
        return out

    def raw(self) -> bytes:
        with self.lock:
            return b"".join(r.SerializeToString() for r in self.requests)


@dataclass
class Traced:
    stack: Stack
    collector: Collector

    def chat(self, *, stream: bool, traceparent: str = "", key: str = CLIENT_KEY) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        if traceparent:
            headers["traceparent"] = traceparent
        body = {"model": "traced", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}
        return httpx.post(f"{self.stack.url}/v1/chat/completions", json=body, headers=headers, timeout=30)

    def trace(self, trace_id: str, want: int, timeout: float = 15.0) -> list[Span]:
        """The spans of one trace, once at least ``want`` arrived (Envoy flushes every 5 s)."""
        deadline = time.monotonic() + timeout
        found: list[Span] = []
        while time.monotonic() < deadline:
            found = [s for s in self.collector.spans() if s.trace_id == trace_id]
            if len(found) >= want and {s.service for s in found} >= {"crdgol-gateway", "crdgol-extproc"}:
                return found
            time.sleep(0.2)
        raise AssertionError(f"trace {trace_id}: {[(s.service, s.name) for s in found]}")


def _manifests(folder: Path) -> None:
    binding = {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "traced", "namespace": "team-t"},
        "spec": {
            "model": "traced",
            "tenants": ["acme"],
            "backends": [
                {"name": "main", "provider": "anthropic", "endpoint": "MOCK", "model": "claude-traced",
                 "credentialsRef": {"name": "provider", "key": "apiKey"}},
            ],
            "context": {"systemPrompt": "You help ${tenant}."},
            "quotas": {"default": {"requests": [{"amount": 1000, "per": "minute"}]}},
        },
    }
    (folder / "binding.json").write_text(json.dumps(binding))
    (folder / "workflow.yaml").write_text(textwrap.dedent("""
        apiVersion: crdgol.io/v1alpha1
        kind: WorkflowSpec
        metadata: {name: hello, namespace: team-t}
        spec:
          steps:
            - name: greet
              type: ai-inference
              aiInference: {binding: traced, prompt: "Greet {{ inputs.who }}", maxTokens: 20}
            - name: answer
              type: ai-inference
              dependsOn: [greet]
              aiInference: {binding: traced, prompt: "Answer {{ steps.greet.outputs.text }}", maxTokens: 20}
    """))
    (folder / "secrets.yaml").write_text(textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: acme-key, namespace: team-t, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: acme}}}}
        stringData: {{key: {CLIENT_KEY}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: provider, namespace: team-t}}
        stringData: {{apiKey: {PROVIDER_KEY}}}
    """))


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ts_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    folder = tmp_path_factory.mktemp("traced")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    stack = Stack(StackSettings(manifests=folder, quiet=True, env=env, mock_args=("--require-key", PROVIDER_KEY)))
    _manifests(folder)
    binding = folder / "binding.json"
    binding.write_text(binding.read_text().replace("MOCK", stack.mock_url))
    try:
        stack.start()
        yield Traced(stack, collector)
    finally:
        stack.stop()
        server.stop(0)


def test_envoy_and_extproc_spans_of_one_request_form_one_trace_with_the_genai_attributes(traced: Traced) -> None:
    r = traced.chat(stream=False, traceparent=f"00-{TRACE_ID}-{CLIENT_SPAN}-01")
    assert r.status_code == 200
    usage = r.json()["usage"]
    spans = traced.trace(TRACE_ID, want=6)
    by_id = {s.span_id: s for s in spans}
    envoy = [s for s in spans if s.service == "crdgol-gateway"]
    ours = [s for s in spans if s.service == "crdgol-extproc"]
    # Envoy continued the client's trace: its request span is the child of the client's span.
    (ingress,) = [s for s in envoy if s.parent == CLIENT_SPAN]
    # extproc's call span is the child of Envoy's span for the ext_proc stream, inside the request.
    (call,) = [s for s in ours if s.name == "chat traced"]
    ext_proc_span = by_id[call.parent]
    assert ext_proc_span.service == "crdgol-gateway" and ext_proc_span.parent == ingress.span_id
    assert call.kind == 3  # SPAN_KIND_CLIENT: the gateway is the GenAI client of the provider
    a = call.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.system"], a["gen_ai.request.model"], a["gen_ai.response.model"]) == (
        "chat", "anthropic", "traced", "claude-traced"
    )
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert (a["crdgol.tenant"], a["crdgol.binding"], a["crdgol.backend"], a["http.response.status_code"]) == (
        "team-t/acme", "team-t/traced", "crdgol-be.team-t.traced.main", 200
    )
    assert a["crdgol.policy_version"] == traced.stack.policy_version() and not call.error
    # Its decisions are its children, in the order they were taken.
    decisions = {s.name for s in ours if s.parent == call.span_id}
    assert decisions == {"crdgol.authenticate", "crdgol.route", "crdgol.context", "crdgol.admission"}
    # The upstream attempt is Envoy's span too, in the same trace.
    assert len(envoy) >= 3


def test_a_refused_request_is_a_failed_span_with_the_reason(traced: Traced) -> None:
    trace_id = uuid.uuid4().hex
    r = traced.chat(stream=True, traceparent=f"00-{trace_id}-{CLIENT_SPAN}-01", key="sk-canary-trace-wrong")
    assert r.status_code == 401
    spans = traced.trace(trace_id, want=3)
    (call,) = [s for s in spans if s.service == "crdgol-extproc" and s.name.startswith("chat")]
    assert call.error and (call.attributes["error.type"], call.attributes["http.response.status_code"]) == ("invalid_api_key", 401)
    (auth,) = [s for s in spans if s.name == "crdgol.authenticate"]
    assert auth.error and auth.parent == call.span_id


def test_a_request_without_a_traceparent_starts_its_own_trace_and_a_stream_is_traced_too(traced: Traced) -> None:
    before = {s.trace_id for s in traced.collector.spans()}
    r = traced.chat(stream=True)
    assert r.status_code == 200 and "[DONE]" in r.text
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        calls = [s for s in traced.collector.spans() if s.name == "chat traced" and s.trace_id not in before and s.trace_id != TRACE_ID]
        if calls and any(s.service == "crdgol-gateway" and s.trace_id == calls[0].trace_id for s in traced.collector.spans()):
            break
        time.sleep(0.2)
    assert calls, "no span for the streamed request"
    assert calls[0].attributes["gen_ai.usage.output_tokens"] > 0


def test_no_key_or_prompt_text_reaches_any_span(traced: Traced) -> None:
    assert traced.chat(stream=False).status_code == 200
    time.sleep(0.5)
    raw = traced.collector.raw()
    assert raw
    for canary in (CLIENT_KEY, PROVIDER_KEY, PROMPT, "otter", "sk-canary-trace-wrong"):
        assert canary.encode() not in raw, canary


def test_a_workflow_run_is_one_trace_with_a_span_per_step(traced: Traced) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    r = httpx.post(f"{traced.stack.url}/v1/workflows/hello/runs", json={"inputs": {"who": "otters"}}, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run = httpx.get(f"{traced.stack.url}/v1/workflows/runs/{name}", headers=headers, timeout=10).json()
        if run["phase"] in ("Succeeded", "Failed"):
            break
        time.sleep(0.2)
    assert run["phase"] == "Succeeded", run
    deadline = time.monotonic() + 15
    roots: list[Span] = []
    while time.monotonic() < deadline and not roots:
        roots = [s for s in traced.collector.spans() if s.attributes.get("crdgol.workflow.run") == f"team-t/{name}"]
        time.sleep(0.2)
    (root,) = roots
    assert (root.service, root.name, root.attributes["crdgol.workflow.phase"]) == ("crdgol-controller", "workflow hello", "Succeeded")
    steps = sorted((s for s in traced.collector.spans() if s.parent == root.span_id), key=lambda s: s.attributes["crdgol.workflow.step"])
    assert [(s.name, s.trace_id) for s in steps] == [("step answer", root.trace_id), ("step greet", root.trace_id)]
    assert all(s.attributes["gen_ai.usage.output_tokens"] > 0 and not s.error for s in steps)
    # Each AI step's call carried its span's traceparent: Envoy's request span is that step's
    # child, and extproc's call span sits under Envoy's, all in the run's trace (Envoy flushes its
    # spans every few seconds: wait for them).
    def calls_under(step: Span) -> list[Span]:
        spans = [s for s in traced.collector.spans() if s.trace_id == root.trace_id]
        by_id = {s.span_id: s for s in spans}
        ingress = {s.span_id for s in spans if s.service == "crdgol-gateway" and s.parent == step.span_id}
        return [s for s in spans if s.service == "crdgol-extproc" and s.name == "chat traced" and s.parent in by_id and by_id[s.parent].parent in ingress]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(calls_under(s) for s in steps):
        time.sleep(0.2)
    for step in steps:
        (call,) = calls_under(step)
        assert call.attributes["crdgol.tenant"] == "team-t/acme" and not call.error
    assert b"otters" not in traced.collector.raw()  # the run's inputs are not in any span


def test_with_tracing_off_no_process_loads_the_opentelemetry_sdk() -> None:
    code = (
        "import sys, crdgol.cli, extproc.server, extproc.gateway, extproc.services, controller.render, controller.app;"
        "from extproc.services import Services; from crdgol.tracing import settings_from;"
        "assert not settings_from({}, '', 'x').enabled and Services().tracer is None;"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
