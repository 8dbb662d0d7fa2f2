"""Run the benchmark matrix: ``python -m benchmarks.run [--quick] [--out benchmarks/results]``.

Each setup (bare Envoy, the mock upstream direct, gateway pass-through, gateway full policy) is
started once, checked with a real request, warmed up, then its scenarios run one after another,
never in parallel. Non-streaming load comes from wrk (``benchmarks/wrk/post.lua``); streaming
timing from an async client. extproc's (and Envoy's and the mock's) CPU seconds and RSS are read
from /proc before and after each scenario. Results: ``<out>/<name>.json``, ``.md`` and ``.png``.

Any request error (non-2xx, socket error, broken stream) marks that scenario invalid; its
figures are kept but flagged, the derived ratios that use them are null, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import harness as hz
from benchmarks import memory as mem
from benchmarks import report
from benchmarks import scenarios as sc


def say(msg: str) -> None:
    print(msg, flush=True)


# --- checks before measuring -----------------------------------------------------------------


def preflight(running: hz.Running, setup: sc.Setup, bodies: dict[str, Path]) -> None:
    """One request per prompt size; prove the setup does what its name says before timing it."""
    headers = sc.request_headers(setup)
    with httpx.Client(base_url=running.url, headers=headers, timeout=30) as c:
        for size, path in bodies.items():
            r = c.post(
                sc.CHAT_PATH,
                content=path.read_bytes(),
                headers={"x-session-id": "preflight"} if setup.sessions else {},
            )
            if r.status_code != 200:
                raise RuntimeError(
                    f"{setup.name}: preflight {size} answered {r.status_code}: {r.text[:300]}"
                )
            reply = r.json()["choices"][0]["message"]["content"]
            if setup.kind == "gateway" and "model=mock-gpt" not in reply:
                raise RuntimeError(
                    f"{setup.name}: the gateway did not route to the mock backend: {reply[:200]}"
                )
            if setup.kind in ("bare", "upstream") and "model=bench-chat" not in reply:
                raise RuntimeError(f"{setup.name}: unexpected reply {reply[:200]}")
            if setup.name == "passthrough" and "system=-" not in reply:
                raise RuntimeError(
                    f"{setup.name}: context was injected in pass-through: {reply[:200]}"
                )
            if setup.name.startswith("full"):
                for want in (
                    "benchmark assistant",
                    "tenant bench",
                    # A header's value is data, not instructions: the system text points at
                    # the caller-profile block the gateway adds in the user role.
                    "team is (see caller_profile.team)",
                    "Knowledge",
                ):
                    if want not in reply:
                        raise RuntimeError(
                            f"{setup.name}: context injection missing {want!r}: {reply[:300]}"
                        )
        if setup.name.startswith("full"):
            # History: a second call in the same session carries the previous exchange.
            r = c.post(
                sc.CHAT_PATH,
                content=bodies["1k"].read_bytes(),
                headers={"x-session-id": "preflight-h"},
            )
            r = c.post(
                sc.CHAT_PATH,
                content=bodies["1k"].read_bytes(),
                headers={"x-session-id": "preflight-h"},
            )
            reply = r.json()["choices"][0]["message"]["content"]
            if "messages=1 " in reply or "messages=2 " in reply:
                raise RuntimeError(f"{setup.name}: session history was not injected: {reply[:200]}")
    if running.metrics_url:
        # Usage read by Envoy arrives over the access log in batches (every 20 ms, later under load).
        deadline = time.monotonic() + 3.0
        while not (hz.metric_total(running.metrics_url, "crdgol_tokens_total") or 0) > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{setup.name}: usage accounting recorded no tokens")
            time.sleep(0.05)


# --- one scenario ----------------------------------------------------------------------------


def _procs_delta(
    running: hz.Running, before: dict[str, hz.ProcSample | None], seconds: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, pid in running.pids.items():
        b, a = before.get(name), hz.sample(pid)
        if b is None or a is None:
            out[name] = None
            continue
        cpu = a.cpu_s - b.cpu_s
        out[name] = {
            "cpu_s": round(cpu, 2),
            "cpu_pct": round(100 * cpu / seconds, 1) if seconds else None,
            "rss_mb_before": round(b.rss_mb, 1),
            "rss_mb": round(a.rss_mb, 1),
        }
    return out


def _costs(
    procs: dict[str, Any], before: hz.ExtProcCounts | None, after: hz.ExtProcCounts | None, requests: int
) -> dict[str, Any]:
    """Per request: ext_proc messages and streams (Envoy's counters) and CPU µs of each process."""
    out: dict[str, Any] = {"extproc_messages_per_request": None, "extproc_streams_per_request": None}
    if requests <= 0:
        return {**out, "cpu_us_per_request": {}}
    if before is not None and after is not None:
        out["extproc_messages_per_request"] = round((after.messages - before.messages) / requests, 2)
        out["extproc_streams_per_request"] = round((after.streams - before.streams) / requests, 2)
    out["cpu_us_per_request"] = {
        name: round(1e6 * p["cpu_s"] / requests) for name, p in procs.items() if p is not None
    }
    return out


def run_load(
    running: hz.Running, setup: sc.Setup, s: sc.Scenario, body: Path, wrk_threads: int
) -> dict[str, Any]:
    argv = hz.wrk_argv(
        running.url + sc.CHAT_PATH,
        body,
        sc.request_headers(setup),
        connections=s.connections,
        duration=s.duration,
        threads=wrk_threads,
        sessions=setup.sessions if setup.kind == "gateway" else 0,
        prefix=f"{s.size}-",
    )
    before = {name: hz.sample(pid) for name, pid in running.pids.items()}
    metered0 = hz.metric_total(running.metrics_url, "crdgol_requests_total")
    counts0 = hz.extproc_counts(running.admin_url)
    w = hz.run_wrk(argv, timeout=s.duration + 60)
    procs = _procs_delta(running, before, w.seconds)
    counts1 = hz.extproc_counts(running.admin_url)
    metered1 = hz.metric_total(running.metrics_url, "crdgol_requests_total")
    res: dict[str, Any] = {
        "name": s.name,
        "key": s.key,
        "setup": s.setup,
        "kind": "load",
        "size": s.size,
        "prompt_bytes": sc.PROMPT_SIZES[s.size],
        "connections": s.connections,
        "duration_s": round(w.seconds, 2),
        "requests": w.requests,
        "rps": round(w.rps, 1),
        "p50_ms": w.p50_ms,
        "p90_ms": w.p90_ms,
        "p99_ms": w.p99_ms,
        "max_ms": w.max_ms,
        "errors": w.errors,
        "non_2xx": w.non_2xx,
        "socket_errors": w.socket_errors,
        "metered_requests": None
        if metered0 is None or metered1 is None
        else int(metered1 - metered0),
        "procs": procs,
        **_costs(procs, counts0, counts1, w.requests),
    }
    ext = procs.get("extproc")
    res["extproc_cpu_s"] = ext["cpu_s"] if ext else None
    res["extproc_rss_mb"] = ext["rss_mb"] if ext else None
    problems = []
    if w.errors:
        problems.append(
            f"{w.errors} request errors (non-2xx {w.non_2xx}, socket {w.socket_errors})"
        )
    if not w.requests or w.p50_ms is None:
        problems.append("wrk reported no completed requests")
    res["valid"] = not problems
    if problems:
        res["invalid_reason"] = "; ".join(problems)
        res["wrk_output"] = w.raw
    return res


def run_stream(running: hz.Running, setup: sc.Setup, s: sc.Scenario) -> dict[str, Any]:
    body = sc.chat_body(sc.PROMPT_SIZES[s.size], stream=True)
    before = {name: hz.sample(pid) for name, pid in running.pids.items()}
    counts0 = hz.extproc_counts(running.admin_url)
    hz.set_mock(running.mock_url, chunk_delay_ms=s.chunk_delay_ms)
    t0 = time.monotonic()
    try:
        r = asyncio.run(
            hz.stream_check(
                running.url,
                body,
                sc.request_headers(setup),
                s.requests,
                "stream-" if setup.sessions else "",
            )
        )
    finally:
        hz.set_mock(running.mock_url, chunk_delay_ms=0)
    seconds = time.monotonic() - t0
    summary = r.summary(s.chunk_delay_ms)
    procs = _procs_delta(running, before, seconds)
    counts1 = hz.extproc_counts(running.admin_url)
    ext = procs.get("extproc")
    res: dict[str, Any] = {
        "name": s.name,
        "key": s.key,
        "setup": s.setup,
        "kind": "stream",
        "size": s.size,
        "prompt_bytes": sc.PROMPT_SIZES[s.size],
        "connections": 1,
        "duration_s": round(seconds, 2),
        **summary,
        "extproc_cpu_s": ext["cpu_s"] if ext else None,
        "extproc_rss_mb": ext["rss_mb"] if ext else None,
        "procs": procs,
        **_costs(procs, counts0, counts1, r.requests),
    }
    res["valid"] = not r.errors and r.ok > 0
    if not res["valid"]:
        res["invalid_reason"] = (
            f"{len(r.errors)} failed streams" if r.errors else "no stream completed"
        )
    return res


def _setup_failed(
    mine: list[sc.Scenario], reason: str, i: int, total: int, results: list[dict[str, Any]]
) -> int:
    """A setup that did not start or failed its preflight: every scenario of it is invalid."""
    for s in mine:
        i += 1
        res: dict[str, Any] = {
            "name": s.name,
            "key": s.key,
            "setup": s.setup,
            "kind": s.kind,
            "size": s.size,
            "prompt_bytes": sc.PROMPT_SIZES[s.size],
            "connections": s.connections,
            "requests": 0,
            "rps": 0.0,
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "errors": 0,
            "extproc_cpu_s": None,
            "extproc_rss_mb": None,
            "procs": {},
            "valid": False,
            "invalid_reason": f"setup failed: {reason}",
        }
        if s.kind == "stream":
            res.update(
                {
                    k: None
                    for k in (
                        "ttfb_p50_ms",
                        "ttfb_p99_ms",
                        "gap_p50_ms",
                        "gap_p99_ms",
                        "max_gap_ms",
                        "frames_per_response",
                        "reads_per_response_median",
                        "glued_responses",
                    )
                }
            )
            res.update(ok=0, chunk_delay_ms=s.chunk_delay_ms)
        results.append(res)
        say(_line(i, total, res))
    return i


def _line(i: int, total: int, res: dict[str, Any]) -> str:
    head = f"[{i}/{total}] {res['name']} ..."
    if res["kind"] == "stream":
        body = (
            f" ttfb p50 {res['ttfb_p50_ms']} ms p99 {res['ttfb_p99_ms']} ms,"
            f" chunk gap p99 {res['gap_p99_ms']} ms max {res['max_gap_ms']} ms (delay {res['chunk_delay_ms']} ms),"
            f" held back in {res['glued_responses']} of {res['ok']}"
        )
    else:
        ext = (
            f", extproc cpu {res['procs']['extproc']['cpu_pct']}%"
            if res["procs"].get("extproc")
            else ""
        )
        body = (
            f" {res['rps']:.0f} rps p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms{ext}"
            if res["p50_ms"] is not None
            else ""
        )
    flag = "" if res["valid"] else f"  INVALID: {res['invalid_reason']}"
    return head + body + flag


# --- derived figures -------------------------------------------------------------------------


def derive(scenarios: list[dict[str, Any]], memory: dict[str, Any] | None) -> dict[str, Any]:
    by = {(r["setup"], r["kind"], r["size"], r["connections"]): r for r in scenarios}

    def valid(*rs: dict[str, Any] | None) -> bool:
        return all(r is not None and r["valid"] for r in rs)

    ratios: dict[str, Any] = {}
    added: dict[str, Any] = {}
    for (setup, kind, size, c), r in sorted(by.items()):
        if kind != "load" or setup == "bare":
            continue
        bare = by.get(("bare", "load", size, c))
        if bare is None:
            continue
        key = f"{setup}-{size}"
        ratios.setdefault(key, {})[f"c{c}"] = (
            round(r["rps"] / bare["rps"], 3) if valid(r, bare) and bare["rps"] else None
        )
        if c == 1:
            added[key] = {
                "p50_ms": round(r["p50_ms"] - bare["p50_ms"], 3) if valid(r, bare) else None,
                "p99_ms": round(r["p99_ms"] - bare["p99_ms"], 3) if valid(r, bare) else None,
            }
    stream: dict[str, Any] = {}
    sb, sf = by.get(("bare", "stream", "1k", 1)), by.get(("full", "stream", "1k", 1))
    if sb is not None and sf is not None:
        ok = valid(sb, sf)
        stream = {
            "ttfb_added_p50_ms": round(sf["ttfb_p50_ms"] - sb["ttfb_p50_ms"], 3) if ok else None,
            "ttfb_added_p99_ms": round(sf["ttfb_p99_ms"] - sb["ttfb_p99_ms"], 3) if ok else None,
            "full_gap_p99_ms": sf["gap_p99_ms"],
            "full_max_gap_ms": sf["max_gap_ms"],
            "bare_max_gap_ms": sb["max_gap_ms"],
            "chunk_delay_ms": sf["chunk_delay_ms"],
        }

    targets = []

    def target(name: str, value: float | None, goal: str, ok: bool | None) -> None:
        targets.append({"name": name, "value": value, "target": goal, "pass": ok})

    for c in (16, 64):
        if f"c{c}" in ratios.get("full-1k", {}):
            v = ratios["full-1k"][f"c{c}"]
            target(
                f"full policy 1 KB throughput vs bare Envoy, c{c}",
                v,
                ">= 0.5x",
                None if v is None else v >= 0.5,
            )
    if "c16" in ratios.get("passthrough-1k", {}):
        v = ratios["passthrough-1k"]["c16"]
        target("pass-through 1 KB throughput vs bare Envoy, c16", v, ">= 0.7x", None if v is None else v >= 0.7)
    if "full-1k" in added:
        # Issue 9's targets (the moonshot is 0.5 / 2 ms).
        v = added["full-1k"]["p50_ms"]
        target("full policy 1 KB added p50 at c1", v, "<= 1.0 ms", None if v is None else v <= 1.0)
        v = added["full-1k"]["p99_ms"]
        target("full policy 1 KB added p99 at c1", v, "<= 3.0 ms", None if v is None else v <= 3.0)
    full16, redis16 = by.get(("full", "load", "1k", 16)), by.get(("full-redis", "load", "1k", 16))
    if full16 is not None and redis16 is not None:
        v = round(redis16["rps"] / full16["rps"], 3) if valid(full16, redis16) and full16["rps"] else None
        target("Redis store vs memory store, full policy 1 KB c16", v, ">= 0.8x", None if v is None else v >= 0.8)
    if stream:
        v = stream["ttfb_added_p50_ms"]
        target("streaming first byte added p50", v, "<= 1 ms", None if v is None else v <= 1.0)
        held = None
        if sf is not None and sf["valid"]:
            # The mock writes each event 5 ms after the previous; one held back arrives glued to a
            # later one (fewer socket reads than events). A busy machine glues a few events of any
            # setup (the client reads late), so the test is relative to bare Envoy in the same run:
            # a gateway that holds chunks back glues nearly every response. Gaps are reported, not
            # judged: the gateway drops the usage-only event it asked for (one 2x-delay gap).
            extra = sf["glued_responses"] - (sb["glued_responses"] if sb["valid"] else 0)
            held = extra > 0.1 * max(1, sf["ok"])
        target(
            "streaming chunks never held back (responses with glued events, full vs bare)",
            f"{sf['glued_responses']} vs {sb['glued_responses']} of {sf['ok']}" if sf else None,
            "no more than bare + 10%",
            None if held is None else not held,
        )
    if memory is not None:
        target(
            f"extproc peak RSS after {memory['requests_target']} requests / {memory['sessions']} sessions",
            memory["rss_peak_mb"],
            f"< {mem.TARGET_MB:.0f} MB (at 100k / 10k)",
            memory["pass"] if memory["valid"] else None,
        )
    return {
        "throughput_ratio_vs_bare": ratios,
        "added_latency_vs_bare_c1": added,
        "streaming_vs_bare": stream,
        "targets": targets,
    }


def headline(scenarios: list[dict[str, Any]], derived: dict[str, Any]) -> dict[str, Any]:
    """The figures issue 9 tracks, at the top of the results document (None: not measured)."""
    ratios = derived["throughput_ratio_vs_bare"]
    by = {(r["setup"], r["kind"], r["size"], r["connections"]): r for r in scenarios}
    full, redis = by.get(("full", "load", "1k", 16)), by.get(("full-redis", "load", "1k", 16))
    redis_ratio = None
    if full is not None and redis is not None and full["valid"] and redis["valid"] and full["rps"]:
        redis_ratio = round(redis["rps"] / full["rps"], 3)
    return {
        "added_p50_ms_c1": derived["added_latency_vs_bare_c1"].get("full-1k", {}).get("p50_ms"),
        "ratio_passthrough_vs_bare_c16": ratios.get("passthrough-1k", {}).get("c16"),
        "ratio_redis_vs_memory_c16": redis_ratio,
    }


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="crdgol load benchmarks (see benchmarks/README.md)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run (< 2 min): 5 s scenarios, c1/c16, 1 KB, short streaming and memory checks",
    )
    p.add_argument(
        "--out",
        default=str(sc.HERE / "results"),
        help="results folder (default benchmarks/results)",
    )
    p.add_argument("--name", help="results file stem (default: quick or bench)")
    p.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="Envoy worker threads, the same for every setup (default 1)",
    )
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads (default 1: the load generator shares the cores)",
    )
    p.add_argument(
        "--duration", type=float, help="seconds per load scenario (default 10; 5 with --quick)"
    )
    p.add_argument("--setups", help=f"comma-separated subset of {','.join(sc.SETUP_ORDER)}")
    p.add_argument("--no-memory", action="store_true", help="skip the memory check")
    args = p.parse_args(argv)

    plan = sc.plan(args.quick)
    name = args.name or plan.name
    setups = [s for s in plan.setups if not args.setups or s in args.setups.split(",")]
    if "upstream" in setups and "bare" not in setups:
        setups.insert(0, "bare")
    todo = [s for s in plan.scenarios if s.setup in setups]
    if args.duration:
        todo = [
            sc.Scenario(
                s.setup, s.kind, s.size, s.connections, args.duration, s.requests, s.chunk_delay_ms
            )
            for s in todo
        ]
    total = len(todo) + (0 if args.no_memory else 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    machine = hz.machine_info(args.envoy_concurrency, args.wrk_threads)
    say(
        f"crdgol bench '{name}': {len(todo)} scenarios on {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"Envoy {machine['envoy']} --concurrency {args.envoy_concurrency}, wrk -t{args.wrk_threads}"
    )
    if machine["loadavg_start"] and machine["loadavg_start"][0] > 0.5:
        say(
            f"warning: load average {machine['loadavg_start'][0]:.2f} before the run: something else is "
            "using the CPUs, the figures will be noisy"
        )
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    memory: dict[str, Any] | None = None
    i = 0
    with tempfile.TemporaryDirectory(prefix="crdgol-bench-") as tmp:
        sizes = sorted({s.size for s in todo} | {"1k"}, key=lambda k: sc.PROMPT_SIZES[k])
        bodies = {}
        for size in sizes:
            bodies[size] = Path(tmp) / f"body-{size}.json"
            bodies[size].write_text(json.dumps(sc.chat_body(sc.PROMPT_SIZES[size])))
        bare: hz.Running | None = None
        try:
            for setup_name in setups:
                setup = sc.SETUPS[setup_name]
                mine = [s for s in todo if s.setup == setup_name]
                if not mine:
                    continue
                if setup.kind != "upstream" and bare is not None:
                    bare.stop()  # the upstream reference (run on bare's mock) is done with it
                    bare = None
                say(f"== {setup.name}: {setup.title}")
                try:
                    running = hz.start_setup(setup, args.envoy_concurrency, bare)
                except Exception as exc:
                    i = _setup_failed(mine, f"{type(exc).__name__}: {exc}", i, total, results)
                    continue
                if setup.kind == "bare":
                    bare = running
                try:
                    try:
                        preflight(running, setup, bodies)
                    except Exception as exc:
                        i = _setup_failed(
                            mine, f"preflight: {type(exc).__name__}: {exc}", i, total, results
                        )
                        continue
                    load = [s for s in mine if s.kind == "load"]
                    if load and plan.warmup:
                        hz.run_wrk(
                            hz.wrk_argv(
                                running.url + sc.CHAT_PATH,
                                bodies["1k"],
                                sc.request_headers(setup),
                                connections=16,
                                duration=plan.warmup,
                                threads=args.wrk_threads,
                                sessions=setup.sessions if setup.kind == "gateway" else 0,
                                prefix="1k-",
                            ),
                            timeout=plan.warmup + 60,
                        )
                    for s in mine:
                        i += 1
                        res = (
                            run_load(running, setup, s, bodies[s.size], args.wrk_threads)
                            if s.kind == "load"
                            else run_stream(running, setup, s)
                        )
                        results.append(res)
                        say(_line(i, total, res))
                finally:
                    if setup.kind == "gateway":
                        running.stop()
        finally:
            if bare is not None:
                bare.stop()

    if not args.no_memory:
        i += 1
        say(
            f"[{i}/{total}] memory {plan.memory_requests} requests / {plan.memory_sessions} sessions (full policy) ..."
        )
        memory = mem.measure(
            plan.memory_requests, plan.memory_sessions, envoy_concurrency=args.envoy_concurrency
        )
        flag = "" if memory["valid"] else f"  INVALID: {memory['invalid_reason']}"
        say(
            f"[{i}/{total}] memory ... extproc RSS {memory['rss_before_mb']} -> {memory['rss_after_mb']} MB "
            f"(peak {memory['rss_peak_mb']} MB) at {memory['rps']} rps{flag}"
        )

    machine["loadavg_end"] = hz.loadavg()
    derived = derive(results, memory)
    invalid = [r["name"] for r in results if not r["valid"]] + (
        [] if memory is None or memory["valid"] else ["memory"]
    )
    doc: dict[str, Any] = {
        "name": name,
        "quick": args.quick,
        "machine": machine,
        "elapsed_s": round(time.monotonic() - started, 1),
        "valid": not invalid,
        "invalid_scenarios": invalid,
        "setups": {s: sc.SETUPS[s].title for s in setups},
        "scenarios": results,
        "memory": memory,
        "derived": derived,
    }
    full_c16 = derived["throughput_ratio_vs_bare"].get("full-1k", {}).get("c16")
    doc["ratio_full_policy_vs_bare_c16"] = full_c16
    doc.update(headline(results, derived))
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path = out / f"{name}.md"
    md_path.write_text(report.markdown(doc))
    png_path = out / f"{name}.png"
    report.plot(doc, png_path)

    say(f"done in {doc['elapsed_s']} s -> {json_path}, {md_path}, {png_path}")
    for t in derived["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        say(f"  {mark} {t['name']}: {t['value']} (target {t['target']})")
    for key in ("ratio_full_policy_vs_bare_c16", "ratio_passthrough_vs_bare_c16", "added_p50_ms_c1", "ratio_redis_vs_memory_c16"):
        if doc.get(key) is not None:
            say(f"  {key} = {doc[key]}")
    if invalid:
        say(
            f"INVALID scenarios (request errors; figures flagged, not used in ratios): {', '.join(invalid)}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
