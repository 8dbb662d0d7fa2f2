"""The alert rules and the dashboard in deploy/monitoring/ are valid for the real tools.

``promtool check rules`` parses every rule (PromQL included) and ``promtool test rules`` runs the
alerts' unit tests (crdgol-alerts.test.yml: each alert fires when it should and not before). That
every dashboard query returns data from a live stack is tests/dataplane/test_operating.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (.ci/run installs it)"
    return found


def test_promtool_accepts_every_alert_rule() -> None:
    r = subprocess.run([promtool(), "check", "rules", "crdgol-alerts.rules.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rules = yaml.safe_load((MONITORING / "crdgol-alerts.rules.yml").read_text())["groups"][0]["rules"]
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout


def test_the_alerts_fire_when_their_unit_tests_say() -> None:
    r = subprocess.run([promtool(), "test", "rules", "crdgol-alerts.test.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_unit_test_except_the_latency_and_error_ratios() -> None:
    rules = yaml.safe_load((MONITORING / "crdgol-alerts.rules.yml").read_text())["groups"][0]["rules"]
    tested = {
        t["alertname"]
        for case in yaml.safe_load((MONITORING / "crdgol-alerts.test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    untested = {r["alert"] for r in rules} - tested
    assert untested <= {"CrdgolHighErrorRate", "CrdgolSlowFirstToken", "CrdgolControllerDown"}, untested
    assert all(r["annotations"]["summary"] and r["labels"]["severity"] for r in rules)


def test_the_dashboard_is_grafana_json_with_a_query_per_panel_and_the_promised_views() -> None:
    doc = json.loads((MONITORING / "crdgol-dashboard.json").read_text())
    panels = doc["panels"]
    assert doc["uid"] == "crdgol-gateway" and len({p["id"] for p in panels}) == len(panels)
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    for series in (
        "envoy_http_downstream_rq_xx", "crdgol_rejections_total", "envoy_http_ext_proc_streams_failed",
        "gen_ai_server_request_duration_seconds_bucket", "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket", "crdgol_tokens_total", "crdgol_spend_total",
        "crdgol_quota_remaining", "crdgol_xds_nacks_total", "crdgol_controller_config_version",
    ):
        assert series in exprs, series
    # Grouping never uses a label that would explode: no session, user or request ids.
    assert not any(bad in exprs for bad in ("session", "subject", "request_id", "user"))
