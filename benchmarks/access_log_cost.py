"""What the JSON access log costs: full-policy throughput with it off and on, in one run.

    python -m benchmarks.access_log_cost [--seconds 8] [--rounds 2] [--connections 16]

Starts the full-policy gateway (benchmarks/manifests/full, 1 KB prompts, sessions as in the
benchmark) with the access log off, then writing to a file, alternating ``rounds`` times so drift
on a shared machine hits both alike, and prints requests/s of each and the ratio (on / off) as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks import harness as hz
from benchmarks import scenarios as sc
from crdgol.stack import Stack, StackSettings, free_port


def measure(access_log: str, body: Path, seconds: float, connections: int) -> float:
    root = Path(tempfile.mkdtemp(prefix="crdgol-bench-al-"))
    try:
        mock_port = free_port()
        folder = root / "manifests"
        folder.mkdir()
        for src in sorted((sc.MANIFESTS / "full").glob("*.yaml")):
            text = src.read_text().replace(f"127.0.0.1:{sc.MANIFEST_MOCK_PORT}", f"127.0.0.1:{mock_port}")
            (folder / src.name).write_text(text)
        target = str(root / "access.log") if access_log == "file" else "off"
        stack = Stack(
            StackSettings(
                manifests=folder, mock_port=mock_port, mock_args=hz.MOCK_ARGS, metrics_port=free_port(),
                state_dir=root / "state", quiet=True, access_log=target,
            )
        )
        stack.start()
        try:
            setup = sc.SETUPS["full"]
            argv = hz.wrk_argv(
                f"{stack.url}/v1/chat/completions", body, sc.request_headers(setup),
                connections=connections, duration=1, sessions=setup.sessions,
            )
            hz.run_wrk(argv, 30)  # warm-up
            argv = hz.wrk_argv(
                f"{stack.url}/v1/chat/completions", body, sc.request_headers(setup),
                connections=connections, duration=seconds, sessions=setup.sessions,
            )
            res = hz.run_wrk(argv, seconds + 30)
            if res.non_2xx:
                raise RuntimeError(f"{res.non_2xx} non-2xx answers with the access log {access_log}")
            if access_log == "file":
                lines = (root / "access.log").read_text().count("\n") if (root / "access.log").exists() else 0
                print(f"  access log: {lines} lines written", flush=True)
            return res.rps
        finally:
            stack.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps(sc.chat_body(sc.PROMPT_SIZES["1k"])))
        runs: dict[str, list[float]] = {"off": [], "file": []}
        for _ in range(args.rounds):
            for mode in ("off", "file"):
                rps = measure(mode, body, args.seconds, args.connections)
                print(f"  access log {mode}: {rps:.0f} req/s", flush=True)
                runs[mode].append(rps)
    off, on = statistics.mean(runs["off"]), statistics.mean(runs["file"])
    print(json.dumps({"connections": args.connections, "rps_off": runs["off"], "rps_file": runs["file"], "ratio_on_vs_off": round(on / off, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
