"""``crdgol up`` as a user runs it, in a subprocess: start it on given ports, find its children,
wait for answers, stop it with Ctrl-C. Shared by the supervision and chaos tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from crdgol.stack import free_port

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"authorization": "Bearer sk-crdgol-quickstart"}


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    port: int
    stderr: Path
    model: str = "quickstart-chat"  # what ``answered_within`` asks for

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def said(self) -> str:
        return self.stderr.read_text(errors="replace")

    def story(self) -> str:
        """What ``crdgol up`` and its Python children said, then Envoy's last lines: a failure's
        explanation, which Envoy's per-request warnings would otherwise push out of a short tail."""
        lines = self.said().splitlines()
        envoy = [ln for ln in lines if ln.startswith("[20")]
        ours = [ln for ln in lines if ln.strip() and not ln.startswith("[20")]
        return "\n".join([*ours[-60:], "-- Envoy's last lines --", *(ln[:400] for ln in envoy[-5:])])

    def children(self) -> dict[str, int]:
        """The stack's processes by role, found through /proc (children of ``crdgol up``)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid != self.proc.pid:
                continue
            if argv[0].endswith(b"envoy"):
                found["envoy"] = int(entry.name)
            elif b"crdgol.cli" in argv:
                found[argv[argv.index(b"crdgol.cli") + 1].decode()] = int(entry.name)
        return found


def answered_within(up: Up, seconds: float) -> float:
    """Seconds until the gateway answers a good request with 200 again."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if httpx.post(up.url, json={**BODY, "model": up.model}, headers=HEADERS, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"no 200 within {seconds}s; crdgol up said:\n{up.story()}")


def start_up(folder: Path, port: int, mock_port: int, metrics_port: int, log: Path, *extra: str, model: str = "quickstart-chat") -> Up:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "crdgol.cli", "up", "--manifests", str(folder), "--port", str(port),
                "--mock-port", str(mock_port), "--metrics-port", str(metrics_port), *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "CRDGOL_LOG_LEVEL": "warning"},
        )
    up = Up(proc, port, log, model)
    try:
        answered_within(up, 60)
    except BaseException:
        stop_up(up)
        raise
    return up


def stop_up(up: Up) -> int:
    """Ctrl-C, as a user stops it; killed if it has not stopped within a minute."""
    up.proc.send_signal(signal.SIGINT)
    try:
        return up.proc.wait(60)
    except subprocess.TimeoutExpired:
        up.proc.kill()
        up.proc.wait()
        raise


def quickstart_copy(tmp_path: Path) -> tuple[Path, int, int, int]:
    """A copy of examples/quickstart pointed at a free mock port; (folder, port, mock, metrics)."""
    folder = tmp_path / "quickstart"
    shutil.copytree(ROOT / "examples" / "quickstart", folder)
    mock_port = free_port()
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{mock_port}"))
    return folder, free_port(), mock_port, free_port()


