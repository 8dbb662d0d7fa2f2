"""Development certificates for the control plane's mutual TLS (tests, and clusters without cert-manager).

``issue`` makes a CA and, signed by it, one server certificate for the controller and one client
certificate for the gateway pods (Envoy and extproc share it). ``crdgol certs`` prints them as the
two Kubernetes TLS Secrets deploy/ mounts. Keys are ECDSA P-256; validity is bounded (default 90
days, like cert-manager's default), so a forgotten dev certificate does not live forever.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crdgol.control_plane import TlsFiles

CONTROLLER_NAMES = (
    "crdgol-controller",
    "crdgol-controller.crdgol-system",
    "crdgol-controller.crdgol-system.svc",
    "crdgol-controller.crdgol-system.svc.cluster.local",
)
GATEWAY_NAME = "crdgol-gateway.crdgol-system.svc"


@dataclass(frozen=True, slots=True)
class Pem:
    cert: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class Issued:
    ca: Pem
    server: Pem
    client: Pem


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


def ca(common_name: str = "crdgol control plane CA", days: int = 90) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)), key, cert


def leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: tuple[str, ...], *, server: bool, days: int = 90
) -> Pem:
    """A certificate for ``names`` (the first is also the CN), for a TLS server or client."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_san(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def issue(
    server_names: tuple[str, ...] = CONTROLLER_NAMES, client_names: tuple[str, ...] = (GATEWAY_NAME,), days: int = 90
) -> Issued:
    ca_pem, ca_key, ca_cert = ca(days=days)
    return Issued(
        ca=ca_pem,
        server=leaf(ca_key, ca_cert, server_names, server=True, days=days),
        client=leaf(ca_key, ca_cert, client_names, server=False, days=days),
    )


def write(folder: Path, pem: Pem, ca_pem: Pem) -> TlsFiles:
    """Write one identity as tls.crt / tls.key / ca.crt (the layout of a Kubernetes TLS Secret)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(cert=folder / "tls.crt", key=folder / "tls.key", ca=folder / "ca.crt")
    files.cert.write_bytes(pem.cert)
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key:
        os.fchmod(fd, 0o600)  # also when the file was there before, with a looser mode
        key.write(pem.key)
    files.ca.write_bytes(ca_pem.cert)
    return files


def secrets_yaml(issued: Issued, namespace: str = "crdgol-system") -> str:
    """The two TLS Secrets deploy/ mounts: crdgol-controller-tls and crdgol-gateway-tls."""
    import base64

    import yaml

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def secret(name: str, pem: Pem) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "crdgol"}},
            "data": {"tls.crt": b64(pem.cert), "tls.key": b64(pem.key), "ca.crt": b64(issued.ca.cert)},
        }

    docs = [secret("crdgol-controller-tls", issued.server), secret("crdgol-gateway-tls", issued.client)]
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
