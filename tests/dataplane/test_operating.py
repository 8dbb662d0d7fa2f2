"""What an operator sees: Envoy's JSON access log, spend and latency metrics, and the dashboard's
queries answered by a real Prometheus scraping a live stack.

One stack for the module: a binding whose first backend always fails (503), so every request falls
back to a priced Anthropic backend (translated, streamed or not), with a daily budget. Canary
values (the client's key, the provider's key, a prompt) are searched for in everything the stack
wrote.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from crdgol.stack import Stack, StackSettings, free_port, stop_process, wait_http
from tests.conftest import MockProcess

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
CLIENT_KEY = "sk-canary-client-7f3a9c"
PROVIDER_KEY = "sk-canary-provider-51be02"
WRONG_KEY = "sk-canary-wrong-d4e8a1"
PROMPT = "canary prompt: the heron flies at midnight"
RESCUE_PRICE = (3, 15)  # per million tokens, input and output (pricing below)


@dataclass
class Observed:
    stack: Stack
    access_log: Path

    def post(self, body: dict[str, Any], key: str = CLIENT_KEY, **headers: str) -> httpx.Response:
        h = {"authorization": f"Bearer {key}", **headers}
        return httpx.post(f"{self.stack.url}/v1/chat/completions", json=body, headers=h, timeout=30)

    def chat(self, *, stream: bool, request_id: str = "") -> httpx.Response:
        headers = {"x-request-id": request_id} if request_id else {}
        return self.post({"model": "obs", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}, **headers)

    def lines(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(ln) for ln in self.access_log.read_text().splitlines() if ln.strip()]

    def line(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The access-log line of one request (Envoy flushes the file every second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [ln for ln in self.lines() if ln["request_id"] == request_id]
            if found:
                assert len(found) == 1
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no access-log line for {request_id} in {timeout}s")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.stack.metrics_port}/metrics", timeout=10).text


def _manifests(folder: Path, flaky: str, rescue: str) -> None:
    def backend(name: str, provider: str, endpoint: str, model: str, priority: int, price: tuple[int, int]) -> dict[str, Any]:
        return {
            "name": name, "provider": provider, "endpoint": endpoint, "model": model, "priority": priority,
            "credentialsRef": {"name": "provider", "key": "apiKey"},
            "pricing": {"inputPerMillion": f"{price[0]}.00", "outputPerMillion": f"{price[1]}.00"},
        }

    binding = {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "obs", "namespace": "team-a"},
        "spec": {
            "model": "obs",
            "tenants": ["acme"],
            "backends": [
                backend("flaky", "openai-compatible", f"{flaky}/v1", "mock-gpt", 0, (1, 2)),
                backend("rescue", "anthropic", rescue, "rescue-claude", 1, RESCUE_PRICE),
            ],
            "quotas": {"tenants": {"acme": {"budget": {"amount": "1.00", "per": "day"}}}},
        },
    }
    (folder / "binding.yaml").write_text(json.dumps(binding))
    (folder / "secrets.yaml").write_text(textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: acme-key, namespace: team-a, labels: {{crdgol.io/api-key: "true"}}, annotations: {{crdgol.io/tenant: acme}}}}
        stringData: {{key: {CLIENT_KEY}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: provider, namespace: team-a}}
        stringData: {{apiKey: {PROVIDER_KEY}}}
    """))


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    folder = tmp_path_factory.mktemp("observed")
    flaky = MockProcess("--name", "flaky", "--fail-status", "503")
    state = tmp_path_factory.mktemp("state")
    access_log = state / "access.log"
    stack = Stack(StackSettings(manifests=folder, quiet=True, state_dir=state, access_log=str(access_log), mock_args=("--require-key", PROVIDER_KEY, "--chunk-delay-ms", "10"),
        env={"CRDGOL_LOG_FORMAT": "json", "CRDGOL_REPORT_INTERVAL": "0.5", "CRDGOL_USAGE_INTERVAL": "0.5"}))
    _manifests(folder, flaky.url, stack.mock_url)
    try:
        stack.start()
        yield Observed(stack, access_log)
    finally:
        stack.stop()
        flaky.stop()


def test_a_streamed_fallen_back_request_gets_one_line_with_who_what_where_and_cost(obs: Observed) -> None:
    rid = f"obs-{uuid.uuid4()}"
    r = obs.chat(stream=True, request_id=rid)
    assert r.status_code == 200 and "data: [DONE]" in r.text
    line = obs.line(rid)
    assert line["status"] == 200
    assert line["attempts"] == 2  # the first backend failed, the fallback answered
    assert (line["tenant"], line["binding"], line["operation"], line["api"]) == ("team-a/acme", "team-a/obs", "chat", "openai")
    assert line["backend"] == "crdgol-be.team-a.obs.rescue" and line["upstream_cluster"].startswith("crdgol-be.team-a.obs.rescue.")
    assert (line["provider"], line["model_requested"], line["model_served"]) == ("anthropic", "obs", "rescue-claude")
    assert line["input_tokens"] > 0 and line["output_tokens"] > 0
    expected_cost = (line["input_tokens"] * RESCUE_PRICE[0] + line["output_tokens"] * RESCUE_PRICE[1]) / 1_000_000
    assert math.isclose(line["cost"], expected_cost)
    assert line["policy_version"] == obs.stack.policy_version()
    assert 0 <= line["ttfb_ms"] <= line["duration_ms"]
    assert line["error"] is None and line["response_flags"] == "-"


def test_a_non_streamed_answer_settled_from_the_usage_log_still_has_who_where_and_its_tokens(obs: Observed) -> None:
    rid = f"obs-{uuid.uuid4()}"
    r = obs.chat(stream=False, request_id=rid)
    assert r.status_code == 200
    usage = r.json()["usage"]
    line = obs.line(rid)
    assert (line["tenant"], line["binding"], line["backend"], line["provider"]) == (
        "team-a/acme", "team-a/obs", "crdgol-be.team-a.obs.rescue", "anthropic"
    )
    assert line["attempts"] == 2 and line["status"] == 200
    # The tokens the client was told about, read by Envoy's usage filters (extproc never saw the body).
    assert (line["input_tokens"], line["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert line["cost"] is None  # computed when the usage log settles it: in crdgol_spend_total, not here


def test_spend_and_streaming_latency_are_exported_per_tenant_binding_and_backend(obs: Observed) -> None:
    def figures() -> tuple[float, float, float]:
        text = obs.metrics()

        def value(prefix: str) -> float:
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))

        labels = '{backend="crdgol-be.team-a.obs.rescue",binding="team-a/obs"'
        return (
            value(f'crdgol_spend_total{labels},tenant="team-a/acme"}}'),
            value(f"gen_ai_server_time_to_first_token_seconds_count{labels}"),
            value(f"gen_ai_server_time_per_output_token_seconds_count{labels}"),
        )

    spend, ttft, tpot = figures()
    rid = f"obs-{uuid.uuid4()}"
    assert obs.chat(stream=True, request_id=rid).status_code == 200
    after = figures()
    assert math.isclose(after[0] - spend, obs.line(rid)["cost"], rel_tol=1e-9)
    assert (after[1], after[2]) == (ttft + 1, tpot + 1)
    # A non-streamed answer costs money too, but has no first-token time. Its body is not read by
    # extproc (usage comes from Envoy's usage log, settled in batches), so spend arrives shortly
    # after the response and the access-log line carries no cost for it (README, access log).
    rid = f"obs-{uuid.uuid4()}"
    assert obs.chat(stream=False, request_id=rid).status_code == 200
    deadline = time.monotonic() + 5
    final = figures()
    while final[0] == after[0] and time.monotonic() < deadline:
        time.sleep(0.05)
        final = figures()
    assert final[0] > after[0]
    assert final[1:] == after[1:]


def test_the_bindings_status_says_what_it_served_and_cost_from_extprocs_reports(obs: Observed) -> None:
    def usage() -> dict[str, Any]:
        doc = httpx.get(f"http://127.0.0.1:{obs.stack.controller_port}/status", timeout=10).json()
        return dict(doc["bindings"]["team-a/obs"].get("usage") or {})

    def spent() -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in obs.metrics().splitlines() if ln.startswith("crdgol_spend_total{"))

    before = usage().get("requests", 0)
    assert obs.chat(stream=False).status_code == 200
    # The status follows /metrics within a report and a refresh (0.5 s each here).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        u = usage()
        if u.get("requests", 0) >= before + 1 and math.isclose(float(u["spend"]), spent(), abs_tol=1e-6):
            break
        time.sleep(0.2)
    assert u["requests"] >= before + 1 and u["inputTokens"] > 0 and u["outputTokens"] > 0
    assert math.isclose(float(u["spend"]), spent(), abs_tol=1e-6) and float(u["spend"]) > 0
    # extproc reads its Envoy's verdict on each backend from the admin API, as it does in a pod.
    from extproc.usage_report import envoy_health

    verdicts = {h.cluster.rsplit(".", 1)[0]: h for h in asyncio.run(envoy_health(f"http://127.0.0.1:{obs.stack.admin_port}"))}
    assert verdicts["crdgol-be.team-a.obs.rescue"].healthy


def test_a_refused_request_is_logged_with_the_reason_and_without_the_key(obs: Observed) -> None:
    rid = f"obs-{uuid.uuid4()}"
    r = obs.post({"model": "obs", "messages": [{"role": "user", "content": PROMPT}]}, key=WRONG_KEY, **{"x-request-id": rid})
    assert r.status_code == 401
    line = obs.line(rid)
    assert (line["status"], line["error"], line["tenant"], line["attempts"]) == (401, "invalid_api_key", None, 0)
    rid = f"obs-{uuid.uuid4()}"
    assert obs.post({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, **{"x-request-id": rid}).status_code == 404
    line = obs.line(rid)
    assert (line["status"], line["error"], line["model_requested"]) == (404, "model_not_found", "nope")


def test_no_key_or_prompt_text_appears_in_any_log_or_metric(obs: Observed) -> None:
    rid = f"obs-{uuid.uuid4()}"
    assert obs.chat(stream=False, request_id=rid).status_code == 200
    obs.line(rid)  # flushed
    assert obs.post({"model": "obs", "messages": [{"role": "user", "content": PROMPT}]}, key=WRONG_KEY).status_code == 401
    time.sleep(1.5)
    texts = {p.name: p.read_text(errors="replace") for p in obs.stack.state.glob("*.log")}
    texts["extproc /metrics"] = obs.metrics()
    texts["controller /metrics"] = httpx.get(f"http://127.0.0.1:{obs.stack.controller_port}/metrics", timeout=10).text
    texts["envoy stats"] = httpx.get(f"http://127.0.0.1:{obs.stack.admin_port}/stats/prometheus", timeout=10).text
    assert "access.log" in texts and len(obs.lines()) >= 3
    for canary in (CLIENT_KEY, PROVIDER_KEY, WRONG_KEY, PROMPT, "heron"):
        leaks = [name for name, text in texts.items() if canary in text]
        assert not leaks, f"{canary!r} found in {leaks}"


def test_with_the_json_log_format_every_crdgol_process_writes_json_lines(obs: Observed) -> None:
    for name in ("controller", "extproc", "mock-llm"):
        lines = [ln for ln in (obs.stack.state / f"{name}.log").read_text().splitlines() if ln.strip()]
        assert lines, name
        for ln in lines:
            doc = json.loads(ln)
            assert {"time", "level", "logger", "message"} <= set(doc), ln
        assert any("listening" in json.loads(ln)["message"] or "serving" in json.loads(ln)["message"] for ln in lines), name


# --- the dashboard and alerts against a real Prometheus ---------------------------------------


def _dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads((MONITORING / "crdgol-dashboard.json").read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel["targets"]:
            # Grafana's variables, as a user with "All" tenants would have them.
            expr = target["expr"].replace("$__rate_interval", "10s").replace("$tenant", ".*")
            out.append((panel["title"], expr))
    return out


@pytest.fixture
def prometheus(obs: Observed, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: apt-get install prometheus (.ci/run installs it)"
    port = free_port()
    s = obs.stack
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "crdgol-alerts.rules.yml")],
        "scrape_configs": [
            {"job_name": "crdgol-envoy", "metrics_path": "/stats/prometheus", "static_configs": [{"targets": [f"127.0.0.1:{s.admin_port}"]}]},
            {"job_name": "crdgol-extproc", "static_configs": [{"targets": [f"127.0.0.1:{s.metrics_port}"]}]},
            {"job_name": "crdgol-controller", "static_configs": [{"targets": [f"127.0.0.1:{s.controller_port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    data = Path(tempfile.mkdtemp(prefix="prom-", dir=tmp_path))
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", (200,), 30, proc)
        yield url
    finally:
        stop_process(proc)


def _query(url: str, expr: str) -> list[Any]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def test_every_dashboard_query_returns_data_from_a_live_stack(obs: Observed, prometheus: str) -> None:
    queries = _dashboard_queries()
    assert len(queries) >= 15
    missing = queries
    deadline = time.monotonic() + 60
    while missing and time.monotonic() < deadline:
        # Traffic of every kind the panels show: streamed and not (fallback, spend), refusals.
        obs.chat(stream=True)
        obs.chat(stream=False)
        obs.post({"model": "obs", "messages": [{"role": "user", "content": "x"}]}, key=WRONG_KEY)
        time.sleep(0.5)
        missing = [(title, expr) for title, expr in missing if not _query(prometheus, expr)]
    assert not missing, f"dashboard queries without data: {missing}"
    # Every series the panels read carries the labels they group by.
    by_reason = _query(prometheus, "sum by (reason) (crdgol_rejections_total)")
    assert "invalid_api_key" in {s["metric"].get("reason") for s in by_reason}
    spend = _query(prometheus, 'sum by (tenant, backend) (crdgol_spend_total)')
    assert {(s["metric"]["tenant"], s["metric"]["backend"]) for s in spend} == {("team-a/acme", "crdgol-be.team-a.obs.rescue")}
    skew = _query(prometheus, "max(crdgol_controller_config_version) - min(crdgol_policy_version)")
    assert float(skew[0]["value"][1]) == 0
    # The alert rules load and evaluate against these series without errors.
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for g in groups for rule in g["rules"]]
    assert len(rules) >= 8 and all(rule["health"] == "ok" for rule in rules), rules
    firing = {a["labels"]["alertname"] for a in httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]}
    assert not firing & {"CrdgolGatewayFailingClosed", "CrdgolXdsNack", "CrdgolExtprocDown"}
