"""Turn a results document (``benchmarks.run``) into a Markdown table and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _cpu(r: dict[str, Any], proc: str) -> str:
    p = (r.get("procs") or {}).get(proc)
    return "-" if not p else f"{p['cpu_pct']:.0f}%"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# crdgol benchmark `{doc['name']}`",
        "",
        f"{m['started_at']}: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, "
        f"Envoy {m['envoy']} `--concurrency {m['envoy_concurrency']}`, wrk {m['wrk']} `-t{m['wrk_threads']}`, "
        f"upstream: {m['mock_upstream']}. Took {doc['elapsed_s']} s.",
        "",
    ]
    if m.get("loadavg_start"):
        lines += [
            f"Load average (1/5/15 min) at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.",
            "",
        ]
    if not doc["valid"]:
        lines += [
            f"**INVALID scenarios (request errors):** {', '.join(doc['invalid_scenarios'])}",
            "",
        ]
    lines += ["Setups:", ""] + [f"- **{k}**: {v}" for k, v in doc["setups"].items()] + [""]

    lines += [
        "## Non-streaming (wrk)",
        "",
        "| scenario | rps | p50 ms | p90 ms | p99 ms | errors | extproc CPU | extproc RSS MB | Envoy CPU | mock CPU | valid |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["scenarios"]:
        if r["kind"] != "load":
            continue
        lines.append(
            f"| {r['name']} | {r['rps']:.0f} | {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | {_f(r['p99_ms'])} | {r['errors']} | "
            f"{_cpu(r, 'extproc')} | {_f(r['extproc_rss_mb'], 1)} | {_cpu(r, 'envoy')} | {_cpu(r, 'mock-llm')} | "
            f"{'yes' if r['valid'] else '**NO**'} |"
        )
    lines += [
        "",
        "CPU columns: share of one core used during the scenario (from /proc/<pid>/stat).",
        "",
    ]

    streams = [r for r in doc["scenarios"] if r["kind"] == "stream"]
    if streams:
        lines += [
            "## Streaming (async client, sequential)",
            "",
            "| scenario | streams | TTFB p50 ms | TTFB p99 ms | chunk gap p50 ms | gap p99 ms | max gap ms | chunk delay ms | events / reads | held back | valid |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in streams:
            lines.append(
                f"| {r['name']} | {r['ok']}/{r['requests']} | {_f(r['ttfb_p50_ms'])} | {_f(r['ttfb_p99_ms'])} | "
                f"{_f(r['gap_p50_ms'])} | {_f(r['gap_p99_ms'])} | {_f(r['max_gap_ms'])} | {_f(r['chunk_delay_ms'], 0)} | "
                f"{_f(r['frames_per_response'], 0)} / {_f(r['reads_per_response_median'], 0)} | {_f(r['glued_responses'])} | {'yes' if r['valid'] else '**NO**'} |"
            )
        lines.append("")

    lines += where_the_time_goes(doc)
    lines += scale_out(doc)

    d = doc["derived"]
    lines += [
        "## Against bare Envoy",
        "",
        "| setup | " + " | ".join(_conn_keys(d)) + " | added p50 ms (c1) | added p99 ms (c1) |",
    ]
    lines.append("|---|" + "---:|" * (len(_conn_keys(d)) + 2))
    for key, ratios in d["throughput_ratio_vs_bare"].items():
        add = d["added_latency_vs_bare_c1"].get(key, {})
        cells = [
            f"{_f(ratios.get(c), 3)}x" if ratios.get(c) is not None else "-" for c in _conn_keys(d)
        ]
        lines.append(
            f"| {key} | "
            + " | ".join(cells)
            + f" | {_f(add.get('p50_ms'), 3)} | {_f(add.get('p99_ms'), 3)} |"
        )
    lines += [
        "",
        "Ratios are rps / bare Envoy's rps at the same prompt size and connection count.",
        "",
    ]

    mem = doc.get("memory")
    if mem:
        lines += [
            "## Memory (extproc, full policy)",
            "",
            f"{mem['requests_completed']} requests over {mem['sessions']} sessions at {mem['rps']} rps: "
            f"RSS {mem['rss_before_mb']} -> {mem['rss_after_mb']} MB (peak {mem['rss_peak_mb']} MB, "
            f"{_f(mem['kb_per_session'])} KB per session), errors {mem['errors']}"
            + ("" if mem["valid"] else f" — **INVALID**: {mem['invalid_reason']}"),
            "",
        ]

    lines += [
        "## Targets (DESIGN.md)",
        "",
        "| target | value | goal | result |",
        "|---|---:|---|---|",
    ]
    for t in d["targets"]:
        res = {True: "pass", False: "**FAIL**", None: "n/a (invalid)"}[t["pass"]]
        lines.append(f"| {t['name']} | {_f(t['value'], 3)} | {t['target']} | {res} |")
    lines.append("")
    for key in ("ratio_full_policy_vs_bare_c16", "ratio_passthrough_vs_bare_c16", "added_p50_ms_c1", "ratio_redis_vs_memory_c16"):
        if doc.get(key) is not None:
            lines.append(f"- `{key}` = **{doc[key]}**")
    return "\n".join(lines) + "\n"


def _us(r: dict[str, Any], proc: str) -> str:
    v = (r.get("cpu_us_per_request") or {}).get(proc)
    return "-" if v is None else f"{v:,}"


def where_the_time_goes(doc: dict[str, Any]) -> list[str]:
    rows = [r for r in doc["scenarios"] if r.get("cpu_us_per_request")]
    if not rows:
        return []
    lines = [
        "## Where the time goes (per request)",
        "",
        "| scenario | ext_proc messages | ext_proc streams | extproc CPU µs | Envoy CPU µs | mock CPU µs | Redis CPU µs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {_f(r.get('extproc_messages_per_request'))} | {_f(r.get('extproc_streams_per_request'))} | "
            f"{_us(r, 'extproc')} | {_us(r, 'envoy')} | {_us(r, 'mock-llm')} | {_us(r, 'redis')} |"
        )
    return [*lines, "", "Messages: ProcessingRequests Envoy sent to extproc (admin `/stats`, `ext_proc.*.stream_msgs_sent`," " every ext_proc filter summed) divided by the requests wrk completed; streams likewise" " (`streams_started`). CPU: user + system time from `/proc/<pid>/stat` over the scenario," " divided by its requests (on a shared machine contention inflates these too, less than rps).", ""]


def _cpu_at(doc: dict[str, Any], setup: str, proc: str) -> int | None:
    for r in doc["scenarios"]:
        if (r["setup"], r["kind"], r["size"], r["connections"]) == (setup, "load", "1k", 16) and r["valid"]:
            v = (r.get("cpu_us_per_request") or {}).get(proc)
            return int(v) if v else None
    return None


def scale_out(doc: dict[str, Any]) -> list[str]:
    """Sizing extproc beyond one core, from this run's CPU per request (on paper: the run itself
    has two cores for everything)."""
    full, passthrough = _cpu_at(doc, "full", "extproc"), _cpu_at(doc, "passthrough", "extproc")
    if full is None:
        return []
    redis_ext, redis_srv = _cpu_at(doc, "full-redis", "extproc"), _cpu_at(doc, "full-redis", "redis")
    lines = [
        "## Scale-out beyond one core (on paper)",
        "",
        "extproc is one Python process: one core, whatever the machine. It scales by running more of"
        " them (`crdgol up --extproc-replicas N`, or more pods behind the extproc Service); Envoy spreads"
        " ext_proc streams across them. A request's extproc work is CPU, so the replicas needed follow"
        " from the CPU time per request measured above:",
        "",
        "| policy | extproc CPU per request | requests/s per extproc core | replicas for 1,000 rps (at 70 % busy) | for 10,000 rps |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(name: str, us: int | None) -> None:
        if us:
            per_core = 1e6 / us
            lines.append(
                f"| {name} | {us:,} µs | {per_core:,.0f} | {-(-1000 // int(0.7 * per_core))} | {-(-10000 // int(0.7 * per_core))} |"
            )

    row("pass-through", passthrough)
    row("full policy, memory store", full)
    row("full policy, Redis store", redis_ext)
    lines += [
        "",
        "Replicas share nothing but the store: with the memory store each replica enforces its own"
        " quotas and keeps its own session history (a tenant gets N times its quota across N replicas,"
        " and a session's history is only on the replica that served it), so several replicas need"
        " `--redis-url`. Then every quota check is one atomic Lua script (reserve), every settle one"
        " more, and a session's history one LRANGE and one append script: four round trips per"
        " full-policy request, pipelined on one connection per replica.",
    ]
    if redis_ext and redis_srv:
        lines += [
            "",
            f"What sharing costs, measured here: extproc spends {redis_ext - full:+,} µs per request with Redis"
            f" instead of memory, and redis-server {redis_srv:,} µs, so one Redis core carries about"
            f" {1e6 / redis_srv:,.0f} full-policy requests/s, the work of about {full / redis_srv:.0f}"
            " extproc cores: Redis becomes the shared limit only past that many replicas, and then"
            " scales by hash-tagging keys per tenant/binding scope (each script touches one scope's"
            " keys, `{scope}` tags them for Redis Cluster).",
        ]
    return [*lines, ""]


def _conn_keys(d: dict[str, Any]) -> list[str]:
    keys = {c for ratios in d["throughput_ratio_vs_bare"].values() for c in ratios}
    return sorted(keys, key=lambda k: int(k[1:]))


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = [r for r in doc["scenarios"] if r["kind"] == "load"]
    setups = [s for s in doc["setups"] if any(r["setup"] == s for r in load)]
    groups = sorted(
        {(r["size"], r["connections"]) for r in load}, key=lambda g: (int(g[0].rstrip("k")), g[1])
    )
    by = {(r["setup"], r["size"], r["connections"]): r for r in load}
    colors = {"upstream": "#bbbbbb", "bare": "#4c72b0", "passthrough": "#55a868", "full": "#c44e52"}

    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [max(2, len(groups)), 2]}
    )
    width = 0.8 / max(1, len(setups))
    for j, s in enumerate(setups):
        xs, ys, hatches = [], [], []
        for gi, (size, c) in enumerate(groups):
            r = by.get((s, size, c))
            if r is None:
                continue
            xs.append(gi + (j - (len(setups) - 1) / 2) * width)
            ys.append(r["rps"])
            hatches.append("" if r["valid"] else "xx")
        bars = ax1.bar(xs, ys, width, label=s, color=colors.get(s))
        for b, h in zip(bars, hatches, strict=True):
            b.set_hatch(h)
    ax1.set_xticks(range(len(groups)), [f"{size} c{c}" for size, c in groups])
    ax1.set_ylabel("requests / s")
    ax1.set_title("Throughput (non-streaming chat; hatched = invalid)")
    ax1.legend(ncols=len(setups), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax1.grid(axis="y", alpha=0.3)

    c1 = [(s, by.get((s, "1k", 1))) for s in setups]
    c1 = [(s, r) for s, r in c1 if r is not None]
    xs = range(len(c1))
    ax2.bar(
        [x - 0.2 for x in xs], [r["p50_ms"] or 0 for _, r in c1], 0.4, label="p50", color="#4c72b0"
    )
    ax2.bar(
        [x + 0.2 for x in xs], [r["p99_ms"] or 0 for _, r in c1], 0.4, label="p99", color="#dd8452"
    )
    ax2.set_xticks(list(xs), [s for s, _ in c1])
    ax2.set_ylabel("ms")
    ax2.set_title("Latency at 1 connection, 1 KB prompt")
    ax2.legend()
    ax2.grid(axis="y", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(
        f"crdgol {doc['name']}: {m['nproc']} CPUs, Envoy {m['envoy']} --concurrency {m['envoy_concurrency']}"
        + (
            f", full/bare c16 = {doc['ratio_full_policy_vs_bare_c16']}"
            if doc.get("ratio_full_policy_vs_bare_c16") is not None
            else ""
        )
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
