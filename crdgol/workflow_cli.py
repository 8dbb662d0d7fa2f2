"""``crdgol workflow run|get|list|cancel``: workflow runs over the gateway's HTTP API.

Every command prints the run's status as JSON on stdout. ``run --wait`` shows progress on stderr
(each step's phase as it changes) and exits 0 only when the run succeeded; the other commands exit
0 when the gateway answered 2xx. ``--gateway`` and ``--api-key`` default to the quickstart's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DONE = ("Succeeded", "Failed", "Cancelled")


class ApiError(Exception):
    def __init__(self, status: int, body: Any, retry_after: str = "") -> None:
        super().__init__(status)
        self.status, self.body, self.retry_after = status, body, retry_after


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{args.gateway.rstrip('/')}{path}",
        data=data,
        method=method,
        headers={"authorization": f"Bearer {args.api_key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = {"error": {"message": raw.decode("utf-8", "replace")}}
        raise ApiError(e.code, parsed, e.headers.get("retry-after") or "") from None


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if args.inputs_file:
        loaded = json.loads(Path(args.inputs_file).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.inputs_file}: must hold a JSON object")
        inputs.update(loaded)
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--input {item!r}: expected key=value")
        inputs[key] = value
    return inputs


def _progress(status: dict[str, Any], seen: dict[str, str]) -> None:
    for s in status.get("steps", []):
        if seen.get(s["name"]) != s["phase"]:
            seen[s["name"]] = s["phase"]
            extra = f" ({s['message']})" if s.get("message") and s["phase"] in ("Failed", "Skipped", "Pending") else ""
            print(f"  {s['name']}: {s['phase']}{extra}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    status = _call(args, "POST", f"/v1/workflows/{args.name}/runs", {"inputs": _inputs(args)})
    if args.wait:
        print(f"run {status['name']}: {status['phase']}", file=sys.stderr, flush=True)
        seen: dict[str, str] = {}
        deadline = time.monotonic() + args.timeout
        while status["phase"] not in DONE and time.monotonic() < deadline:
            _progress(status, seen)
            time.sleep(0.25)
            try:
                status = _call(args, "GET", f"/v1/workflows/runs/{status['name']}")
            except ApiError as exc:
                if exc.status != 503:  # 503: the engine (re)starting or the gateway busy; keep waiting
                    raise
        _progress(status, seen)
        print(f"run {status['name']}: {status['phase']}", file=sys.stderr, flush=True)
    print(json.dumps(status, indent=2))
    if args.wait:
        return 0 if status["phase"] == "Succeeded" else 1
    return 0


def get(args: argparse.Namespace) -> int:
    print(json.dumps(_call(args, "GET", f"/v1/workflows/runs/{args.run}"), indent=2))
    return 0


def list_runs(args: argparse.Namespace) -> int:
    print(json.dumps(_call(args, "GET", "/v1/workflows/runs"), indent=2))
    return 0


def cancel(args: argparse.Namespace) -> int:
    print(json.dumps(_call(args, "DELETE", f"/v1/workflows/runs/{args.run}"), indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        return int(args.workflow_func(args))
    except ApiError as e:
        print(json.dumps(e.body, indent=2))
        err = (e.body.get("error") or {}) if isinstance(e.body, dict) else {}
        msg = err.get("message") if isinstance(err, dict) else None
        if e.status == 429 and isinstance(err, dict) and err.get("code") == "too_many_active_runs":
            wait = f"; retry in {e.retry_after} s" if e.retry_after else ""
            print(f"crdgol workflow: too many runs going: {msg}{wait}", file=sys.stderr)
        else:
            print(f"crdgol workflow: the gateway answered {e.status}: {msg or e.body}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"crdgol workflow: {e}", file=sys.stderr)
        return 2


def add_parser(sub: Any) -> None:
    wf = sub.add_parser("workflow", help="start, watch and cancel workflow runs through the gateway")
    wf.add_argument("--gateway", default=os.environ.get("CRDGOL_GATEWAY", "http://127.0.0.1:8080"), help="gateway URL (default http://127.0.0.1:8080, env CRDGOL_GATEWAY)")
    wf.add_argument("--api-key", default=os.environ.get("CRDGOL_API_KEY", "sk-crdgol-quickstart"), help="API key: decides the tenant (default the quickstart's, env CRDGOL_API_KEY)")
    wf.set_defaults(func=main)
    cmds = wf.add_subparsers(dest="workflow_command", required=True, metavar="COMMAND")
    r = cmds.add_parser("run", help="start a run of a WorkflowSpec; prints its status as JSON")
    r.add_argument("name", help="the WorkflowSpec's name")
    r.add_argument("--input", action="append", default=[], metavar="KEY=VALUE", help="one input (repeatable; the value is a string)")
    r.add_argument("--inputs-file", default="", help="a JSON object of inputs (--input values override it)")
    r.add_argument("--wait", action="store_true", help="wait for the run to end, showing progress; exit 0 only if it succeeded")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits at most (default 600)")
    r.set_defaults(workflow_func=run)
    g = cmds.add_parser("get", help="print a run's status")
    g.add_argument("run")
    g.set_defaults(workflow_func=get)
    ls = cmds.add_parser("list", help="print the runs of your tenant")
    ls.set_defaults(workflow_func=list_runs)
    c = cmds.add_parser("cancel", help="cancel a run (in-flight calls are aborted)")
    c.add_argument("run")
    c.set_defaults(workflow_func=cancel)
