"""crdgol against LiteLLM proxy on the same upstream: ``python -m benchmarks.peers [--quick]``.

DESIGN.md asks for crdgol at least 10x LiteLLM proxy's throughput, each side in its best
configuration for the machine. One run on one machine measures, one setup at a time, with the
same wrk Lua script, 1 KB chat body and connection counts:

- bare Envoy, crdgol pass-through and crdgol full policy (``benchmarks.harness.start_setup``
  with ``benchmarks.scenarios.SETUPS``, checked by ``benchmarks.run.preflight``);
- LiteLLM proxy (pinned in ``benchmarks/peers/requirements-litellm.txt``, installed once into
  ``.venv-peers/``) configured by ``benchmarks/peers/litellm-config.yaml``: model ``bench-chat``
  routed to the bundled mock as an OpenAI-compatible backend, a master key for auth, no DB, no
  Redis, logging and callbacks off; once per worker count in ``--litellm-workers`` (default
  1 and 2, the machine has 2 cores). Ratios use the best LiteLLM figure at each connection count.

Results: ``<out>/peers.json``, ``peers.md``, ``peers.png``. Exit code 1 if LiteLLM could not be
installed or any scenario had request errors.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import harness as hz
from benchmarks import scenarios as sc
from benchmarks.run import preflight, run_load
from crdgol.stack import free_port, wait_http

ROOT = sc.HERE.parent
PEERS = sc.HERE / "peers"
REQUIREMENTS = PEERS / "requirements-litellm.txt"
CONFIG = PEERS / "litellm-config.yaml"
VENV = ROOT / ".venv-peers"
MARKER = VENV / ".crdgol-requirements.sha256"
# Environment of the LiteLLM proxy; each is documented in litellm-config.yaml.
LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_MODE": "PRODUCTION",
}
CRDGOL_SETUPS = ("bare", "passthrough", "full")
TARGET = 10.0


def say(msg: str) -> None:
    print(msg, flush=True)


# --- the LiteLLM venv -----------------------------------------------------------------------


class InstallError(RuntimeError):
    pass


def _base_python() -> str:
    """The interpreter the project venv was made from (a venv of a venv would share site-packages)."""
    base = (
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    return str(base) if base.exists() else sys.executable


def ensure_litellm() -> str:
    """Create ``.venv-peers`` and install the pinned LiteLLM once; return its version.

    Cached by a hash of the requirements file. pip's output is streamed so progress shows; on
    failure the error lines pip printed are raised as ``InstallError``.
    """
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    litellm = VENV / "bin" / "litellm"
    if not (MARKER.exists() and MARKER.read_text().strip() == digest and litellm.exists()):
        if not (VENV / "bin" / "python").exists():
            say(f"creating {VENV} ...")
            subprocess.run([_base_python(), "-m", "venv", str(VENV)], check=True)
        say(
            f"installing LiteLLM into {VENV} from {REQUIREMENTS.relative_to(ROOT)} (about a minute) ..."
        )
        proc = subprocess.Popen(
            [
                str(VENV / "bin" / "pip"),
                "install",
                "--progress-bar",
                "off",
                "-r",
                str(REQUIREMENTS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            if line.startswith("WARNING: Location"):
                continue  # the machine's extra local indexes; noise
            tail = [*tail, line.rstrip()][-40:]
            if line.startswith(("Collecting", "Installing", "Successfully", "ERROR")):
                say("  pip: " + line.rstrip()[:160])
        if proc.wait() != 0:
            errors = [t for t in tail if t.startswith("ERROR")] or tail[-10:]
            raise InstallError(
                f"pip install -r {REQUIREMENTS.name} failed ({proc.returncode}): "
                + " | ".join(errors)
            )
        MARKER.write_text(digest + "\n")
    out = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise InstallError(f"litellm does not import in {VENV}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


# --- LiteLLM as a running setup --------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:
        pass
    return kids


class LiteLLM(hz.Running):
    """The mock upstream plus LiteLLM proxy (uvicorn, ``--num_workers N``) in front of it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.state = Path(tempfile.mkdtemp(prefix="crdgol-bench-litellm-"))
        self.procs: dict[str, Any] = {}

    def start(self) -> LiteLLM:
        port = free_port()
        try:
            mock, mock_port = hz.start_mock(self.state)
            self.procs["mock-llm"] = mock
            self.mock_url = f"http://127.0.0.1:{mock_port}"
            cfg = self.state / "litellm-config.yaml"
            cfg.write_text(
                CONFIG.read_text().replace(
                    f"127.0.0.1:{sc.MANIFEST_MOCK_PORT}", f"127.0.0.1:{mock_port}"
                )
            )
            env = {**os.environ, **LITELLM_ENV}
            log = open(self.state / "litellm.log", "ab")  # noqa: SIM115 (kept open for the child)
            proc = subprocess.Popen(
                [
                    str(VENV / "bin" / "litellm"),
                    "--config",
                    str(cfg),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    str(self.workers),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.state,
                start_new_session=True,
            )
            self.procs["litellm"] = proc
            self.url = f"http://127.0.0.1:{port}"
            wait_http(f"{self.url}/health/liveliness", (200,), 120, proc)
            # Every worker must be up before timing: with N > 1 uvicorn spawns N workers that each
            # import the app (seconds of CPU) and the first one ready answers the probe. Wait
            # until all N exist and have gone idle (under 50 ms CPU in half a second).
            deadline = time.monotonic() + 120
            while self.workers > 1 and time.monotonic() < deadline:
                kids = self._worker_pids()
                before = [hz.sample(k) for k in kids]
                time.sleep(0.5)
                after = [hz.sample(k) for k in kids]
                busy = [
                    k
                    for k, b, a in zip(kids, before, after, strict=True)
                    if b is None or a is None or a.cpu_s - b.cpu_s > 0.05
                ]
                if len(kids) >= self.workers and not busy:
                    break
        except BaseException:
            self.stop()
            raise
        self.pids = {"mock-llm": mock.pid, "litellm": proc.pid}
        for i, pid in enumerate(self._worker_pids()):
            self.pids[f"litellm-child{i}"] = pid
        return self

    def _worker_pids(self) -> list[int]:
        """uvicorn's child processes: its workers plus helpers (none with one worker: it serves in the main process)."""
        if self.workers == 1:
            return []
        return [p for p in _children(self.procs["litellm"].pid) if _is_python(p)]

    def stop(self) -> None:
        for name in ("litellm", "mock-llm"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            # Own session: SIGTERM the group so uvicorn's workers go with their parent.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def _is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False


def litellm_preflight(running: LiteLLM, body: Path) -> dict[str, Any]:
    """Prove LiteLLM routed to the mock, rewrote the model, metered usage and checks the key."""
    setup = litellm_setup(running.workers)
    with httpx.Client(base_url=running.url, headers=sc.request_headers(setup), timeout=30) as c:
        r = c.post(sc.CHAT_PATH, content=body.read_bytes())
        if r.status_code != 200:
            raise RuntimeError(f"preflight answered {r.status_code}: {r.text[:300]}")
        doc = r.json()
        reply = doc["choices"][0]["message"]["content"]
        if "model=mock-gpt" not in reply:
            raise RuntimeError(
                f"LiteLLM did not route to the mock backend as mock-gpt: {reply[:200]}"
            )
        if not doc.get("usage", {}).get("total_tokens"):
            raise RuntimeError(f"no usage in LiteLLM's reply: {doc}")
        cost = r.headers.get("x-litellm-response-cost")
        bad = c.post(
            sc.CHAT_PATH, content=body.read_bytes(), headers={"Authorization": "Bearer sk-wrong"}
        )
        if bad.status_code == 200:
            raise RuntimeError("LiteLLM accepted a wrong key: auth is not on")
    return {"reply": reply[:120], "response_cost_header": cost, "wrong_key_status": bad.status_code}


def litellm_setup(workers: int) -> sc.Setup:
    return sc.Setup(
        f"litellm-w{workers}",
        "peer",
        f"LiteLLM proxy, uvicorn --num_workers {workers}: master-key auth, routing, "
        "cost/usage accounting; no DB, no Redis",
        compare=False,
    )


# --- the run ---------------------------------------------------------------------------------


def _warmup(running: hz.Running, setup: sc.Setup, body: Path, seconds: float) -> None:
    hz.run_wrk(
        hz.wrk_argv(
            running.url + sc.CHAT_PATH,
            body,
            sc.request_headers(setup),
            connections=16,
            duration=seconds,
            sessions=setup.sessions if setup.kind == "gateway" else 0,
            prefix="warm-",
        ),
        timeout=seconds + 60,
    )


def _failed(setup: str, conns: tuple[int, ...], reason: str) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{setup}-1k c{c}",
            "key": f"{setup}-1k-c{c}",
            "setup": setup,
            "kind": "load",
            "size": "1k",
            "connections": c,
            "rps": 0.0,
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "errors": 0,
            "procs": {},
            "valid": False,
            "invalid_reason": reason,
        }
        for c in conns
    ]


def _line(res: dict[str, Any]) -> str:
    head = f"  {res['name']}: "
    if res["p50_ms"] is None:
        return head + f"INVALID: {res['invalid_reason']}"
    cpu = ", ".join(
        f"{k} {v['cpu_pct']:.0f}%"
        for k, v in (res.get("procs") or {}).items()
        if v and v.get("cpu_pct") is not None
    )
    flag = "" if res["valid"] else f"  INVALID: {res['invalid_reason']}"
    return (
        head
        + f"{res['rps']:.0f} rps p50 {res['p50_ms']:.2f} ms p90 {res['p90_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms"
        + f" errors {res['errors']} (CPU: {cpu}){flag}"
    )


def run_setup(
    name: str,
    start: Any,
    setup: sc.Setup,
    check: Any,
    body: Path,
    conns: tuple[int, ...],
    duration: float,
    warmup: float,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    say(f"== {name}: {setup.title}")
    try:
        running = start()
    except Exception as exc:
        reason = f"setup failed: {type(exc).__name__}: {exc}"
        say(f"  {reason}")
        return _failed(name, conns, reason), None
    try:
        try:
            info = check(running)
        except Exception as exc:
            reason = f"preflight: {type(exc).__name__}: {exc}"
            say(f"  {reason}")
            return _failed(name, conns, reason), None
        _warmup(running, setup, body, warmup)
        out = []
        for c in conns:
            res = run_load(running, setup, sc.Scenario(name, "load", "1k", c, duration), body, 1)
            out.append(res)
            say(_line(res))
        return out, info
    finally:
        running.stop()


def derive(
    results: list[dict[str, Any]], conns: tuple[int, ...], workers: tuple[int, ...]
) -> dict[str, Any]:
    by = {(r["setup"], r["connections"]): r for r in results}
    best: dict[str, Any] = {}
    for c in conns:
        cands = [by[(f"litellm-w{w}", c)] for w in workers if (f"litellm-w{w}", c) in by]
        cands = [r for r in cands if r["valid"]]
        top = max(cands, key=lambda r: r["rps"], default=None)
        best[f"c{c}"] = None if top is None else {"setup": top["setup"], "rps": top["rps"]}
    ratios: dict[str, dict[str, float | None]] = {}
    for setup in CRDGOL_SETUPS:
        ratios[f"{setup}_vs_litellm"] = {}
        for c in conns:
            r, b = by.get((setup, c)), best[f"c{c}"]
            ratios[f"{setup}_vs_litellm"][f"c{c}"] = (
                round(r["rps"] / b["rps"], 2) if r and r["valid"] and b and b["rps"] else None
            )
    # The worker count that wins at the highest connection count is "LiteLLM's best".
    top_c = best.get(f"c{max(conns)}")
    targets = []
    for c in conns:
        v = ratios["full_vs_litellm"][f"c{c}"]
        targets.append(
            {
                "name": f"crdgol full policy vs LiteLLM (best workers), 1 KB, c{c}",
                "value": v,
                "target": f">= {TARGET:.0f}x",
                "pass": None if v is None else v >= TARGET,
            }
        )
    return {
        "litellm_best_per_connections": best,
        "litellm_best_workers": None if top_c is None else int(top_c["setup"].rsplit("w", 1)[1]),
        "ratios": ratios,
        "targets": targets,
    }


# --- report ----------------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    m, ll, d = doc["machine"], doc["litellm"], doc["derived"]
    conns = doc["connections"]
    lines = [
        "# crdgol vs LiteLLM proxy",
        "",
        f"{m['started_at']}: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, "
        f"Envoy {m['envoy']} `--concurrency {m['envoy_concurrency']}`, wrk {m['wrk']} `-t1`, "
        f"upstream: {m['mock_upstream']}. {doc['duration_s']:.0f} s per scenario, 1 KB prompt, "
        f"`{doc['command']}`. Took {doc['elapsed_s']} s. "
        f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.",
        "",
        f"LiteLLM {ll['version']} (`{ll['requirement']}`), uvicorn, workers tried {ll['workers_tried']}, "
        f"best {d['litellm_best_workers']}; config `benchmarks/peers/litellm-config.yaml`, "
        f"environment {', '.join(f'`{k}={v}`' for k, v in ll['env'].items())}."
        + (f" **Install failed:** {ll['install_error']}" if ll.get("install_error") else ""),
        "",
        "| setup | what it does |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in doc["setups"].items()],
        "",
        "## Requests/s, 1 KB non-streaming chat",
        "",
        "| setup | " + " | ".join(f"c{c} rps | c{c} p50 / p99 ms" for c in conns) + " | valid |",
        "|---|" + "---:|---:|" * len(conns) + "---|",
    ]
    by = {(r["setup"], r["connections"]): r for r in doc["scenarios"]}
    for setup in doc["setups"]:
        cells = []
        ok = True
        for c in conns:
            r = by.get((setup, c))
            if r is None:
                cells += ["-", "-"]
                continue
            ok = ok and r["valid"]
            lat = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"
            cells += [f"{r['rps']:.0f}", lat]
        lines.append(f"| {setup} | " + " | ".join(cells) + f" | {'yes' if ok else '**NO**'} |")
    lines += [
        "",
        "## Ratios (crdgol rps / the best LiteLLM worker count's rps at the same connections)",
        "",
        "| | " + " | ".join(f"c{c}" for c in conns) + " |",
        "|---|" + "---:|" * len(conns),
        "| best LiteLLM | "
        + " | ".join(
            "-" if b is None else f"{b['rps']:.0f} rps ({b['setup']})"
            for b in (d["litellm_best_per_connections"][f"c{c}"] for c in conns)
        )
        + " |",
    ]
    for key, row in d["ratios"].items():
        lines.append(
            f"| {key.replace('_vs_litellm', '')} / LiteLLM | "
            + " | ".join("-" if row[f"c{c}"] is None else f"{row[f'c{c}']:.2f}x" for c in conns)
            + " |"
        )
    lines += ["", "## Target (DESIGN.md: crdgol at least 10x LiteLLM proxy's throughput)", ""]
    for t in d["targets"]:
        mark = {True: "PASS", False: "**FAIL**", None: "n/a"}[t["pass"]]
        lines.append(f"- {mark} {t['name']}: {t['value']} (target {t['target']})")
    lines += [
        "",
        "CPU use per process and scenario is in `peers.json` (`procs`). Everything shares 2 cores "
        "with wrk and the mock; see benchmarks/README.md for the caveats of these figures.",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conns = doc["connections"]
    setups = list(doc["setups"])
    by = {(r["setup"], r["connections"]): r for r in doc["scenarios"]}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(setups)
    for i, s in enumerate(setups):
        xs = [j + (i - (len(setups) - 1) / 2) * width for j in range(len(conns))]
        rs = [by.get((s, c)) for c in conns]
        ys = [r["rps"] if r else 0 for r in rs]
        bars = ax.bar(xs, ys, width, label=s)
        for b, r in zip(bars, rs, strict=True):
            if r and not r["valid"]:
                b.set_hatch("//")
            ax.annotate(
                f"{b.get_height():.0f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(len(conns)), [f"{c} connections" for c in conns])
    ax.set_ylabel("requests/s (1 KB chat, non-streaming)")
    ax.set_title(
        f"crdgol vs LiteLLM {doc['litellm']['version']} on the same mock upstream "
        f"({doc['machine']['nproc']} CPUs)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="c1/c16 at 5 s each (default: c1/c16/c64 at 10 s)"
    )
    p.add_argument(
        "--out",
        default=str(sc.HERE / "results"),
        help="results folder (default benchmarks/results)",
    )
    p.add_argument("--duration", type=float, help="seconds per scenario")
    p.add_argument(
        "--litellm-workers", default="1,2", help="LiteLLM --num_workers values to try (default 1,2)"
    )
    p.add_argument(
        "--envoy-concurrency", type=int, default=1, help="Envoy worker threads for crdgol and bare"
    )
    p.add_argument(
        "--skip-crdgol", action="store_true", help="measure LiteLLM only (ratios will be null)"
    )
    args = p.parse_args(argv)

    conns = (1, 16) if args.quick else (1, 16, 64)
    duration = args.duration or (5.0 if args.quick else 10.0)
    warmup = 1.5 if args.quick else 3.0
    workers = tuple(int(w) for w in args.litellm_workers.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    litellm: dict[str, Any] = {
        "requirement": "litellm[proxy]==1.108.6",
        "requirements_file": str(REQUIREMENTS.relative_to(ROOT)),
        "config_file": str(CONFIG.relative_to(ROOT)),
        "server": "uvicorn (litellm's default), uvloop, h11",
        "env": LITELLM_ENV,
        "workers_tried": list(workers),
    }
    for line in REQUIREMENTS.read_text().splitlines():
        if line.startswith("litellm["):
            litellm["requirement"] = line.strip()
    try:
        litellm["version"] = ensure_litellm()
    except (InstallError, OSError, subprocess.CalledProcessError) as exc:
        litellm["version"] = None
        litellm["install_error"] = str(exc)
        say(f"LiteLLM install FAILED: {exc}")

    machine = hz.machine_info(args.envoy_concurrency, 1)
    say(
        f"peers: crdgol vs LiteLLM {litellm['version']} on {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"1 KB body, c{'/c'.join(map(str, conns))} at {duration:.0f} s"
    )
    results: list[dict[str, Any]] = []
    setups: dict[str, str] = {}
    preflights: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="crdgol-peers-") as tmp:
        body = Path(tmp) / "body-1k.json"
        body.write_text(json.dumps(sc.chat_body(sc.PROMPT_SIZES["1k"])))
        bodies = {"1k": body}
        if not args.skip_crdgol:
            for name in CRDGOL_SETUPS:
                setup = sc.SETUPS[name]
                setups[name] = setup.title

                def check(running: hz.Running, setup: sc.Setup = setup) -> dict[str, Any]:
                    preflight(running, setup, bodies)
                    return {"ok": True}

                res, info = run_setup(
                    name,
                    lambda setup=setup: hz.start_setup(setup, args.envoy_concurrency),
                    setup,
                    check,
                    body,
                    conns,
                    duration,
                    warmup,
                )
                results += res
                preflights[name] = info
        for w in workers:
            setup = litellm_setup(w)
            setups[setup.name] = setup.title
            if litellm.get("install_error"):
                results += _failed(
                    setup.name, conns, f"LiteLLM not installed: {litellm['install_error']}"
                )
                continue
            res, info = run_setup(
                setup.name,
                lambda w=w: LiteLLM(w).start(),
                setup,
                lambda running: litellm_preflight(running, body),
                body,
                conns,
                duration,
                warmup,
            )
            results += res
            preflights[setup.name] = info

    machine["loadavg_end"] = hz.loadavg()
    derived = derive(results, conns, workers)
    invalid = [r["name"] for r in results if not r["valid"]]
    doc: dict[str, Any] = {
        "name": "peers",
        "quick": args.quick,
        "command": "python -m benchmarks.peers" + (" --quick" if args.quick else ""),
        "machine": machine,
        "litellm": {**litellm, "best_workers": derived["litellm_best_workers"]},
        "connections": list(conns),
        "duration_s": duration,
        "prompt_bytes": sc.PROMPT_SIZES["1k"],
        "elapsed_s": round(time.monotonic() - started, 1),
        "valid": not invalid and not litellm.get("install_error"),
        "invalid_scenarios": invalid,
        "setups": setups,
        "preflight": preflights,
        "scenarios": results,
        "derived": derived,
    }
    (out / "peers.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "peers.md").write_text(markdown(doc))
    plot(doc, out / "peers.png")
    say(f"done in {doc['elapsed_s']} s -> {out / 'peers.json'}, peers.md, peers.png")
    say(f"  LiteLLM best workers: {derived['litellm_best_workers']}")
    for key, row in derived["ratios"].items():
        say(f"  {key}: {row}")
    for t in derived["targets"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        say(f"  {mark} {t['name']}: {t['value']} (target {t['target']})")
    if not doc["valid"]:
        say(f"INVALID: {', '.join(invalid) or 'LiteLLM install failed'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
