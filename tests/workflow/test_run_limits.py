"""Limits on runs started over HTTP, through the real stack (Envoy, extproc, the controller's engine,
the mock): a tenant's cap on active runs (429 with Retry-After, holding under concurrent starts,
per tenant), the time-to-live and kept number of finished runs, and the size of a start's body.

The stack's controller runs with a cap of 4 active runs per tenant, finished runs started over
HTTP kept 3 s and at most 2 per workflow and tenant (its flags' environment variables).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from crdgol.stack import Stack, StackSettings
from tests.conftest import ROOT

CAP, TTL, KEEP = 4, 3.0, 2
MINE = {"authorization": "Bearer sk-limits-team-a"}
THEIRS = {"authorization": "Bearer sk-limits-team-b"}

MANIFESTS = """
apiVersion: v1
kind: Secret
metadata: {name: team-a-key, namespace: default, labels: {crdgol.io/api-key: "true"}, annotations: {crdgol.io/tenant: team-a}}
stringData: {key: sk-limits-team-a}
---
apiVersion: v1
kind: Secret
metadata: {name: team-b-key, namespace: default, labels: {crdgol.io/api-key: "true"}, annotations: {crdgol.io/tenant: team-b}}
stringData: {key: sk-limits-team-b}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: held, namespace: default}
spec:
  steps:
    - name: call
      type: http-request
      timeout: 60s
      httpRequest: {method: POST, url: "http://127.0.0.1:MOCK/helpdesk/slow", body: "held"}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: quick, namespace: default}
spec:
  steps:
    - {name: add, type: transform, transform: {expression: "inputs.n + 1"}}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: short-lived, namespace: default}
spec:
  ttlAfterFinished: 1s
  steps:
    - {name: add, type: transform, transform: {expression: "1"}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("limits")
    folder = tmp / "manifests"
    folder.mkdir()
    env = {"CRDGOL_WORKFLOW_MAX_ACTIVE_RUNS": str(CAP), "CRDGOL_WORKFLOW_RUN_TTL": f"{TTL:g}s", "CRDGOL_WORKFLOW_KEEP_FINISHED_RUNS": str(KEEP)}
    s = Stack(StackSettings(manifests=folder, quiet=True, state_dir=tmp / "state", env=env))
    (folder / "limits.yaml").write_text(MANIFESTS.replace("MOCK", str(s.mock_port)))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def nothing_held(stack: Stack) -> Iterator[None]:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"fail_next": 0, "delay_ms": 0})
    yield
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 0})
    for headers in (MINE, THEIRS):  # cancel whatever a test left going
        for run in runs(stack, headers):
            if run["phase"] in ("Pending", "Running"):
                httpx.delete(f"{stack.url}/v1/workflows/runs/{run['name']}", headers=headers, timeout=30)


def runs(stack: Stack, headers: dict[str, str]) -> list[dict[str, Any]]:
    r = httpx.get(f"{stack.url}/v1/workflows/runs", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["runs"])


def post(stack: Stack, workflow: str, headers: dict[str, str], **inputs: Any) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/workflows/{workflow}/runs", json={"inputs": inputs}, headers=headers, timeout=30)


def wait_until(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


async def start_at_once(stack: Stack, headers: dict[str, str], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(headers=headers, timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        return list(await asyncio.gather(*(client.post(f"{stack.url}/v1/workflows/held/runs", json={"inputs": {}}) for _ in range(n))))


def test_concurrent_starts_beyond_a_tenants_cap_get_429_with_retry_after_and_exactly_the_cap_run(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 20_000})
    answers = asyncio.run(start_at_once(stack, MINE, 24))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * CAP + [429] * (24 - CAP)
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "5" and refused.headers["content-type"].startswith("application/json")
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "too_many_active_runs"
    assert f"{CAP} workflow runs Pending or Running" in err["message"] and "default/team-a" in err["message"]
    assert sum(1 for r in runs(stack, MINE) if r["phase"] in ("Pending", "Running")) == CAP
    # The cap is the tenant's: another tenant of the same namespace starts its runs, and sees none of these.
    theirs = post(stack, "held", THEIRS)
    assert theirs.status_code == 201, theirs.text
    assert [r["name"] for r in runs(stack, THEIRS)] == [theirs.json()["name"]]
    # A finished run frees its place.
    first = next(r for r in answers if r.status_code == 201).json()["name"]
    assert httpx.delete(f"{stack.url}/v1/workflows/runs/{first}", headers=MINE, timeout=30).json()["phase"] == "Cancelled"
    assert post(stack, "held", MINE).status_code == 201
    assert post(stack, "held", MINE).status_code == 429


def test_the_cli_says_plainly_that_the_tenant_has_too_many_runs(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 20_000})
    for _ in range(CAP):
        assert post(stack, "held", MINE).status_code == 201
    done = subprocess.run(
        [sys.executable, "-m", "crdgol.cli", "workflow", "--gateway", stack.url, "--api-key", "sk-limits-team-a", "run", "held", "--wait"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1
    assert "too many runs going" in done.stderr and f"({CAP})" in done.stderr and "retry in 5 s" in done.stderr
    assert json.loads(done.stdout)["error"]["code"] == "too_many_active_runs"


def test_a_finished_run_started_over_http_is_removed_after_its_ttl_with_its_journal(stack: Stack) -> None:
    r = post(stack, "quick", THEIRS, n=1)
    name = r.json()["name"]
    journal = stack.state / "workflows" / "runs" / f"default.{name}.jsonl"
    wait_until(lambda: httpx.get(f"{stack.url}/v1/workflows/runs/{name}", headers=THEIRS).json().get("phase") == "Succeeded")
    assert journal.exists()
    ended = time.monotonic()
    wait_until(lambda: httpx.get(f"{stack.url}/v1/workflows/runs/{name}", headers=THEIRS).status_code == 404)
    assert time.monotonic() - ended >= TTL - 1.0  # not before its time (within the sweep's second)
    assert not journal.exists()


def test_only_the_newest_finished_runs_of_a_workflow_are_kept_per_tenant(stack: Stack) -> None:
    names = []
    for i in range(KEEP + 3):
        names.append(post(stack, "quick", MINE, n=i).json()["name"])
        wait_until(lambda: httpx.get(f"{stack.url}/v1/workflows/runs/{names[-1]}", headers=MINE).json().get("phase") == "Succeeded")
    other = post(stack, "quick", THEIRS, n=0).json()["name"]
    wait_until(lambda: sorted(r["name"] for r in runs(stack, MINE) if r["workflow"] == "quick") == sorted(names[-KEEP:]), timeout=2.5)
    assert other in [r["name"] for r in runs(stack, THEIRS)]  # team-a's churn did not push team-b's run out


def test_a_run_declared_in_the_folder_is_kept_unless_gone_from_it_and_its_spec_asks(stack: Stack) -> None:
    manifest = stack.settings.manifests / "declared.yaml"
    manifest.write_text(textwrap.dedent("""
        apiVersion: crdgol.io/v1alpha1
        kind: WorkflowRun
        metadata: {name: declared-quick, namespace: default}
        spec: {workflowRef: {name: quick}, inputs: {n: 1}, apiKeySecretRef: {name: team-a-key, key: key}}
        ---
        apiVersion: crdgol.io/v1alpha1
        kind: WorkflowRun
        metadata: {name: declared-short, namespace: default}
        spec: {workflowRef: {name: short-lived}, apiKeySecretRef: {name: team-a-key, key: key}}
    """))
    try:
        wait_until(lambda: {r["name"]: r["phase"] for r in runs(stack, MINE)}.get("declared-short") == "Succeeded")
        time.sleep(TTL + 1.5)  # past both TTLs: the folder still declares them, so both stay
        names = [r["name"] for r in runs(stack, MINE)]
        assert "declared-quick" in names and "declared-short" in names
    finally:
        manifest.unlink()
    # Out of the folder: the run of the spec that asks (ttlAfterFinished) goes; the other stays,
    # since the controller's defaults apply to runs started over HTTP only.
    wait_until(lambda: "declared-short" not in [r["name"] for r in runs(stack, MINE)])
    assert "declared-quick" in [r["name"] for r in runs(stack, MINE)]


def test_a_start_with_a_body_over_the_limit_is_a_413_in_the_gateways_shape(stack: Stack) -> None:
    r = post(stack, "quick", MINE, n=1, blob="x" * (300 * 1024))
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and "256 KiB" in r.json()["error"]["message"]
    assert post(stack, "quick", MINE, n=1, blob="x" * (200 * 1024)).status_code == 201


def test_a_started_runs_first_step_is_already_running_in_its_201_and_holds_up_no_other_request(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 20_000})
    with httpx.Client(headers=MINE, timeout=30) as client:  # one connection, reused where it can be
        first = client.post(f"{stack.url}/v1/workflows/held/runs", json={"inputs": {}})
        assert first.status_code == 201
        assert first.json()["phase"] == "Running" and first.json()["steps"][0]["phase"] == "Running"
        # That call goes on for 20 s in the controller; the next requests do not wait for it.
        started = time.monotonic()
        assert client.post(f"{stack.url}/v1/workflows/quick/runs", json={"inputs": {"n": 1}}).status_code == 201
        assert client.get(f"{stack.url}/v1/workflows/runs/{first.json()['name']}").json()["phase"] == "Running"
        assert time.monotonic() - started < 5
