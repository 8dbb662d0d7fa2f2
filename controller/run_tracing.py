"""Workflow runs as traces: one trace per run, a child span per step attempt.

Built only when tracing is on (``crdgol.tracing``); the workflow runner holds ``tracer = None``
otherwise and pays one ``is None`` test per hook. Spans carry the run's and step's names, the
step type, the attempt, its outcome and tokens; never inputs, outputs, prompts or headers. A run
resumed after a controller restart starts a new trace (the old process's span ended with it).
An ai-inference step's call to the gateway carries its attempt span's W3C ``traceparent``, so
Envoy's spans for it (and extproc's under them) are children of the step, in the run's trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from controller.workflow.engine import Call, RunState, StepFailed, StepSucceeded

__all__ = ["RunTracer"]


class RunTracer:
    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        self._tracer = tracer
        self._in = set_span_in_context
        self._error = Status(StatusCode.ERROR)

    def run_started(self, state: RunState) -> Span:
        return self._tracer.start_span(
            f"workflow {state.workflow}",
            attributes={"crdgol.workflow": f"{state.namespace}/{state.workflow}", "crdgol.workflow.run": state.key},
        )

    def step_started(self, run: Any, call: Call) -> Span:
        """The attempt's span, a child of the run's; ended by ``step_finished`` (or ``step_aborted``)."""
        attrs: dict[str, Any] = {
            "crdgol.workflow.step": call.step,
            "crdgol.workflow.step.type": call.type,
            "crdgol.workflow.step.attempt": call.attempt,
        }
        return self._tracer.start_span(f"step {call.step}", context=self._in(run), attributes=attrs)

    @staticmethod
    def traceparent(span: Span) -> str:
        """The W3C ``traceparent`` naming ``span`` as the parent of what a call it makes does."""
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def step_finished(self, span: Span, event: StepSucceeded | StepFailed) -> None:
        from controller.workflow.engine import StepSucceeded

        if isinstance(event, StepSucceeded) and event.tokens:
            span.set_attributes({f"gen_ai.usage.{k}_tokens": v for k, v in event.tokens.items() if k in ("input", "output")})
        if not isinstance(event, StepSucceeded):
            span.set_status(self._error)
            span.set_attribute("error.type", "step_failed")
        span.end()

    def step_aborted(self, span: Span) -> None:
        span.set_status(self._error)
        span.set_attribute("error.type", "aborted")
        span.end()

    def run_finished(self, run: Any, state: RunState) -> None:
        run.set_attribute("crdgol.workflow.phase", state.phase)
        if state.phase != "Succeeded":
            run.set_status(self._error)
        run.end()
