"""OpenTelemetry traces: settings from a flag or the standard ``OTEL_*`` variables, and the SDK
started only when they ask for it.

Tracing is off unless a collector is named: ``--otlp-endpoint URL`` on any command, or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``. ``OTEL_TRACES_EXPORTER=none``
turns it off whatever else is set, and ``OTEL_SDK_DISABLED=true`` too. Spans go to an OTLP/gRPC
receiver (``OTEL_EXPORTER_OTLP_PROTOCOL`` other than ``grpc`` is refused: Envoy's tracer and
ours speak gRPC); ``http://`` is plaintext, ``https://`` TLS with the system CAs. Each process
names itself ``OTEL_SERVICE_NAME`` or its default (``crdgol-extproc``, ``crdgol-controller``;
Envoy's spans are ``crdgol-gateway``). The remaining ``OTEL_*`` variables the SDK reads itself
(``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_RESOURCE_ATTRIBUTES``, ...).

``settings_from`` is pure (entry points pass ``os.environ``); ``start`` imports the SDK, so a
process with tracing off never loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

__all__ = ["TracingError", "TracingSettings", "settings_from", "start"]

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
GATEWAY_SERVICE = "crdgol-gateway"


class TracingError(ValueError):
    """A tracing setting that cannot work; the message says which and why."""


@dataclass(frozen=True, slots=True)
class TracingSettings:
    endpoint: str = ""  # the OTLP/gRPC collector URL; "" = tracing off
    service_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.endpoint)
        return parts.port or (443 if parts.scheme == "https" else 4317)

    @property
    def tls(self) -> bool:
        return urlsplit(self.endpoint).scheme == "https"

    def environment(self) -> dict[str, str]:
        """The ``OTEL_*`` variables that give a child process these settings (``crdgol up``)."""
        if not self.enabled:
            return {"OTEL_TRACES_EXPORTER": "none"}
        return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.endpoint, "OTEL_TRACES_EXPORTER": "otlp"}


def settings_from(env: Mapping[str, str], flag: str, default_service: str) -> TracingSettings:
    """Settings from ``--otlp-endpoint`` (``flag``, wins) and the environment. Raises TracingError."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return TracingSettings()
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters and not flag:
        return TracingSettings()
    if exporters - {"otlp", "none"}:
        raise TracingError(f"OTEL_TRACES_EXPORTER={env['OTEL_TRACES_EXPORTER']!r}: only otlp (or none) is supported")
    endpoint = flag or next((env[v] for v in ENDPOINT_VARIABLES if env.get(v, "").strip()), "")
    endpoint = endpoint.strip()
    if not endpoint or endpoint.lower() == "off":
        return TracingSettings()
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol != "grpc":
        raise TracingError(f"OTLP protocol {protocol!r}: only grpc is supported (a collector's port 4317)")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        raise TracingError(f"OTLP endpoint {endpoint!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TracingError(f"OTLP endpoint {endpoint!r}: expected http://HOST:PORT or https://HOST:PORT")
    if parts.username or parts.password:
        raise TracingError("the OTLP endpoint must not carry credentials (use OTEL_EXPORTER_OTLP_HEADERS)")
    service = env.get("OTEL_SERVICE_NAME", "").strip() or default_service
    return TracingSettings(endpoint=f"{parts.scheme}://{parts.netloc}", service_name=service)


def start(settings: TracingSettings) -> tuple[Tracer, Callable[[], None]]:
    """Start the SDK with a batching OTLP/gRPC exporter: a tracer, and the call that flushes and
    stops it at shutdown. Imports the SDK: call only when ``settings.enabled``."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The SDK adds OTEL_RESOURCE_ATTRIBUTES to this resource itself.
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    exporter = OTLPSpanExporter(endpoint=f"{settings.host}:{settings.port}", insecure=not settings.tls)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider.get_tracer("crdgol"), provider.shutdown
