"""The server's self-signed TLS certificate, kept next to the database and pinned by job files.

With ``tls=True`` the server serves HTTPS with a certificate generated here on
first use and reused afterwards (``<dbfile>.tls/cert.pem`` and ``key.pem``,
mode 0600 in a 0700 directory). No certificate authority is involved: every
job file carries the certificate's SHA-256 fingerprint and the worker stub
refuses any other certificate, so a man in the middle cannot present its own.

A certificate is renewed (near its expiry, or when its key does not match it)
only while no server uses it: a server holds a shared lock on
``<dbfile>.tls/lock`` for as long as it runs (:func:`hold_while_serving`), and
renewal needs the exclusive lock, so job files already out keep matching the
server they call. Two processes never generate at once.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import logging
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from ..errors import ServerError

__all__ = ["TlsFiles", "certificate_for", "fingerprint_sha256", "hold_while_serving", "tls_dir"]

logger = logging.getLogger(__name__)

#: Generated certificates are valid this long; an expired one is replaced on next use.
VALIDITY_DAYS = 3650
#: A certificate within this many days of expiry is replaced rather than reused.
RENEW_DAYS = 7
#: Bound on waiting for another process that is writing the certificate.
LOCK_WAIT_S = 30.0
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_LOCK_NAME = "lock"


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


def _matching_pair(certfile: Path, keyfile: Path) -> Any | None:
    """The certificate if both files exist, parse and belong together; else None."""
    if not (certfile.is_file() and keyfile.is_file()):
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(certfile.read_bytes())
        key = serialization.load_pem_private_key(keyfile.read_bytes(), password=None)
    except (ValueError, TypeError):
        logger.warning("the TLS certificate or key in %s cannot be read", certfile.parent)
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        logger.warning("the TLS key in %s does not match its certificate", certfile.parent)
        return None
    return cert


def _fresh(cert: Any, certfile: Path) -> bool:
    expires = cert.not_valid_after_utc
    now = datetime.datetime.now(datetime.timezone.utc)
    if expires - now < datetime.timedelta(days=RENEW_DAYS):
        logger.info("the TLS certificate %s expires %s: it is due for renewal", certfile, expires)
        return False
    return True


def _lock(folder: Path, exclusive: bool) -> int:
    """Open ``folder/lock`` and flock it; an exclusive lock is only tried, never waited for.

    Returns the descriptor (closing it releases the lock), or -1 when the exclusive
    lock is held elsewhere. A shared lock is waited for up to LOCK_WAIT_S: only a
    process writing the certificate holds the exclusive one, briefly.
    """
    fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        if exclusive:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
                return -1
        deadline, said = time.monotonic() + LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"another process has been writing the TLS certificate in {folder} for "
                        f"more than {LOCK_WAIT_S:g} s; if none is running, remove {folder}"
                    ) from None
                if not said:
                    logger.debug("waits for another process writing the certificate in %s",
                                 folder)
                    said = True
                time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def hold_while_serving(certfile: str | os.PathLike[str]) -> int | None:
    """Take the shared lock that keeps a certificate from being renewed; return its descriptor.

    A server passes the descriptor to its process, which holds the lock while it
    runs. Returns None for a certificate that :func:`certificate_for` did not make
    (no lock file beside it): nothing renews those.
    """
    folder = Path(certfile).parent
    if not (folder / _LOCK_NAME).is_file():
        return None
    return _lock(folder, exclusive=False)


def certificate_for(dbfile: str | os.PathLike[str], common_name: str | None = None) -> TlsFiles:
    """Return the server certificate for ``dbfile``, generating it on first use.

    The files are reused across runs, so job files of earlier runs keep
    matching; the directory is made 0700 and both files 0600 every time,
    because the key in a group-readable file would let others impersonate
    the server. A certificate due for renewal is renewed only when no server
    uses it (see the module's docstring); until then it is reused, which is
    safe because job files pin it by fingerprint, not by date.
    """
    folder = tls_dir(dbfile)
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    try:
        folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(folder, _DIR_MODE)
        fd = _lock(folder, exclusive=True)
        exclusive = fd >= 0
        if not exclusive:  # a server serves it, or another process is writing it
            fd = _lock(folder, exclusive=False)
        try:
            cert = _matching_pair(certfile, keyfile)
            if cert is not None and not exclusive:
                if not _fresh(cert, certfile):
                    logger.info("a server uses %s: it is renewed once none does", certfile)
            elif cert is None and not exclusive:
                raise ServerError(
                    f"the TLS certificate in {folder} is missing or does not match its key, "
                    "and a server that uses it is running; stop that server (sheepdog serve, "
                    "or the process that ran map) and try again"
                )
            elif cert is None or not _fresh(cert, certfile):
                cert_pem, key_pem = _generate(common_name or socket.getfqdn())
                # The key first; a crash between the two leaves a pair that does not match,
                # which the check above finds and replaces.
                _write_private(keyfile, key_pem)
                _write_private(certfile, cert_pem)
                logger.info("generated a self-signed TLS certificate in %s", folder)
            for path in (certfile, keyfile):
                os.chmod(path, _FILE_MODE)
            fingerprint = fingerprint_sha256(certfile.read_text(encoding="ascii"))
        finally:
            os.close(fd)
    except OSError as exc:
        raise ServerError(
            f"cannot create or read the TLS certificate in {folder}: {exc}; check that the "
            "directory beside the database is writable by you"
        ) from exc
    return TlsFiles(certfile, keyfile, fingerprint)
