"""The moving parts of a benchmark run: processes, wrk, /proc sampling, the streaming client.

Every process started here is on 127.0.0.1, in its own session, and stopped by its own pid.
"""

from __future__ import annotations

import abc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from benchmarks import scenarios as sc
from crdgol.stack import Stack, StackSettings, envoy_binary, free_port, stop_process, wait_http

CLK_TCK = os.sysconf("SC_CLK_TCK")
MOCK_ARGS = ("--record", "0")  # the mock keeps no request log: less work, same for every setup


# --- /proc sampling -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # user + system CPU seconds since the process started
    rss_mb: float
    hwm_mb: float  # peak RSS


def sample(pid: int) -> ProcSample | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces) start at field 3.
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    kb = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)
    }
    return ProcSample(cpu, kb.get("VmRSS", 0) / 1024, kb.get("VmHWM", 0) / 1024)


# --- setups as processes --------------------------------------------------------------------


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    f = open(log, "ab")  # noqa: SIM115 (kept open for the child)
    return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def start_mock(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The bundled mock upstream on a free port, answering; its process and port."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "crdgol.cli", "mock-llm", "--port", str(port), *MOCK_ARGS], state / "mock-llm.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", (200,), 30, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port


class Running(abc.ABC):
    """One started setup: its URL, the mock's URL and the pids worth sampling."""

    url: str
    mock_url: str
    pids: dict[str, int]
    metrics_url: str | None = None
    admin_url: str | None = None  # Envoy's admin endpoint (its ext_proc stats)

    @abc.abstractmethod
    def stop(self) -> None: ...


class BareEnvoy(Running):
    """The mock upstream plus an Envoy with no ext_proc (``scenarios.bare_envoy_config``)."""

    def __init__(self, concurrency: int) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="crdgol-bench-bare-"))
        self.concurrency = concurrency
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> Self:
        port, admin = free_port(), free_port()
        try:
            mock, mock_port = start_mock(self.state)
            self.procs["mock-llm"] = mock
            self.mock_url = f"http://127.0.0.1:{mock_port}"
            cfg = sc.write_json(self.state / "envoy.json", self.envoy_config(port, admin, mock_port))
            argv = [
                envoy_binary(),
                "-c",
                str(cfg),
                "--log-level",
                "warning",
                "--disable-hot-restart",
            ]
            if self.concurrency:
                argv += ["--concurrency", str(self.concurrency)]
            envoy = spawn(argv, self.state / "envoy.log")
            self.procs["envoy"] = envoy
            self.url = f"http://127.0.0.1:{port}"
            self.admin_url = f"http://127.0.0.1:{admin}"
            wait_http(f"http://127.0.0.1:{admin}/ready", (200,), 30, envoy)
        except BaseException:
            self.stop()
            raise
        self.pids = {name: p.pid for name, p in self.procs.items()}
        return self

    def envoy_config(self, port: int, admin: int, mock_port: int) -> dict[str, Any]:
        """Envoy's config; started after the mock, so a subclass may start its own parts here."""
        return sc.bare_envoy_config(port, admin, mock_port)

    def stop(self) -> None:
        for name in ("envoy", *[n for n in self.procs if n not in ("envoy", "mock-llm")], "mock-llm"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_process(proc)
        shutil.rmtree(self.state, ignore_errors=True)


class Upstream(Running):
    """wrk straight at a running setup's mock: the ceiling any proxy in front of it can reach."""

    def __init__(self, of: Running) -> None:
        self.url = self.mock_url = of.mock_url
        self.pids = {"mock-llm": of.pids["mock-llm"]}

    def stop(self) -> None:
        pass


class Gateway(Running):
    """The real gateway (``crdgol.stack.Stack``) serving a benchmark manifest folder."""

    def __init__(self, manifests: Path, concurrency: int, redis: bool = False, native_path: bool = True) -> None:
        self.native_path = native_path
        self.root = Path(tempfile.mkdtemp(prefix="crdgol-bench-gw-"))
        self.manifests = manifests
        self.concurrency = concurrency
        self.stack: Stack | None = None
        self.redis = redis
        self.redis_proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Gateway:
        mock_port = free_port()
        folder = self.root / "manifests"
        folder.mkdir()
        # The manifests name the mock at 127.0.0.1:8081; point them at this run's free port.
        for src in sorted(self.manifests.glob("*.yaml")):
            text = src.read_text().replace(
                f"127.0.0.1:{sc.MANIFEST_MOCK_PORT}", f"127.0.0.1:{mock_port}"
            )
            (folder / src.name).write_text(text)
        redis_url = ""
        if self.redis:
            port = free_port()
            self.redis_proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            redis_url = f"redis://127.0.0.1:{port}/0"
            wait_redis(port)
        stack = Stack(
            StackSettings(
                manifests=folder,
                redis_url=redis_url,
                mock_port=mock_port,
                mock_args=MOCK_ARGS,
                metrics_port=free_port(),
                state_dir=self.root / "state",
                envoy_concurrency=self.concurrency,
                quiet=True,
                native_path=self.native_path,
            )
        )
        self.stack = stack
        try:
            stack.start()
        except BaseException:
            self.stop()
            raise
        if stack.problems:
            self.stop()
            raise RuntimeError(
                f"benchmark manifests {self.manifests} have problems: {stack.problems}"
            )
        self.url, self.mock_url = stack.url, stack.mock_url
        self.metrics_url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
        self.admin_url = f"http://127.0.0.1:{stack.admin_port}"
        self.pids = {name: p.pid for name, p in stack.procs.items()}
        if self.redis_proc is not None:
            self.pids["redis"] = self.redis_proc.pid  # its CPU is part of what the store costs
        return self

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        if self.redis_proc is not None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def wait_redis(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port}")


def start_setup(setup: sc.Setup, concurrency: int, bare: Running | None = None) -> Running:
    if setup.kind == "bare":
        return BareEnvoy(concurrency).start()
    if setup.kind == "upstream":
        if bare is None:
            raise RuntimeError("the upstream setup runs on the bare setup's mock; start bare first")
        return Upstream(bare)
    assert setup.manifests is not None
    return Gateway(setup.manifests, concurrency, redis=setup.redis, native_path=setup.native_path).start()


def set_mock(mock_url: str, **knobs: float) -> None:
    req = urllib.request.Request(
        f"{mock_url}/_mock/config",
        data=json.dumps(knobs).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


@dataclass(frozen=True)
class ExtProcCounts:
    """Envoy's ext_proc counters, summed over every ext_proc filter (downstream and upstream)."""

    messages: int  # ProcessingRequests Envoy sent to extproc (stream_msgs_sent)
    streams: int  # gRPC streams it opened (streams_started)


def extproc_counts(admin_url: str | None) -> ExtProcCounts | None:
    """From Envoy's admin ``/stats`` (None without an admin endpoint or if it does not answer)."""
    if not admin_url:
        return None
    try:
        with urllib.request.urlopen(f"{admin_url}/stats?filter=ext_proc", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    messages = streams = 0
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.endswith(".stream_msgs_sent"):
            messages += int(value)
        elif name.endswith(".streams_started"):
            streams += int(value)
    return ExtProcCounts(messages, streams)


def metric_total(metrics_url: str | None, name: str) -> float | None:
    """Sum of every series of one Prometheus counter (None without a metrics endpoint)."""
    if not metrics_url:
        return None
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DUR = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def _count(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)([kMG]?)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


@dataclass
class WrkResult:
    rps: float = 0.0
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(out: str) -> WrkResult:
    """Parse wrk's ``--latency`` text output."""
    r = WrkResult(raw=out)
    if m := re.search(r"^\s*Latency\s+" + _DUR + r"\s+" + _DUR + r"\s+" + _DUR, out, re.M):
        r.max_ms = _ms(m.group(5), m.group(6))
    for pct, attr in (("50", "p50_ms"), ("75", "p75_ms"), ("90", "p90_ms"), ("99", "p99_ms")):
        if m := re.search(rf"^\s*{pct}%\s+" + _DUR, out, re.M):
            setattr(r, attr, _ms(m.group(1), m.group(2)))
    if m := re.search(r"^\s*(\d+) requests in " + _DUR, out, re.M):
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2), m.group(3)) / 1000
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M):
        r.rps = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        r.non_2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        r.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    return r


def wrk_argv(
    url: str,
    body_file: Path,
    headers: dict[str, str],
    *,
    connections: int,
    duration: float,
    threads: int = 1,
    sessions: int = 0,
    prefix: str = "s-",
    stop: int = 0,
) -> list[str]:
    wrk = shutil.which("wrk")
    if not wrk:
        raise FileNotFoundError("wrk is missing: apt-get install -y wrk")
    argv = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(sc.POST_LUA),
        url,
        "--",
        f"body={body_file}",
    ]
    if sessions:
        argv += [f"sessions={sessions}", f"prefix={prefix}"]
    if stop:
        argv.append(f"stop={stop}")
    argv += [f"{k}: {v}" for k, v in headers.items()]
    return argv


def run_wrk(argv: list[str], timeout: float) -> WrkResult:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return parse_wrk(proc.stdout)


# --- streaming ------------------------------------------------------------------------------


@dataclass
class StreamResult:
    requests: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)  # request sent -> first body bytes
    total_ms: list[float] = field(default_factory=list)
    max_gap_ms: list[float] = field(default_factory=list)  # per response: largest gap between reads
    gaps_ms: list[float] = field(default_factory=list)  # every gap between reads
    frames: list[int] = field(default_factory=list)  # SSE events per response
    reads: list[int] = field(default_factory=list)  # separate socket reads per response
    # Responses where some SSE event did not arrive on its own (fewer reads than events): a chunk
    # was held back and delivered glued to a later one.
    glued: int = 0

    def summary(self, chunk_delay_ms: float) -> dict[str, Any]:
        def pct(xs: list[float], p: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))], 3)

        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "ttfb_p50_ms": pct(self.ttfb_ms, 50),
            "ttfb_p99_ms": pct(self.ttfb_ms, 99),
            "total_p50_ms": pct(self.total_ms, 50),
            "chunk_delay_ms": chunk_delay_ms,
            "gap_p50_ms": pct(self.gaps_ms, 50),
            "gap_p99_ms": pct(self.gaps_ms, 99),
            "max_gap_ms": round(max(self.max_gap_ms), 3) if self.max_gap_ms else None,
            # Held-back chunks show as fewer reads than events (frames arriving glued together).
            "glued_responses": self.glued,
            "frames_per_response": statistics.median(self.frames) if self.frames else None,
            "reads_per_response_min": min(self.reads) if self.reads else None,
            "reads_per_response_median": statistics.median(self.reads) if self.reads else None,
        }


async def stream_check(
    url: str, body: dict[str, Any], headers: dict[str, str], n: int, session_prefix: str
) -> StreamResult:
    """``n`` sequential streamed chat requests; timing of each read of the response body."""
    import aiohttp

    res = StreamResult()
    payload = json.dumps(body).encode()
    timeout = aiohttp.ClientTimeout(total=30)
    conn = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn, auto_decompress=False) as s:
        for i in range(n):
            h = dict(headers)
            if session_prefix:
                h["x-session-id"] = f"{session_prefix}{i % 64}"
            res.requests += 1
            t0 = time.perf_counter()
            try:
                async with s.post(url + sc.CHAT_PATH, data=payload, headers=h) as r:
                    if r.status != 200:
                        res.errors.append(f"status {r.status}: {(await r.text())[:200]}")
                        continue
                    first = last = None
                    gaps: list[float] = []
                    data = bytearray()
                    reads = 0
                    async for chunk in r.content.iter_any():
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append((now - last) * 1000)  # type: ignore[operator]
                        last = now
                        reads += 1
                        data += chunk
                    if first is None or b"data: [DONE]" not in data:
                        res.errors.append("stream ended without data: [DONE]")
                        continue
                    res.ok += 1
                    res.ttfb_ms.append((first - t0) * 1000)
                    res.total_ms.append((last - t0) * 1000)  # type: ignore[operator]
                    res.gaps_ms.extend(gaps)
                    res.max_gap_ms.append(max(gaps, default=0.0))
                    res.frames.append(data.count(b"data: "))
                    res.reads.append(reads)
                    if reads < res.frames[-1]:
                        res.glued += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                res.errors.append(f"{type(exc).__name__}: {exc}")
    return res


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info(envoy_concurrency: int, wrk_threads: int) -> dict[str, Any]:
    model = cpu_model()
    envoy_version = subprocess.run(
        [envoy_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"version: [0-9a-f]+/([^/\s]+)/", envoy_version)
    wrk_version = subprocess.run(
        [shutil.which("wrk") or "wrk", "-v"], capture_output=True, text=True, check=False
    )
    wv = re.search(r"wrk (\S+)", wrk_version.stdout + wrk_version.stderr)
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": m.group(1) if m else envoy_version.strip(),
        "wrk": wv.group(1) if wv else "",
        "envoy_concurrency": envoy_concurrency,
        "wrk_threads": wrk_threads,
        "mock_upstream": "crdgol mock-llm, latency 0, --record 0",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: high before a run means something else is busy."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []
