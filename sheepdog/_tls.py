"""The server's self-signed TLS certificate, kept next to the database and pinned by job files.

With ``tls=True`` the server serves HTTPS with a certificate generated here on
first use and reused afterwards (``<dbfile>.tls/cert.pem`` and ``key.pem``,
mode 0600 in a 0700 directory). No certificate authority is involved: every
job file carries the certificate's SHA-256 fingerprint and the worker stub
refuses any other certificate, so a man in the middle cannot present its own.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import ssl
from pathlib import Path

from .errors import ServerError

__all__ = ["TlsFiles", "certificate_for", "fingerprint_sha256", "tls_dir"]

logger = logging.getLogger(__name__)

#: Generated certificates are valid this long; an expired one is replaced on next use.
VALIDITY_DAYS = 3650
#: A certificate within this many days of expiry is replaced rather than reused.
RENEW_DAYS = 7
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class TlsFiles:
    """Paths of a certificate and its key, and the certificate's pinned fingerprint."""

    def __init__(self, certfile: Path, keyfile: Path, fingerprint: str) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"TlsFiles(certfile={str(self.certfile)!r}, fingerprint={self.fingerprint!r})"


def tls_dir(dbfile: str | os.PathLike[str]) -> Path:
    """The directory that holds the certificate for a database: ``<dbfile>.tls``."""
    return Path(os.path.abspath(os.fspath(dbfile)) + ".tls")


def fingerprint_sha256(cert_pem: str | bytes) -> str:
    """Return the SHA-256 fingerprint of a PEM certificate as 64 lowercase hex characters.

    This is the form the worker stub compares (it also accepts colons and
    upper case).
    """
    text = cert_pem.decode("ascii") if isinstance(cert_pem, bytes) else cert_pem
    try:
        der = ssl.PEM_cert_to_DER_cert(text)
    except ValueError as exc:
        raise ServerError(f"not a PEM certificate: {exc}") from exc
    return hashlib.sha256(der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _generate(common_name: str) -> tuple[bytes, bytes]:
    # Imported here: only TLS users pay for it (cryptography comes with paramiko).
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "sheepdog")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _usable(certfile: Path, keyfile: Path) -> bool:
    if not (certfile.is_file() and keyfile.is_file()):
        return False
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
    except ValueError:
        logger.warning("replacing unreadable TLS certificate %s", certfile)
        return False
    expires = cert.not_valid_after_utc
    now = datetime.datetime.now(datetime.timezone.utc)
    if expires - now < datetime.timedelta(days=RENEW_DAYS):
        logger.info("replacing TLS certificate %s, which expires %s", certfile, expires)
        return False
    return True


def certificate_for(dbfile: str | os.PathLike[str], common_name: str | None = None) -> TlsFiles:
    """Return the server certificate for ``dbfile``, generating it on first use.

    The files are reused across runs, so job files of earlier runs keep
    matching; the directory is made 0700 and both files 0600 every time,
    because the key in a group-readable file would let others impersonate
    the server.
    """
    folder = tls_dir(dbfile)
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    try:
        folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(folder, _DIR_MODE)
        if not _usable(certfile, keyfile):
            cert_pem, key_pem = _generate(common_name or socket.getfqdn())
            # The key first: a cert without its key is never left behind as "usable".
            _write_private(keyfile, key_pem)
            _write_private(certfile, cert_pem)
            logger.info("generated a self-signed TLS certificate in %s", folder)
        for path in (certfile, keyfile):
            os.chmod(path, _FILE_MODE)
        fingerprint = fingerprint_sha256(certfile.read_text(encoding="ascii"))
    except OSError as exc:
        raise ServerError(
            f"cannot create or read the TLS certificate in {folder}: {exc}; check that the "
            "directory beside the database is writable by you"
        ) from exc
    return TlsFiles(certfile, keyfile, fingerprint)
