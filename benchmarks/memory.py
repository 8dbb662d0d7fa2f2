"""extproc memory under many sessions: RSS before and after N requests spread over M sessions.

    python -m benchmarks.memory [--quick] [--requests N] [--sessions M] [--out benchmarks/results]

Starts a fresh gateway with the full policy (history on, so every session keeps up to
``maxTurns`` turns in extproc's in-process store), drives it with wrk rotating ``x-session-id``
over M ids until N responses, and reports extproc's RSS (and peak RSS) before and after.
Design target: under 200 MB after 100k requests across 10k sessions.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks import harness as hz
from benchmarks import scenarios as sc

TARGET_MB = 200.0


def measure(
    requests: int,
    sessions: int,
    *,
    connections: int = 16,
    envoy_concurrency: int = 1,
    size: int = 1024,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    setup = sc.SETUPS["full"]
    headers = sc.request_headers(setup)
    with tempfile.TemporaryDirectory(prefix="crdgol-bench-mem-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_text(json.dumps(sc.chat_body(size)))
        gw = hz.Gateway(setup.manifests or sc.MANIFESTS / "full", envoy_concurrency).start()
        try:
            pid = gw.pids["extproc"]
            r = httpx.post(
                gw.url + sc.CHAT_PATH, content=body_file.read_bytes(), headers=headers, timeout=30
            )
            if r.status_code != 200:
                raise RuntimeError(f"memory: the gateway answered {r.status_code}: {r.text[:300]}")
            time.sleep(0.5)
            before = hz.sample(pid)
            metered0 = hz.metric_total(gw.metrics_url, "crdgol_requests_total") or 0.0
            # wrk's duration is only a safety cap: the Lua script stops at `requests` responses and
            # we interrupt wrk (SIGINT makes it print its report) as soon as extproc has metered them.
            cap = 30 + requests / 200
            argv = hz.wrk_argv(
                gw.url + sc.CHAT_PATH,
                body_file,
                headers,
                connections=connections,
                duration=cap,
                threads=1,
                sessions=sessions,
                prefix="mem-",
                stop=requests,
            )
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                while proc.poll() is None:
                    time.sleep(0.25)
                    metered = (
                        hz.metric_total(gw.metrics_url, "crdgol_requests_total") or 0.0
                    ) - metered0
                    if metered >= requests:
                        proc.send_signal(signal.SIGINT)
                        break
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            elapsed = time.monotonic() - t0
            w = hz.parse_wrk(out)
            time.sleep(0.5)
            after = hz.sample(pid)
            metered = (hz.metric_total(gw.metrics_url, "crdgol_requests_total") or 0.0) - metered0
        finally:
            gw.stop()
    if before is None or after is None:
        raise RuntimeError("memory: extproc exited during the run")
    result = {
        "requests_target": requests,
        "sessions": sessions,
        "connections": connections,
        "prompt_bytes": size,
        "requests_completed": w.requests,
        "requests_metered": int(metered),
        "seconds": round(elapsed, 2),
        "rps": round(w.requests / elapsed, 1) if elapsed else 0.0,
        "errors": w.errors,
        "non_2xx": w.non_2xx,
        "socket_errors": w.socket_errors,
        "rss_before_mb": round(before.rss_mb, 1),
        "rss_after_mb": round(after.rss_mb, 1),
        "rss_peak_mb": round(after.hwm_mb, 1),
        "rss_growth_mb": round(after.rss_mb - before.rss_mb, 1),
        "kb_per_session": round((after.rss_mb - before.rss_mb) * 1024 / sessions, 2)
        if sessions
        else None,
        "target_mb": TARGET_MB,
    }
    result["valid"] = w.errors == 0 and w.requests >= requests
    if not result["valid"]:
        result["invalid_reason"] = (
            f"{w.errors} request errors"
            if w.errors
            else f"only {w.requests} of {requests} requests completed"
        )
        if err.strip():
            result["invalid_reason"] += f"; wrk: {err.strip()[:200]}"
    result["pass"] = result["valid"] and result["rss_peak_mb"] < TARGET_MB
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="5k requests over 500 sessions")
    p.add_argument(
        "--requests", type=int, help="requests to send (default 100000; 5000 with --quick)"
    )
    p.add_argument(
        "--sessions",
        type=int,
        help="distinct x-session-id values (default 10000; 500 with --quick)",
    )
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--envoy-concurrency", type=int, default=1)
    p.add_argument("--out", default=str(sc.HERE / "results"))
    args = p.parse_args(argv)
    plan = sc.plan(args.quick)
    n = args.requests or plan.memory_requests
    m = args.sessions or plan.memory_sessions
    print(
        f"memory: {n} requests over {m} sessions, full policy, c{args.connections} ...", flush=True
    )
    res = measure(n, m, connections=args.connections, envoy_concurrency=args.envoy_concurrency)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("memory-quick.json" if args.quick else "memory.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    flag = "" if res["valid"] else f"  INVALID: {res['invalid_reason']}"
    print(
        f"memory: extproc RSS {res['rss_before_mb']} -> {res['rss_after_mb']} MB (peak {res['rss_peak_mb']} MB) "
        f"after {res['requests_completed']} requests / {m} sessions at {res['rps']} rps{flag}\n-> {path}"
    )
    return 0 if res["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
