"""Private TLS material for the Graph simulator.

The simulator speaks HTTPS so that the real MSAL and httpx code paths (certificate
verification included) run against it unchanged. This module creates a throw-away
certificate authority and a server certificate for the loopback names, and writes
them as PEM files that clients can trust explicitly (``verify=ca_file``).

EC P-256 keys keep generation and TLS handshakes cheap. A directory that already
holds a matching, still-valid set is reused, so a CA that a team added to its trust
store keeps working across restarts and several simulators can share a directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; sharing a directory is then racy
    fcntl = None  # type: ignore[assignment]

DEFAULT_HOSTNAMES: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
VALIDITY = dt.timedelta(days=30)
# Clock skew between the generating process and its clients should not matter.
BACKDATE = dt.timedelta(hours=1)
# Reused material must stay valid for a while, or a long benchmark could outlive it.
MIN_REMAINING_VALIDITY = dt.timedelta(days=1)

CA_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
_LOCK_FILE = ".tls.lock"


@dataclass(frozen=True)
class TlsMaterial:
    """Where the PEM files of one CA and its server certificate live."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def generate_tls_material(
    directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES
) -> TlsMaterial:
    """Create a new CA and a server certificate for ``hostnames`` in ``directory``.

    Existing files are replaced. Each file is written atomically, but the set is
    only consistent for concurrent writers when they hold the directory lock, as
    :func:`load_or_generate_tls_material` does.
    """
    if not hostnames:
        raise ValueError("at least one hostname is needed for the server certificate")
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - BACKDATE, now + VALIDITY

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "invite-worker"),
            x509.NameAttribute(NameOID.COMMON_NAME, "invite-worker Graph simulator CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_general_names(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    material = _material_in(directory)
    # The CA key is never written: nothing needs to sign with it after this call.
    _write_atomically(material.key_file, _private_pem(server_key), private=True)
    _write_atomically(material.cert_file, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_atomically(material.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    return material


def load_or_generate_tls_material(
    directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES
) -> TlsMaterial:
    """Reuse the material in ``directory`` when it is sound, else generate a new set.

    Sound means: the server certificate was issued by the CA in the same directory,
    covers every name in ``hostnames``, matches the key file, and both certificates
    stay valid for at least another day.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with _directory_lock(directory):
        material = _material_in(directory)
        if _is_reusable(material, hostnames):
            return material
        return generate_tls_material(directory, hostnames)


def prepare_server_tls(
    directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES
) -> tuple[TlsMaterial, ssl.SSLContext]:
    """Load or generate the material and build the server context under one lock.

    Holding the lock while the context reads the files keeps another process from
    swapping the set between the check and the load.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with _directory_lock(directory):
        material = _material_in(directory)
        if not _is_reusable(material, hostnames):
            material = generate_tls_material(directory, hostnames)
        return material, server_ssl_context(material)


def server_ssl_context(material: TlsMaterial) -> ssl.SSLContext:
    """A server-side context that offers only HTTP/1.1 over TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(material.cert_file), keyfile=str(material.key_file))
    # Without ALPN an HTTP/2-capable client could try h2, which the simulator does not speak.
    context.set_alpn_protocols(["http/1.1"])
    return context


def client_ssl_context(material: TlsMaterial) -> ssl.SSLContext:
    """A client-side context that trusts only the simulator's CA."""
    return ssl.create_default_context(cafile=str(material.ca_file))


def _material_in(directory: Path) -> TlsMaterial:
    return TlsMaterial(
        ca_file=directory / CA_FILE,
        cert_file=directory / SERVER_CERT_FILE,
        key_file=directory / SERVER_KEY_FILE,
    )


def _general_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _is_reusable(material: TlsMaterial, hostnames: Sequence[str]) -> bool:
    try:
        ca_cert = x509.load_pem_x509_certificate(material.ca_file.read_bytes())
        server_cert = x509.load_pem_x509_certificate(material.cert_file.read_bytes())
        server_key = serialization.load_pem_private_key(
            material.key_file.read_bytes(), password=None
        )
        server_cert.verify_directly_issued_by(ca_cert)
        san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if server_key.public_key() != server_cert.public_key():
        return False
    if not set(_general_names(hostnames)) <= set(san):
        return False
    deadline = dt.datetime.now(dt.UTC) + MIN_REMAINING_VALIDITY
    now = dt.datetime.now(dt.UTC)
    return all(
        cert.not_valid_before_utc <= now and cert.not_valid_after_utc >= deadline
        for cert in (ca_cert, server_cert)
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write_atomically(path: Path, data: bytes, *, private: bool = False) -> None:
    # A reader (another simulator, a client loading the CA) must never see half a file.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates 0600 files; only the key should stay that private.
        tmp.chmod(0o600 if private else 0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with (directory / _LOCK_FILE).open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
