"""What each piece of the native path costs Envoy: CPU per request for variants of its config.

    python -m benchmarks.native_cost [--variants a,b,...] [--rounds 3] [--seconds 4] [--connections 16]

Starts the pass-through gateway (``benchmarks/manifests/passthrough``: every call is native)
with its mock and extproc, stops its Envoy, and runs a static Envoy of the same render (``crdgol
render``'s config: the native program inline, the provider credential from an SDS file) in its
place, once per variant, the variants alternating ``rounds`` times so a shared machine's drift
hits each alike. Each run: 1 s of warm-up, then wrk (1 KB prompts, c16) for ``seconds``; Envoy's
and extproc's CPU seconds from /proc over the run, divided by the requests. Prints one line per
run and, per variant, the median and minimum Envoy CPU µs per request (the figure to compare:
rps moves with whatever else runs), extproc's, and rps; ``--json`` writes them to a file.

A variant removes or changes one piece (``VARIANTS``), so its difference to ``as-rendered`` is
what that piece costs; a variant that drops a piece the gateway needs is a measurement only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import harness as hz
from benchmarks import scenarios as sc
from controller.manifests import load_folder
from controller.render import RenderSettings, render
from controller.usage_filters import USAGE_FILTER_NAMES
from crdgol.access_log import json_format
from crdgol.cli import write_sds_files
from crdgol.request_path import NATIVE_FILTER, RESPONSE_FILTER
from crdgol.stack import Stack, StackSettings, envoy_binary, free_port, stop_process, wait_http

Config = dict[str, Any]


def _hcm(cfg: Config) -> Config:
    listener = next(x for x in cfg["static_resources"]["listeners"] if x["name"] == "crdgol-gateway")
    hcm: Config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _without_filters(cfg: Config, names: tuple[str, ...]) -> None:
    hcm = _hcm(cfg)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in names]


def _without_logs(cfg: Config, grpc: bool) -> None:
    """Without the gRPC usage log (``grpc``) or without the JSON access log."""
    hcm = _hcm(cfg)
    hcm["access_log"] = [a for a in hcm["access_log"] if ("grpc" in a["name"]) != grpc]


def _usage_log_buffer(cfg: Config, size: int) -> None:
    for a in _hcm(cfg)["access_log"]:
        if "grpc" in a["name"]:
            a["typed_config"]["common_config"]["buffer_size_bytes"] = size


def _native_program(cfg: Config, edit: Callable[[str], str]) -> None:
    for f in _hcm(cfg)["http_filters"]:
        if f["name"] == NATIVE_FILTER:
            source = f["typed_config"]["default_source_code"]
            source["inline_string"] = edit(source["inline_string"])


def _log_as_namespace_objects(cfg: Config) -> None:
    # Measurement only: the line's metadata fields as two objects (not the documented shape).
    for a in _hcm(cfg)["access_log"]:
        if "grpc" not in a["name"]:
            fmt = {k: v for k, v in json_format(usage_filters=True).items() if "DYNAMIC_METADATA" not in v}
            fmt |= {"gateway": "%DYNAMIC_METADATA(crdgol)%", "usage": "%DYNAMIC_METADATA(crdgol.usage)%"}
            a["typed_config"]["log_format"] = {"json_format": fmt}


VARIANTS: dict[str, Callable[[Config], None]] = {
    "as-rendered": lambda cfg: None,
    "no-json-access-log": lambda cfg: _without_logs(cfg, grpc=False),
    "no-grpc-usage-log": lambda cfg: _without_logs(cfg, grpc=True),
    "no-access-logs": lambda cfg: _hcm(cfg).update(access_log=[]),
    # What reading usage costs (extproc then settles without tokens).
    "no-usage-filters": lambda cfg: _without_filters(cfg, USAGE_FILTER_NAMES),
    "no-response-filter": lambda cfg: _without_filters(cfg, (RESPONSE_FILTER,)),
    "usage-log-16k-batches": lambda cfg: _usage_log_buffer(cfg, 16 * 1024),
    # The floor of reading usage in the native Lua program: a response handler that does nothing.
    "lua-empty-response-handler": lambda cfg: _native_program(cfg, lambda s: s + "\nfunction envoy_on_response(handle) end\n"),
    # The native program without the access-log fields it writes (the log's fields go null).
    "lua-no-access-fields": lambda cfg: _native_program(cfg, lambda s: s.replace("local ACCESS = true", "local ACCESS = false", 1)),
    "json-log-namespace-objects": _log_as_namespace_objects,
}


def _run_once(config: Config, root: Path, port: int, extproc_pid: int, body: Path, seconds: float, connections: int) -> tuple[float, float, float]:
    path = root / "envoy.json"
    path.write_text(json.dumps(config))
    with open(root / "envoy.log", "ab") as log:
        argv = [envoy_binary(), "-c", str(path), "--log-level", "warning", "--disable-hot-restart", "--concurrency", "1"]
        envoy = subprocess.Popen([*argv, "--file-flush-interval-msec", "1000"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", (200, 401), 20, envoy)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        headers = sc.request_headers(sc.SETUPS["passthrough"])
        hz.run_wrk(hz.wrk_argv(url, body, headers, connections=connections, duration=1), 30)
        e0, x0 = hz.sample(envoy.pid), hz.sample(extproc_pid)
        res = hz.run_wrk(hz.wrk_argv(url, body, headers, connections=connections, duration=seconds), seconds + 30)
        e1, x1 = hz.sample(envoy.pid), hz.sample(extproc_pid)
        if res.non_2xx or e0 is None or e1 is None or x0 is None or x1 is None:
            raise RuntimeError(f"{res.non_2xx} non-2xx answers, or a process ended")
        n = res.rps * round(seconds)
        return res.rps, (e1.cpu_s - e0.cpu_s) / n * 1e6, (x1.cpu_s - x0.cpu_s) / n * 1e6
    finally:
        stop_process(envoy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--json", default="", help="write the per-variant figures to this file")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {unknown}")
    root = Path(tempfile.mkdtemp(prefix="crdgol-native-cost-"))
    try:
        mock_port = free_port()
        folder = root / "manifests"
        folder.mkdir()
        for src in sorted((sc.MANIFESTS / "passthrough").glob("*.yaml")):
            folder.joinpath(src.name).write_text(src.read_text().replace(f"127.0.0.1:{sc.MANIFEST_MOCK_PORT}", f"127.0.0.1:{mock_port}"))
        settings = StackSettings(manifests=folder, mock_port=mock_port, mock_args=hz.MOCK_ARGS, metrics_port=free_port(), state_dir=root / "state", quiet=True, envoy_concurrency=1)
        with Stack(settings) as stack:
            stop_process(stack.procs["envoy"])  # a static Envoy of the same render runs instead
            port = free_port()
            manifests = load_folder(folder)
            rs = RenderSettings(listen_port=port, admin_port=free_port(), extproc_sockets=stack.extproc_sockets, access_log="-", sds_dir=str(root / "sds"))
            rendered = render(manifests.bindings, manifests.secrets, rs)
            write_sds_files(root / "sds", rendered.secrets)
            body = root / "body.json"
            body.write_text(json.dumps(sc.chat_body(sc.PROMPT_SIZES["1k"])))
            runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names:
                    config = copy.deepcopy(rendered.envoy)
                    VARIANTS[name](config)
                    rps, envoy_us, extproc_us = _run_once(config, root, port, stack.pid("extproc"), body, args.seconds, args.connections)
                    runs[name].append((rps, envoy_us, extproc_us))
                    print(f"round {r + 1} {name:28s} {rps:6.0f} rps  Envoy {envoy_us:4.0f} µs/req  extproc {extproc_us:3.0f} µs/req  load {os.getloadavg()[0]:.1f}", flush=True)
        summary = {
            name: {
                "envoy_us_median": statistics.median(r[1] for r in rs),
                "envoy_us_min": min(r[1] for r in rs),
                "extproc_us_median": statistics.median(r[2] for r in rs),
                "rps_median": statistics.median(r[0] for r in rs),
                "runs": rs,
            }
            for name, rs in runs.items()
        }
        for name, s in summary.items():
            print(
                f"{name:28s} Envoy µs/req median {s['envoy_us_median']:4.0f} (min {s['envoy_us_min']:4.0f})  "
                f"extproc {s['extproc_us_median']:3.0f}  rps {s['rps_median']:6.0f}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
