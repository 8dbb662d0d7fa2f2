"""The cluster adapter's pure parts: a container step's Job, the run's status record, step cost."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.workflow.accept import accept
from controller.workflow.cost import BackendPrice, cost_micros, money, parse_money, prices_by_model
from controller.workflow.engine import (
    Call,
    RunState,
    StepFailed,
    StepSucceeded,
    Tick,
    advance,
    new_run,
)
from controller.workflow.jobs import job_manifest, job_name
from controller.workflow.spec import parse_workflow
from controller.workflow.status import k8s_status, state_from_status
from crdgol.pb import policy_pb2 as pb
from extproc.quota import Price
from extproc.quota import cost_micros as gateway_cost_micros

ROOT = Path(__file__).resolve().parents[2]

CONTAINER_SPEC = {
    "metadata": {"name": "crunch", "namespace": "team-a"},
    "spec": {
        "steps": [
            {"name": "ask", "type": "ai-inference", "aiInference": {"binding": "chat", "prompt": "{{ inputs.text }}"}},
            {
                "name": "crunch",
                "type": "container",
                "dependsOn": ["ask"],
                "timeout": "90500ms",
                "retry": {"limit": 1, "backoff": {"initial": "10s"}},
                "inputs": {"summary": "{{ steps.ask.outputs.text }}"},
                "container": {"image": "ghcr.io/example/cruncher:1", "args": ["--for", "{{ inputs.text }}"], "env": [{"name": "MODE", "value": "{{ inputs.mode }}"}]},
            },
        ],
        "exitSteps": [{"name": "tell", "type": "transform", "transform": {"expression": "run.phase"}}],
    },
}


def compiled() -> Any:
    return accept(parse_workflow(CONTAINER_SPEC), {"chat": "chat"}, prices={"chat": (BackendPrice("gpt-4o", 2_500_000, 10_000_000),)})


def run_to_container_step() -> tuple[Any, RunState, Call]:
    wf = compiled()
    rng = random.Random(1).random
    state = new_run(wf, "crunch-7", "team-a", {"text": "ticket", "mode": "fast"}, 1000.0, tenant="team-a/a", api_key_ref="team-a/k/key")
    state, actions = advance(wf, state, Tick(1000.0), rng)
    assert [a.step for a in actions if isinstance(a, Call)] == ["ask"]
    state, actions = advance(wf, state, StepSucceeded("ask", 1, {"text": "summary"}, 1001.5, tokens={"input": 10, "output": 4, "total": 14}, cost_micros=65), rng)
    (call,) = [a for a in actions if isinstance(a, Call)]
    return wf, state, call


def test_a_container_steps_job_is_a_valid_kubernetes_job_owned_by_its_run() -> None:
    _, state, call = run_to_container_step()
    job = job_manifest(state, "0f0e-uid", call)
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    assert job["metadata"]["name"] == "crunch-7-crunch-1" and job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "0f0e-uid"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 91
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--for", "ticket"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MODE"] == "fast" and env["CRDGOL_PARAMS"] == '{"summary":"summary"}'
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_job_names_stay_within_a_label_value_and_apart() -> None:
    long_run = "r" * 60
    names = {job_name(long_run, step, attempt) for step in ("a-step", "b-step") for attempt in (1, 2)}
    assert len(names) == 4 and all(len(n) <= 63 for n in names)
    assert job_name("short", "s", 1) == "short-s-1"


def test_a_runs_status_record_reads_back_as_the_same_run() -> None:
    wf, state, _ = run_to_container_step()
    state, _ = advance(wf, state, StepFailed("crunch", 1, "Job crunch-7-crunch-1: BackoffLimitExceeded", 1003.0), random.Random(2).random)
    status = k8s_status(state, 1, 1003.0)
    back = state_from_status(status, wf, "crunch-7", "team-a", state.inputs, state.created_at, state.api_key_ref)
    assert back.phase == state.phase and back.outcome == state.outcome and back.tenant == "team-a/a"
    for name, s in state.steps.items():
        b = back.steps[name]
        assert (b.phase, b.attempts, b.outputs, b.tokens, b.cost_micros, b.message) == (s.phase, s.attempts, s.outputs, s.tokens, s.cost_micros, s.message)
    # Times are recorded to the second; a pending retry keeps its time.
    assert back.steps["crunch"].retry_at == int(state.steps["crunch"].retry_at or 0)
    assert status["steps"][0]["cost"] == "0.000065" and status["cost"] == "0.000065"


def test_the_status_record_fits_the_workflowrun_crds_status_schema() -> None:
    crd = yaml.safe_load((ROOT / "deploy" / "crds" / "workflowruns.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    wf, state, _ = run_to_container_step()
    for doc in (k8s_status(state, 3, 1002.0), k8s_status(advance(wf, state, StepSucceeded("crunch", 1, {"exitCode": 0}, 1004.0), random.Random(3).random)[0], 3, 1005.0)):
        jsonschema.validate({k: v for k, v in doc.items() if v is not None}, schema)
    assert doc["phase"] == "Succeeded" and doc["conditions"][1] == doc["conditions"][1] | {"type": "Completed", "status": "True", "reason": "Succeeded"}


@pytest.mark.parametrize(("tokens_in", "tokens_out"), [(0, 0), (1, 1), (999_999, 3), (123_456, 654_321)])
def test_a_steps_cost_is_what_the_gateway_charges_for_the_same_tokens(tokens_in: int, tokens_out: int) -> None:
    prices = (BackendPrice("gpt-4o", 2_500_000, 10_000_000),)
    assert cost_micros(prices, "gpt-4o", tokens_in, tokens_out) == gateway_cost_micros(Price(2_500_000, 10_000_000), tokens_in, tokens_out)


def test_a_cost_is_given_only_when_the_backend_that_answered_has_one_price() -> None:
    two = (BackendPrice("gpt-4o", 2_000_000, 8_000_000), BackendPrice("claude", 3_000_000, 15_000_000))
    assert cost_micros(two, "gpt-4o-2024-08-06", 1_000_000, 0) == 2_000_000  # the reply names its model
    assert cost_micros(two, "claude", 0, 1_000_000) == 15_000_000
    assert cost_micros(two, "something-else", 1, 1) is None  # not determined: no guess
    same = (BackendPrice("a", 1_000_000, 1_000_000), BackendPrice("b", 1_000_000, 1_000_000))
    assert cost_micros(same, "whatever", 500_000, 500_000) == 1_000_000
    assert cost_micros((), "gpt-4o", 10, 10) is None


def test_only_priced_bindings_give_prices() -> None:
    priced = pb.Binding(key="default/a", model="a", backends=[pb.Backend(model="m", input_per_mtok_micros=1, output_per_mtok_micros=2)])
    free = pb.Binding(key="default/b", model="b", backends=[pb.Backend(model="m")])
    assert prices_by_model([priced, free]) == {"a": (BackendPrice("m", 1, 2),)}


def test_money_is_exact_decimal_text() -> None:
    for micros in (0, 1, 150, 1_000_000, 123_456_789):
        assert parse_money(money(micros)) == micros
    assert money(150) == "0.000150"
    assert parse_money("1.5") == 1_500_000 and parse_money("x") is None and parse_money(3) is None


def test_a_status_too_big_for_the_api_server_has_its_largest_outputs_cut() -> None:
    from controller.workflow.cluster import fit_status

    status = {"phase": "Running", "steps": [{"name": f"s{i}", "phase": "Succeeded", "outputs": {"text": "x" * (30_000 if i % 2 else 10)}} for i in range(40)]}
    small = {"name": "s0", "phase": "Succeeded", "outputs": {"text": "x" * 10}}
    cut = fit_status(copy.deepcopy(status), limit=200_000)
    assert len(json.dumps(cut)) <= 200_000
    assert cut["steps"][0] == small  # small outputs are kept
    trimmed = [s for s in cut["steps"] if s.get("outputsTruncated")]
    assert trimmed and all(len(s["outputs"]["preview"]) <= 1024 for s in trimmed)
    assert fit_status(copy.deepcopy(status)) == status  # under the real limit: untouched
