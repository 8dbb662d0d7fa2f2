"""``crdgol up``: the standalone gateway a newcomer runs, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from crdgol.stack import Stack, StackSettings


@dataclass(frozen=True, slots=True)
class UpSettings:
    manifests: Path
    host: str = "127.0.0.1"
    port: int = 8080
    mock_port: int | None = 8081
    metrics_port: int = 9102
    state_dir: Path | None = None
    envoy_log_level: str = "warning"
    redis_url: str = ""
    extproc_replicas: int = 1


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def up(settings: UpSettings) -> int:
    if not settings.manifests.is_dir():
        _say(f"crdgol up: {settings.manifests} is not a folder of manifests")
        return 2
    stack = Stack(
        StackSettings(
            manifests=settings.manifests,
            host=settings.host,
            port=settings.port,
            mock_port=settings.mock_port,
            metrics_port=settings.metrics_port,
            state_dir=settings.state_dir,
            envoy_log_level=settings.envoy_log_level,
            redis_url=settings.redis_url,
            extproc_replicas=settings.extproc_replicas,
        )
    )
    if settings.extproc_replicas > 1 and not settings.redis_url:
        _say("crdgol up: --extproc-replicas above 1 needs --redis-url, so replicas share quotas and history")
        return 2
    for what, port, flag in (("gateway", settings.port, "--port"), ("mock upstream", settings.mock_port, "--mock-port"), ("metrics", settings.metrics_port, "--metrics-port")):
        if port and not _free(settings.host if what == "gateway" else "127.0.0.1", port):
            _say(f"crdgol up: port {port} for the {what} is already in use: stop what holds it, or choose another with {flag}")
            return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _say(f"crdgol up: starting {'the mock upstream, ' if settings.mock_port else ''}extproc and Envoy ...")
    try:
        stack.start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        _say(f"crdgol up: could not start: {exc} (logs in {stack.state})")
        return 1
    for where, problem in stack.problems.items():
        _say(f"crdgol up: refused {where}: {problem.reason}: {problem.message}")
    result = stack.result
    models = sorted(b.model for b in result.snapshot.bindings) if result else []
    _say(
        f"\ncrdgol gateway ready on {stack.url}/v1\n"
        f"  models:  {', '.join(models) or '(none)'}\n"
        + (f"  mock upstream: {stack.mock_url}\n" if settings.mock_port else "")
        + (f"  metrics: http://127.0.0.1:{settings.metrics_port}/metrics\n" if settings.metrics_port else "")
        + f"  state:   {stack.state}\n\n"
        f"Try it:\n"
        f"  curl {stack.url}/v1/chat/completions -H 'Authorization: Bearer sk-crdgol-quickstart' \\\n"
        f"    -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{models[0] if models else 'quickstart-chat'}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n\n"
        f"Press Ctrl-C to stop.\n"
    )
    try:
        while not stop.wait(0.5):
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    _say(f"crdgol up: {name} exited with {proc.returncode}; stopping")
                    stop.set()
    finally:
        _say("crdgol up: stopping ...")
        stack.stop()
        _say("crdgol up: stopped")
    return 0
