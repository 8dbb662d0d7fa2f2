"""Workflow engine benchmark: ``python -m benchmarks.workflows [--runs 1000] [--out benchmarks/results]``.

The real stack (``crdgol.stack.Stack``: mock upstream at zero latency, controller in file mode,
extproc, Envoy) serves a copy of ``examples/support-triage``; ``--runs`` runs are started at once
over the gateway's run API (half calm tickets, half urgent, so both branches run) and the
benchmark waits until every one has ended. Figures (targets from issue 8):

* **steps/s**: steps that ran (Succeeded or Failed, not Skipped) / seconds from the first start
  request to the last run's end (target >= 200).
* **controller CPU per step**: the controller process's user+system CPU over the same span /
  steps. It is the engine's own work (scheduling, CEL, state files, metrics) plus its HTTP client
  and run API; Envoy, extproc and the mock are other processes, so gateway time is excluded
  (target <= 1 ms; this figure is an upper bound on the engine's share).
* **p99 ready -> start**: from the controller's ``crdgol_workflow_step_start_delay_seconds``
  histogram, the upper bound of the bucket holding the 99th percentile (target <= 50 ms): from a
  step becoming ready (its dependencies done in a started run, or its retry due) to its attempt
  beginning.
* **p99 created -> picked up** (reported, no target): ``crdgol_workflow_run_pickup_delay_seconds``,
  from a run being created to the engine starting it; with 1,000 runs posted at once this is the
  event loop's backlog.
* **created -> first step started**: ``crdgol_workflow_run_first_start_delay_seconds``, pickup plus
  the first step's ready -> start: the ready -> start target (<= 50 ms) read demandingly, a run's
  first steps being ready when the run is created.
* **the burst**: when the last start request was answered and the last run's first step started,
  and the controller's CPU until then per run (what admitting a run costs, earlier runs' steps
  included).
* **controller RSS**: peak resident set (VmHWM) of the controller process (target < 300 MB).

Results: ``<out>/workflows.json`` and ``<out>/workflows.md``. Loopback only; every process
started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import cpu_model
from crdgol.stack import Stack, StackSettings

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}
TICKETS = ("I was charged twice on my last invoice, please refund one.", "Your service is down and we cannot log in!")
TARGETS = {"steps_per_s": 200.0, "cpu_ms_per_step": 1.0, "p99_start_delay_ms": 50.0, "p99_first_start_delay_ms": 50.0, "controller_rss_mb": 300.0}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def p99_ms(metrics_url: str, histogram: str = "crdgol_workflow_step_start_delay_seconds", q: float = 0.99) -> float:
    """The bound of the histogram bucket holding the ``q`` quantile (the 99th percentile), in ms."""
    text = httpx.get(metrics_url, timeout=10).text
    buckets: list[tuple[float, float]] = []
    for fam in text_string_to_metric_families(text):
        if fam.name == histogram:
            buckets = sorted((float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket"))
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le * 1000
    return float("inf")


def counter(metrics_url: str, sample: str, phases: tuple[str, ...] = ()) -> float:
    """Sum of a sample's values (``phases``: only those of these run phases)."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == sample and (not phases or s.labels.get("phase") in phases)
    )


def ended_runs(metrics_url: str) -> float:
    return counter(metrics_url, "crdgol_workflow_runs", ("Succeeded", "Failed", "Cancelled"))


@dataclass
class Timeline:
    posted: float = 0.0  # every start request answered (201)
    admitted: float = 0.0  # every run's first step started
    admitted_cpu: float = 0.0  # controller CPU seconds until then
    ended: float = 0.0  # every run ended


async def drive(url: str, metrics_url: str, runs: int, cpu: Callable[[], float]) -> Timeline:
    """Start ``runs`` runs at once; seconds until every first step started and until the
    controller counts them all ended. Waiting reads the controller's metrics (cheap), not the
    run API, so it adds little to its CPU."""
    before = ended_runs(metrics_url)
    first = "crdgol_workflow_run_first_start_delay_seconds_count"
    admitted_before = counter(metrics_url, first)
    out = Timeline()
    cpu0 = cpu()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200), headers=HEADERS) as http:

        async def start(i: int) -> None:
            body = {"inputs": {"ticket": TICKETS[i % 2]}}
            async with http.post(f"{url}/v1/workflows/support-triage/runs", json=body) as r:
                assert r.status == 201, await r.text()

        started = time.perf_counter()
        await asyncio.gather(*(start(i) for i in range(runs)))
        out.posted = time.perf_counter() - started
        while await asyncio.to_thread(counter, metrics_url, first) - admitted_before < runs:
            await asyncio.sleep(0.05)
        out.admitted, out.admitted_cpu = time.perf_counter() - started, cpu() - cpu0
        while await asyncio.to_thread(ended_runs, metrics_url) - before < runs:
            await asyncio.sleep(0.1)
        out.ended = time.perf_counter() - started
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--profile", default="", help="also record the controller with py-spy into this file (raw collapsed stacks)")
    p.add_argument("--profile-seconds", type=int, default=0, help="with --profile: record only the first N seconds (the burst of new runs); default: the whole run")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="crdgol-wfbench-"))
    folder = tmp / "support-triage"
    shutil.copytree(ROOT / "examples" / "support-triage", folder)
    # One tenant starts them all: its cap on active runs and its kept finished runs must hold them.
    limits = {"CRDGOL_WORKFLOW_MAX_ACTIVE_RUNS": str(max(100, args.runs)), "CRDGOL_WORKFLOW_KEEP_FINISHED_RUNS": str(max(100, args.runs))}
    stack = Stack(StackSettings(manifests=folder, quiet=True, state_dir=tmp / "state", mock_args=("--record", "0"), env=limits))
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{stack.mock_port}"))
    stack.start()
    try:
        pid = stack.procs["controller"].pid
        load = os.getloadavg()[0]  # the machine is shared: say how busy it was
        cpu0 = cpu_seconds(pid)
        metrics_url = f"http://127.0.0.1:{stack.controller_port}/metrics"
        spy = None
        if args.profile:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-o", args.profile, "-f", "raw", "-r", "200", "--nonblocking", *(["-d", str(args.profile_seconds)] if args.profile_seconds else [])])
            time.sleep(1.0)
            cpu0 = cpu_seconds(pid)
        timeline = asyncio.run(drive(stack.url, metrics_url, args.runs, lambda: cpu_seconds(pid)))
        elapsed = timeline.ended
        cpu = cpu_seconds(pid) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        finals = httpx.get(f"{stack.url}/v1/workflows/runs", headers=HEADERS, timeout=60).json()["runs"]
        steps = sum(1 for st in finals for s in st["steps"] if s["phase"] in ("Succeeded", "Failed"))
        result = {
            "runs": args.runs,
            "succeeded": sum(1 for st in finals if st["phase"] == "Succeeded"),
            "steps": steps,
            "seconds": round(elapsed, 3),
            "steps_per_s": round(steps / elapsed, 1),
            "cpu_ms_per_step": round(cpu * 1000 / max(1, steps), 3),
            "p99_start_delay_ms": p99_ms(metrics_url),
            "p99_pickup_delay_ms": p99_ms(metrics_url, "crdgol_workflow_run_pickup_delay_seconds"),
            "p50_pickup_delay_ms": p99_ms(metrics_url, "crdgol_workflow_run_pickup_delay_seconds", 0.5),
            "p99_first_start_delay_ms": p99_ms(metrics_url, "crdgol_workflow_run_first_start_delay_seconds"),
            # The burst: every run created, then every run's first step started; the controller's
            # CPU until then, per run, is what admitting one run costs (API request, journal,
            # pickup, first call), and runs / that rate is the floor of the last run's wait.
            "all_posted_s": round(timeline.posted, 3),
            "all_first_steps_started_s": round(timeline.admitted, 3),
            "admission_cpu_ms_per_run": round(timeline.admitted_cpu * 1000 / args.runs, 3),
            "p50_first_start_delay_ms": p99_ms(metrics_url, "crdgol_workflow_run_first_start_delay_seconds", 0.5),
            "controller_rss_mb": round(peak_rss_mb(pid), 1),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average": round(load, 2),
            "python": platform.python_version(),
            "targets": TARGETS,
        }
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "workflows" if args.runs >= 1000 else "workflows-small"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Workflow engine: {result['runs']} concurrent runs of support-triage",
        "",
        "| figure | measured | target |",
        "|---|---:|---:|",
        f"| steps/s | {result['steps_per_s']} | >= {TARGETS['steps_per_s']:g} |",
        f"| controller CPU per step (ms) | {result['cpu_ms_per_step']} | <= {TARGETS['cpu_ms_per_step']:g} |",
        f"| p99 ready -> start (ms, bucket bound) | {result['p99_start_delay_ms']} | <= {TARGETS['p99_start_delay_ms']:g} |",
        f"| controller peak RSS (MB) | {result['controller_rss_mb']} | < {TARGETS['controller_rss_mb']:g} |",
        f"| p99 run created -> picked up (ms, bucket bound) | {result['p99_pickup_delay_ms']} | (no target) |",
        f"| p50 run created -> picked up (ms, bucket bound) | {result['p50_pickup_delay_ms']} | (no target) |",
        f"| p99 run created -> first step started (ms, bucket bound) | {result['p99_first_start_delay_ms']} | <= {TARGETS['p99_first_start_delay_ms']:g} |",
        f"| p50 run created -> first step started (ms, bucket bound) | {result['p50_first_start_delay_ms']} | (no target) |",
        f"| controller CPU to admit one run (ms: API request, journal, pickup, first call) | {result['admission_cpu_ms_per_run']} | (no target) |",
        f"| last 201 / all first steps started (s after the first request) | {result['all_posted_s']} / {result['all_first_steps_started_s']} | (no target) |",
        "",
        f"{result['succeeded']} of {result['runs']} runs succeeded; {result['steps']} steps in {result['seconds']} s; {result['cpu']}, {result['cores']} cores, load average {result['load_average']} at the start.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
