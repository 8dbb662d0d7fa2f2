"""``crdgol up``: the standalone gateway a newcomer runs, until Ctrl-C or SIGTERM.

A child that dies (Envoy, extproc, the controller, the mock) is restarted with backoff by
``crdgol.supervisor``, and stderr says so; Ctrl-C (or SIGTERM, or SIGHUP when its terminal closes) drains and stops everything;
if it is killed outright, the kernel stops its children (``StackSettings.die_with_parent``).
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from crdgol.stack import Stack, StackSettings
from crdgol.supervisor import Supervisor


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
    access_log: str = "-"  # Envoy's JSON access log: "-" = stdout, a file path, or "off"
    native_path: bool = True  # calls that need no extproc decision are decided by Envoy alone


def _free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    With SO_REUSEADDR, as every server here binds: connections of a stack just stopped, still in
    TIME_WAIT on the port, do not count as the port being taken; a listener does.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _workflow_hint(stack: Stack) -> str:
    """The folder's workflows and how to run one (nothing when it has none)."""
    names = sorted(
        str(meta.get("name"))
        for d in stack.manifests_others()
        if d.get("kind") == "WorkflowSpec" and isinstance(meta := d.get("metadata"), dict)
    )
    if not names:
        return ""
    gateway = "" if stack.url == "http://127.0.0.1:8080" else f" --gateway {stack.url}"
    return f"Workflows: {', '.join(names)}\n  crdgol workflow{gateway} run {names[0]} --input key=value --wait\n\n"


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
            access_log=settings.access_log,
            admin_socket=True,
            native_path=settings.native_path,
            die_with_parent=True,  # its children are started from this thread only
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

    # A closed terminal (SIGHUP) stops it as Ctrl-C does; its children, in their own session,
    # would not get that signal.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
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
        + _workflow_hint(stack)
        + "Press Ctrl-C to stop.\n"
    )
    supervisor = Supervisor(stack, _say)
    try:
        while not stop.wait(0.1):
            supervisor.tick()
    finally:
        _say("crdgol up: stopping ...")
        stack.stop()
        _say("crdgol up: stopped")
    return 0
