"""The workflow engine's pure core: (spec, state, event) -> (state, actions), deterministic."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.models import SpecError
from controller.workflow.accept import CompiledWorkflow, accept
from controller.workflow.engine import (
    Abort,
    Call,
    Cancel,
    Finish,
    RunState,
    StepFailed,
    StepSucceeded,
    Tick,
    Wake,
    advance,
    backoff,
    new_run,
)
from controller.workflow.spec import parse_workflow

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"triage-model": "triage-model", "m": "m"}


def wf(steps: list[dict[str, Any]], **spec: Any) -> CompiledWorkflow:
    doc = {"metadata": {"name": "w", "namespace": "default"}, "spec": {"steps": steps, **spec}}
    return accept(parse_workflow(doc), MODELS, file_mode=True)


def ai(name: str, *deps: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "ai-inference", "dependsOn": list(deps), "aiInference": {"binding": "m", "prompt": f"do {name}"}, **extra}


def triage() -> CompiledWorkflow:
    docs = list(yaml.safe_load_all((ROOT / "examples/support-triage/workflow.yaml").read_text()))
    return accept(parse_workflow(docs[0]), MODELS, file_mode=True)


def calls(actions: list[Any]) -> list[Call]:
    return [a for a in actions if isinstance(a, Call)]


def start(w: CompiledWorkflow, inputs: dict[str, Any] | None = None) -> tuple[RunState, list[Any]]:
    return advance(w, new_run(w, "r1", "default", inputs or {}, 0.0), Tick(0.0), random.Random(1).random)


def test_the_example_runs_the_draft_branch_for_a_calm_ticket() -> None:
    w = triage()
    rng = random.Random(0).random
    s, acts = start(w, {"ticket": "Where is my invoice?"})
    (c,) = calls(acts)
    assert c.step == "sentiment" and "Where is my invoice?" in c.request["messages"][0]["content"]
    s, acts = advance(w, s, StepSucceeded("sentiment", 1, {"text": "", "json": {"sentiment": "neutral"}}, 1.0), rng)
    (c,) = calls(acts)
    assert c.step == "classify" and "sentiment is neutral" in c.request["messages"][0]["content"]
    s, acts = advance(w, s, StepSucceeded("classify", 1, {"json": {"topic": "billing", "urgent": False}}, 2.0), rng)
    assert [c.step for c in calls(acts)] == ["draft"]
    assert s.steps["page-oncall"].phase == "Skipped"
    s, acts = advance(w, s, StepSucceeded("draft", 1, {"text": "Hello", "json": None}, 3.0), rng)
    (c,) = calls(acts)
    assert c.step == "post-to-helpdesk" and c.request["method"] == "POST"
    assert '"draft":"Hello"' in c.request["body"] and '"topic":"billing"' in c.request["body"]
    s, acts = advance(w, s, StepSucceeded("post-to-helpdesk", 1, {"status": 201}, 4.0), rng)
    assert s.phase == "Succeeded" and s.steps["report-failure"].phase == "Skipped"
    assert acts == [Finish("Succeeded")]


def test_an_urgent_ticket_pages_a_person_and_skips_the_draft_and_its_dependents() -> None:
    w = triage()
    rng = random.Random(0).random
    s, _ = start(w, {"ticket": "Everything is down"})
    s, _ = advance(w, s, StepSucceeded("sentiment", 1, {"json": {"sentiment": "negative"}}, 1.0), rng)
    s, acts = advance(w, s, StepSucceeded("classify", 1, {"json": {"topic": "outage", "urgent": True}}, 2.0), rng)
    assert [c.step for c in calls(acts)] == ["page-oncall"]
    assert s.steps["draft"].phase == "Skipped" and s.steps["post-to-helpdesk"].phase == "Skipped"
    assert "dependency 'draft' was skipped" in s.steps["post-to-helpdesk"].message


def test_a_failed_attempt_is_retried_with_jittered_backoff_and_honours_retry_after() -> None:
    w = wf([ai("a", retry={"limit": 2, "backoff": {"initial": "1s", "factor": 2, "max": "10s"}})])
    rng = random.Random(7)
    s, acts = start(w)
    s, acts = advance(w, s, StepFailed("a", 1, "upstream 503", 10.0), rng.random)
    (wake,) = [a for a in acts if isinstance(a, Wake)]
    assert 10.5 <= wake.at <= 11.0 and s.steps["a"].phase == "Pending"
    s, acts = advance(w, s, Tick(wake.at - 0.01), rng.random)
    assert not calls(acts)  # not yet
    s, acts = advance(w, s, Tick(wake.at), rng.random)
    (c,) = calls(acts)
    assert c.attempt == 2
    s, acts = advance(w, s, StepFailed("a", 2, "quota", 20.0, retry_after=30.0), rng.random)
    (wake,) = [a for a in acts if isinstance(a, Wake)]
    assert wake.at == 50.0  # Retry-After beats the 1-2 s backoff
    s, acts = advance(w, s, Tick(50.0), rng.random)
    s, acts = advance(w, s, StepFailed("a", 3, "upstream 503", 51.0), rng.random)
    assert s.phase == "Failed" and "after 3 attempts" in s.steps["a"].message
    assert "step 'a' failed: upstream 503" in s.message


def test_backoff_is_capped_and_deterministic_for_a_given_rng() -> None:
    assert backoff(1, 2, 5, 10, lambda: 0.999) <= 5
    assert backoff(1, 2, 60, 3, lambda: 0.0) == 2.0
    assert backoff(1, 2, 60, 3, random.Random(3).random) == backoff(1, 2, 60, 3, random.Random(3).random)


def test_a_late_or_repeated_outcome_for_an_attempt_counts_once() -> None:
    w = wf([ai("a"), ai("b", "a")])
    rng = random.Random(0).random
    s, _ = start(w)
    s, acts = advance(w, s, StepSucceeded("a", 1, {"text": "x"}, 1.0), rng)
    assert [c.step for c in calls(acts)] == ["b"]
    s2, acts = advance(w, s, StepSucceeded("a", 1, {"text": "again"}, 2.0), rng)
    assert not calls(acts) and s2.steps["a"].outputs == {"text": "x"}
    s3, _ = advance(w, s2, StepFailed("b", 7, "stale", 3.0), rng)
    assert s3.steps["b"].phase == "Running"


def test_on_failure_continue_goes_on_with_independent_steps_and_skips_dependents() -> None:
    w = wf([ai("a", onFailure="continue"), ai("b", "a"), ai("c")])
    rng = random.Random(0).random
    s, acts = start(w)
    assert sorted(c.step for c in calls(acts)) == ["a", "c"]
    s, _ = advance(w, s, StepFailed("a", 1, "boom", 1.0, final=True), rng)
    assert s.steps["b"].phase == "Skipped" and s.phase == "Running"
    s, acts = advance(w, s, StepSucceeded("c", 1, {}, 2.0), rng)
    assert s.phase == "Succeeded"


def test_a_failing_step_aborts_what_is_in_flight_and_exit_steps_see_the_outcome() -> None:
    exit_step = {"name": "notify", "type": "transform", "when": 'run.phase == "Failed"', "transform": {"expression": '"run " + run.name + " failed"'}}
    w = wf([ai("a"), ai("b"), ai("c", "a")], exitSteps=[exit_step])
    rng = random.Random(0).random
    s, _ = start(w)
    s, acts = advance(w, s, StepFailed("a", 1, "boom", 1.0, final=True), rng)
    assert Abort("b", 1) in acts
    assert s.steps["c"].phase == "Skipped" and s.steps["b"].phase == "Failed"
    assert s.phase == "Failed" and s.steps["notify"].outputs == "run r1 failed"


def test_cancel_aborts_in_flight_attempts_and_the_run_ends_cancelled() -> None:
    w = wf([ai("a"), ai("b", "a")])
    s, _ = start(w)
    s, acts = advance(w, s, Cancel(1.0, "cancelled by the caller"), random.Random(0).random)
    assert Abort("a", 1) in acts and s.phase == "Cancelled" and s.steps["b"].phase == "Skipped"
    assert advance(w, s, StepSucceeded("a", 1, {}, 2.0), random.Random(0).random) == (s, [])


def test_parallelism_caps_steps_in_flight() -> None:
    w = wf([ai(f"s{i}") for i in range(5)], parallelism=2)
    s, acts = start(w)
    assert len(calls(acts)) == 2
    s, acts = advance(w, s, StepSucceeded("s0", 1, {}, 1.0), random.Random(0).random)
    assert [c.step for c in calls(acts)] == ["s2"]


def test_the_run_timeout_fails_the_run() -> None:
    w = wf([ai("a")], timeout="10s")
    s, acts = start(w)
    assert Wake(10.0) in acts
    s, acts = advance(w, s, Tick(10.0), random.Random(0).random)
    assert s.phase == "Failed" and "timed out after 10s" in s.message and Abort("a", 1) in acts


def test_state_survives_a_round_trip_through_json() -> None:
    w = triage()
    s, _ = start(w, {"ticket": "t"})
    s, _ = advance(w, s, StepSucceeded("sentiment", 1, {"json": {"sentiment": "neutral"}}, 1.0, tokens={"input": 3, "output": 1, "total": 4}), random.Random(0).random)
    assert RunState.from_json(s.to_json()) == s


@pytest.mark.parametrize(
    ("steps", "reason", "words"),
    [
        ([ai("a", "b"), ai("b", "a")], "DependencyCycle", "cycle among a, b"),
        ([ai("a", "zz")], "UnknownDependency", "step 'a': dependsOn names 'zz'"),
        ([{**ai("a"), "when": "inputs.x +"}], "InvalidExpression", "step 'a'"),
        ([{**ai("a"), "when": "nope == 1"}], "InvalidExpression", "refers to nope"),
        ([ai("a"), {**ai("b"), "when": "steps.a.phase == 'Succeeded'"}], "InvalidExpression", "step 'b': reads steps.a, which it does not depend on"),
        ([{"name": "a", "type": "ai-inference", "aiInference": {"binding": "ghost", "prompt": "p"}}], "BindingNotFound", "step 'a': AIModelBinding 'ghost'"),
        ([{"name": "a", "type": "container", "container": {"image": "busybox"}}], "ContainerStepNeedsCluster", "step 'a'"),
    ],
)
def test_a_spec_the_engine_cannot_run_is_refused_naming_the_step(steps: list[dict[str, Any]], reason: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        wf(steps)
    assert err.value.reason == reason and words in err.value.message


# --- property: random DAGs, random outcomes -----------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int]:
    n = draw(st.integers(1, 8))
    steps = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        step = ai(f"s{i}", *[f"s{d}" for d in deps])
        step["retry"] = {"limit": draw(st.integers(0, 2)), "backoff": {"initial": "1s"}}
        step["onFailure"] = draw(st.sampled_from(["fail", "continue"]))
        step["onDependencySkipped"] = draw(st.sampled_from(["skip", "run"]))
        if draw(st.booleans()):
            step["when"] = "inputs.go"  # a boolean input: false skips the step
        steps.append(step)
    return steps, draw(st.integers(0, 8))


@settings(max_examples=150, deadline=None)
@given(dags(), st.randoms(use_true_random=False), st.booleans(), st.integers(0, 3))
def test_any_dag_under_any_outcomes_respects_dependencies_runs_each_attempt_once_and_terminates(
    dag: tuple[list[dict[str, Any]], int], rnd: random.Random, go: bool, parallelism: int
) -> None:
    steps, _ = dag
    w = wf(steps, parallelism=parallelism)
    specs = {s.spec.name: s.spec for s in w.steps}
    s, acts = advance(w, new_run(w, "r", "default", {"go": go}, 0.0), Tick(0.0), rnd.random)
    now, started, in_flight, events = 0.0, set(), {}, 0
    while not s.done:
        for a in acts:
            if isinstance(a, Call):
                assert (a.step, a.attempt) not in started, "an attempt started twice"
                started.add((a.step, a.attempt))
                for d in specs[a.step].depends_on:
                    assert s.steps[d].phase in ("Succeeded", "Skipped"), f"{a.step} started before {d} finished"
                    assert s.steps[d].phase == "Succeeded" or specs[a.step].on_dependency_skipped == "run"
                in_flight[a.step] = a.attempt
            elif isinstance(a, Abort):
                in_flight.pop(a.step, None)
        if parallelism:
            assert sum(1 for x in s.steps.values() if x.phase == "Running") <= parallelism
        now += 1.0
        if in_flight:
            name = rnd.choice(sorted(in_flight))
            attempt = in_flight.pop(name)
            if rnd.random() < 0.6:
                ev: Any = StepSucceeded(name, attempt, {"ok": True}, now)
            else:
                ev = StepFailed(name, attempt, "boom", now, final=rnd.random() < 0.3)
        else:
            now += 100.0  # past any backoff
            ev = Tick(now)
        s, acts = advance(w, s, ev, rnd.random)
        events += 1
        assert events < 500, "the run did not terminate"
    for name, st_ in s.steps.items():
        assert st_.phase in ("Succeeded", "Failed", "Skipped")
        for d in specs[name].depends_on:
            if s.steps[d].phase == "Failed" and st_.phase != "Failed":
                assert st_.phase == "Skipped"
        if not go and specs[name].when:
            assert st_.phase in ("Skipped", "Failed") or s.outcome == "Failed"


def test_an_expression_sees_every_step_it_reads_however_it_reads_them() -> None:
    from controller.workflow.expr import compile_expr

    act = {"inputs": {"n": 2}, "steps": {"a": {"phase": "Succeeded", "outputs": 1}, "b-c": {"phase": "Skipped", "outputs": None}}, "run": {"name": "r", "phase": "Running"}, "params": {}}
    assert compile_expr('steps.a.outputs + inputs.n').eval(act) == 3
    assert compile_expr('steps["b-c"].phase').eval(act) == "Skipped"
    assert compile_expr("size(steps)").eval(act) == 2  # not by name: the whole map
    assert compile_expr('steps.exists(s, s == "b-c") && steps.a.outputs == 1').eval(act) is True
    assert compile_expr('"steps.a" + run.name').eval(act) == "steps.ar"
