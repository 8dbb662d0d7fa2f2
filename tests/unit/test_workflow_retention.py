"""Which finished workflow runs are removed: the controller's defaults for runs started over HTTP,
a WorkflowSpec's own ttlAfterFinished / keepFinishedRuns for every run of it."""

from __future__ import annotations

import pytest

from controller.models import SpecError
from controller.workflow.retention import FinishedRun, RunLimits, SpecRetention, to_remove
from controller.workflow.spec import parse_workflow

LIMITS = RunLimits(max_active_per_tenant=10, finished_ttl=100.0, keep_finished=3)


def run(name: str, ended: float, *, api: bool = True, tenant: str = "team/a", workflow: str = "team/w") -> FinishedRun:
    return FinishedRun(f"team/{name}", workflow, tenant, ended, api)


def test_a_run_started_over_http_is_removed_once_the_default_ttl_has_passed() -> None:
    runs = [run("old", 0.0), run("young", 50.0)]
    assert to_remove(runs, 99.0, LIMITS, {}) == []
    assert to_remove(runs, 100.0, LIMITS, {}) == ["team/old"]


def test_beyond_the_kept_number_the_oldest_finished_runs_of_a_workflow_and_tenant_go_first() -> None:
    runs = [run(f"r{i}", float(i)) for i in (4, 1, 3, 0, 2)]
    assert sorted(to_remove(runs, 10.0, LIMITS, {})) == ["team/r0", "team/r1"]


def test_one_tenants_runs_do_not_push_out_another_tenants() -> None:
    mine = [run(f"a{i}", float(i)) for i in range(3)]
    theirs = [run(f"b{i}", 10.0 + i, tenant="team/b") for i in range(50)]
    gone = to_remove(mine + theirs, 20.0, LIMITS, {})
    assert not [k for k in gone if k.startswith("team/a")] and len(gone) == 47


def test_a_run_created_as_a_resource_is_kept_unless_its_spec_asks() -> None:
    runs = [run("by-hand", 0.0, api=False), *(run(f"h{i}", 1.0 + i, api=False) for i in range(5))]
    assert to_remove(runs, 10_000.0, LIMITS, {}) == []
    assert sorted(to_remove(runs, 10.0, LIMITS, {"team/w": SpecRetention(keep=2)})) == ["team/by-hand", "team/h0", "team/h1", "team/h2"]
    # A spec that sets one of the two gets the controller's default for the other, for all its runs.
    assert to_remove(runs, 5.5, LIMITS, {"team/w": SpecRetention(ttl=5.0)}) == ["team/by-hand", "team/h0", "team/h1"]


def test_a_specs_own_values_replace_the_controllers_for_its_runs_only() -> None:
    runs = [run("w-run", 0.0), run("v-run", 0.0, workflow="team/v")]
    assert to_remove(runs, 150.0, LIMITS, {"team/w": SpecRetention(ttl=1000.0)}) == ["team/v-run"]
    assert to_remove([run(f"r{i}", float(i)) for i in range(5)], 10.0, LIMITS, {"team/w": SpecRetention(keep=10)}) == []
    assert to_remove([run("r", 0.0)], 1.0, LIMITS, {"team/w": SpecRetention(keep=0)}) == ["team/r"]


def test_a_spec_parses_its_retention_and_refuses_nonsense() -> None:
    def parse(**spec: object) -> tuple[float | None, int | None]:
        doc = {"metadata": {"name": "w"}, "spec": {"steps": [{"name": "a", "type": "transform", "transform": {"expression": "1"}}], **spec}}
        parsed = parse_workflow(doc)
        return parsed.ttl_after_finished, parsed.keep_finished_runs

    assert parse() == (None, None)
    assert parse(ttlAfterFinished="90m", keepFinishedRuns=0) == (5400.0, 0)
    with pytest.raises(SpecError, match="keepFinishedRuns"):
        parse(keepFinishedRuns=-1)
    with pytest.raises(SpecError, match="ttlAfterFinished"):
        parse(ttlAfterFinished="0s")


async def test_on_a_cluster_a_run_stays_counted_while_the_operator_picks_it_up() -> None:
    """The run API counts a run it created until the operator has it live: a start in between
    (the operator reading the run's Secret) must not find it counted nowhere."""
    import asyncio
    from typing import Any

    import kopf
    from prometheus_client import CollectorRegistry

    from controller.envoy_config import RenderSettings
    from controller.state import ControllerState
    from controller.workflow.cluster import ClusterWorkflows, ClusterWorkflowSettings
    from controller.workflow.runner import WorkflowMetrics

    secret_read = asyncio.Event()
    release = asyncio.Event()
    secret = {"metadata": {"name": "k", "namespace": "team", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "a"}},
              "data": {"key": "c2stYQ=="}}

    async def request(method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        if "/secrets/" in path:
            secret_read.set()
            await release.wait()
            return 200, secret
        return 200, {}

    async def publish() -> None:
        pass

    engine = ClusterWorkflows(ClusterWorkflowSettings(gateway_url="http://127.0.0.1:9", limits=RunLimits(max_active_per_tenant=1)),
                              ControllerState(RenderSettings()), request, publish, WorkflowMetrics(CollectorRegistry()))
    doc = {"metadata": {"name": "w", "namespace": "team", "generation": 1}, "spec": {"steps": [{"name": "a", "type": "transform", "transform": {"expression": "1"}}]}}
    await engine.spec_changed(kopf.Body(doc))  # type: ignore[arg-type]
    assert engine.admit("team/a", "team/w-1") is None
    body = {"metadata": {"name": "w-1", "namespace": "team", "uid": "u"}, "spec": {"workflowRef": {"name": "w"}, "apiKeySecretRef": {"name": "k", "key": "key"}}}
    picking_up = asyncio.create_task(engine.run_started(kopf.Body(body)))  # type: ignore[arg-type]
    await secret_read.wait()
    assert engine.admit("team/a", "team/w-2") == 1  # still counted while the operator reads its Secret
    release.set()
    await picking_up
    await engine.close()
