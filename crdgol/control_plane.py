"""Who may talk to the controller, and how: the control plane's credentials, shared by both ends.

The controller's two gRPC services (ADS for Envoy, the policy stream for extproc) carry every
secret the gateway holds, so they are never served to a connection that has not proved who it is:

* **Unix sockets** (standalone, ``crdgol up``): the sockets live in a folder only the owner may
  enter (0700) and are themselves 0600, so the kernel refuses every other local user. No TCP port.
* **Mutual TLS** (a cluster): the controller presents its certificate and requires a client
  certificate signed by the control plane's CA; when ``client_names`` is set, the client
  certificate must also carry one of those names (DNS or URI SAN, or CN), so a certificate from a
  shared issuer is not enough. Files are re-read when they change, so a rotated Secret (e.g. from
  cert-manager) takes effect for every new connection without a restart.

Plain TCP is not offered by the command line at all: ``require_secure_server`` and
``require_secure_client`` refuse it (a library caller may still use it on loopback, as the kopf
tests do; ``Controller.start`` refuses it anywhere else).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# gRPC auth-context properties that name the peer of a TLS connection.
_NAME_PROPERTIES = ("x509_subject_alternative_name", "x509_common_name")


class InsecureControlPlane(ValueError):
    """A control-plane endpoint that would serve or trust an unauthenticated connection."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: our certificate chain and key, and the CA that signs the other side."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """Changes when any file is rewritten or replaced (a Secret volume swaps in new files)."""
        return tuple((st.st_mtime_ns, st.st_ino, st.st_size) for st in (p.stat() for p in (self.cert, self.key, self.ca)))


@dataclass(frozen=True, slots=True)
class ServerAuth:
    """How the controller's gRPC endpoints authenticate their clients."""

    tls: TlsFiles | None = None
    # Names a client certificate must carry one of (empty: any certificate the CA signed).
    client_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """How extproc proves itself to the policy stream and checks it reached the controller."""

    tls: TlsFiles | None = None
    # The name the controller's certificate must carry (default: the host of the target).
    server_name: str = ""


def is_unix_target(target: str) -> bool:
    return target.startswith("unix:")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_secure_server(auth: ServerAuth, tcp: list[str]) -> None:
    """Refuse TCP endpoints (``host:port``) without mutual TLS (the command line's rule)."""
    if tcp and auth.tls is None:
        raise InsecureControlPlane(
            f"the control plane would listen on {', '.join(tcp)} without authentication: give --tls-cert, "
            "--tls-key and --tls-client-ca (mutual TLS), or --xds-socket and --policy-socket (Unix sockets)"
        )


def require_secure_client(target: str, auth: ClientAuth) -> None:
    """Refuse to take a policy (with its secrets and keys) from an unauthenticated TCP peer."""
    if not is_unix_target(target) and auth.tls is None:
        raise InsecureControlPlane(
            f"the policy stream at {target} would be neither authenticated nor encrypted: give --policy-tls-cert, "
            "--policy-tls-key and --policy-tls-ca (mutual TLS), or a unix:PATH target"
        )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate and follow file rotation."""
    cert, key, ca = files.read()
    seen = [files.stamp()]

    def config(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called before every TLS handshake: re-read only when a file changed.
        try:
            stamp = files.stamp()
            if stamp == seen[0]:
                return None
            fresh = config(*files.read())
        except (OSError, ValueError) as exc:
            log.warning("control-plane TLS files unreadable (%s); keeping the loaded certificate", exc)
            return None
        seen[0] = stamp
        log.info("control-plane TLS certificate reloaded from %s", files.cert)
        return fresh

    return grpc.dynamic_ssl_server_credentials(config(cert, key, ca), fetch, require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials: our certificate, and the CA the controller's must chain to."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_names(auth_context: dict[str, list[bytes]]) -> set[str]:
    """The names a TLS peer's verified certificate carries (SANs and CN); empty for no TLS."""
    names: set[str] = set()
    for prop in _NAME_PROPERTIES:
        for value in auth_context.get(prop, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return names


def authorizer(auth: ServerAuth) -> Callable[[grpc.aio.ServicerContext], str | None]:
    """A check for each call: ``None`` if the peer may proceed, otherwise why not.

    Unix-socket peers passed the file permissions; TLS peers passed the handshake (a certificate
    the CA signed), and must also carry one of ``client_names`` when it is set.
    """

    def check(context: grpc.aio.ServicerContext) -> str | None:
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            return None
        if auth.tls is None:
            return None if _peer_is_loopback(peer) else f"plaintext peer {peer} outside loopback"
        names = peer_names(dict(context.auth_context() or {}))
        if not names:
            return "no verified client certificate"
        if auth.client_names and not names & set(auth.client_names):
            return f"client certificate names {sorted(names)} are not among the allowed control-plane clients"
        return None

    return check


def _peer_is_loopback(peer: str) -> bool:
    # gRPC peers look like "ipv4:127.0.0.1:5000" or "ipv6:[::1]:5000".
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]")
    return kind in ("ipv4", "ipv6") and is_loopback(host)


def private_dir(path: Path) -> Path:
    """Create (or tighten) a folder only we may enter, for sockets and secrets.

    A folder that exists already must be ours and not a symlink: one another user created in a
    shared place (say /tmp) would stay theirs to enter whatever its mode.
    """
    path.mkdir(parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{path} is not a folder of ours (a symlink, or owned by uid {info.st_uid}): refusing to put sockets there")
    os.chmod(path, stat.S_IRWXU)
    return path


def private_socket(path: str) -> None:
    """Make a Unix socket usable by its owner only (the folder is 0700 as well)."""
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
