"""Tracing settings: the flag and the standard OTEL_* variables, and what Envoy is given."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from controller.manifests import load_folder
from controller.render import RenderSettings, render
from controller.tracing_config import COLLECTOR_CLUSTER
from crdgol.cli import write_sds_files
from crdgol.stack import envoy_binary
from crdgol.tracing import TracingError, TracingSettings, settings_from

ROOT = Path(__file__).resolve().parents[2]


def test_tracing_is_off_unless_a_collector_is_named() -> None:
    assert not settings_from({}, "", "crdgol-extproc").enabled
    assert not settings_from({"OTEL_SERVICE_NAME": "x"}, "", "crdgol-extproc").enabled


def test_the_standard_variables_name_the_collector_and_the_service() -> None:
    s = settings_from({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel.monitoring:4317", "OTEL_SERVICE_NAME": "gw-a"}, "", "crdgol-extproc")
    assert (s.endpoint, s.host, s.port, s.tls, s.service_name) == ("http://otel.monitoring:4317", "otel.monitoring", 4317, False, "gw-a")
    traces_first = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b"}
    s = settings_from(traces_first, "", "crdgol-controller")
    assert (s.host, s.port, s.tls, s.service_name) == ("b", 443, True, "crdgol-controller")


def test_the_flag_wins_and_none_turns_tracing_off() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317"}
    assert settings_from(env, "127.0.0.1:5317", "x").endpoint == "http://127.0.0.1:5317"
    assert not settings_from({**env, "OTEL_TRACES_EXPORTER": "none"}, "", "x").enabled
    assert not settings_from({**env, "OTEL_SDK_DISABLED": "true"}, "", "x").enabled
    assert not settings_from(env, "off", "x").enabled


@pytest.mark.parametrize(
    ("env", "flag", "problem"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "http://a:4317", "only otlp"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http://a:4318", "only grpc"),
        ({}, "ftp://a:4317", "expected http"),
        ({}, "http://user:pw@a:4317", "credentials"),
        ({}, "http://a:99999", "not a URL"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_with_the_reason(env: dict[str, str], flag: str, problem: str) -> None:
    with pytest.raises(TracingError, match=problem):
        settings_from(env, flag, "x")


def test_envoy_gets_a_tracer_and_a_collector_cluster_only_when_tracing_is_on(tmp_path: Path) -> None:
    m = load_folder(ROOT / "examples" / "quickstart")
    off = render(m.bindings, m.secrets, RenderSettings()).envoy
    assert "tracing" not in json.dumps(off) and COLLECTOR_CLUSTER not in json.dumps(off)
    traced = render(m.bindings, m.secrets, RenderSettings(tracing=TracingSettings("https://otel.example:4317", "x"), sds_dir=str(tmp_path)))
    write_sds_files(tmp_path, traced.secrets)  # the provider credentials the static config names
    on = traced.envoy
    hcm = on["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == COLLECTOR_CLUSTER
    (cluster,) = [c for c in on["static_resources"]["clusters"] if c["name"] == COLLECTOR_CLUSTER]
    assert cluster["transport_socket"]["typed_config"]["sni"] == "otel.example"
    (tmp_path / "envoy.json").write_text(json.dumps(on))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.json"), "--log-level", "error"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr



def test_the_command_line_refuses_a_collector_it_cannot_use_and_render_shows_the_tracer(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from crdgol.cli import build_parser

    def main(argv: list[str]) -> int:  # the CLI without its logging set-up (pytest owns logging)
        args = build_parser().parse_args(argv)
        return int(args.func(args))

    quickstart = str(ROOT / "examples" / "quickstart")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(SystemExit, match="only grpc"):
        main(["--otlp-endpoint", "http://127.0.0.1:4318", "render", "--manifests", quickstart])
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    capsys.readouterr()
    assert main(["--otlp-endpoint", "http://127.0.0.1:4317", "render", "--manifests", quickstart]) == 0
    assert "envoy.tracers.opentelemetry" in capsys.readouterr().out
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert main(["render", "--manifests", quickstart]) == 0
    assert "envoy.tracers.opentelemetry" not in capsys.readouterr().out
