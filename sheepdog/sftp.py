"""The head node's files over SFTP: put a job's files, read, list, delete and rename them.

Part of :class:`~sheepdog.remote.Remote`, on its paramiko connection; a Remote whose work
moved to OpenSSH (``ssh_client="auto"``) passes each call on to that one.
"""

from __future__ import annotations

import shlex
import stat
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import paramiko

from .errors import FileTooLargeError, NotARegularFileError, SSHError

if TYPE_CHECKING:
    from .remote import CommandResult, Remote

__all__ = ["SFTPFiles"]


class SFTPFiles:
    """Files on the head node over the connection's SFTP (a part of Remote)."""

    if TYPE_CHECKING:  # what Remote gives this part
        host: str

        def connect(self) -> paramiko.SSHClient: ...
        def openssh(self) -> Remote | None: ...
        def absolute(self, directory: str) -> str: ...
        def run(self, command: str) -> CommandResult: ...

    def put(self, directory: str, files: Sequence[tuple[str, str, int]]) -> None:
        """Make ``directory`` (mode 0700) and write each ``(name, text, mode)`` file into it.

        Each file gets its mode before anything is written to it, and goes over SFTP,
        never on a command line (a key file holds a secret).
        """
        if (other := self.openssh()) is not None:
            return other.put(directory, files)
        absdir = self.absolute(directory)
        self.run(f"mkdir -p -m 700 {shlex.quote(absdir)} && chmod 700 {shlex.quote(absdir)}")
        client = self.connect()
        target = absdir
        try:
            with client.open_sftp() as sftp:
                for name, text, mode in files:
                    target = f"{absdir}/{name}"
                    with sftp.open(target, "w") as fh:
                        sftp.chmod(target, mode)
                        fh.write(text.encode("utf-8"))
        except (OSError, paramiko.SSHException) as exc:
            raise SSHError(f"cannot write job file {target} on {self.host}: {exc}") from exc

    # --- files (the workers' spool; see sheepdog/spool.py) -------------------------

    def _sftp(self, what: str, action: Callable[[paramiko.SFTPClient], Any]) -> Any:
        client = self.connect()
        try:
            with client.open_sftp() as sftp:
                return action(sftp)
        except FileNotFoundError:
            raise
        except (OSError, paramiko.SSHException) as exc:
            raise SSHError(f"cannot {what} on {self.host}: {exc}", host=self.host) from exc

    def list_dir(self, directory: str) -> list[str] | None:
        """The names in an absolute ``directory``, or None if it does not exist."""
        if (other := self.openssh()) is not None:
            return other.list_dir(directory)
        try:
            names: list[str] = self._sftp(f"list {directory}", lambda s: s.listdir(directory))
        except FileNotFoundError:
            return None
        return names

    def read_bytes(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of the file at an absolute ``path`` (see ``Host.read_bytes``)."""
        if (other := self.openssh()) is not None:
            return other.read_bytes(path, max_bytes)

        def read(sftp: paramiko.SFTPClient) -> bytes:
            if max_bytes is not None:
                info = sftp.lstat(path)  # a link is not followed
                if not stat.S_ISREG(info.st_mode or 0):
                    raise NotARegularFileError(f"{path} is not a regular file")
                if (info.st_size or 0) > max_bytes:
                    raise FileTooLargeError(
                        f"{path} holds {info.st_size} bytes, more than {max_bytes}")
            with sftp.open(path, "rb") as fh:
                if max_bytes is None:
                    fh.prefetch()
                    return bytes(fh.read())
                data = bytes(fh.read(max_bytes + 1))
            if len(data) > max_bytes:
                raise FileTooLargeError(f"{path} holds more than {max_bytes} bytes")
            return data

        data: bytes = self._sftp(f"read {path}", read)
        return data

    def remove(self, path: str) -> None:
        """Delete the file at an absolute ``path``; one already gone is fine."""
        if (other := self.openssh()) is not None:
            return other.remove(path)
        try:
            self._sftp(f"delete {path}", lambda s: s.remove(path))
        except FileNotFoundError:
            pass

    def rename(self, source: str, target: str) -> None:
        """Rename a file (absolute paths, one file system)."""
        if (other := self.openssh()) is not None:
            return other.rename(source, target)
        self._sftp(f"rename {source}", lambda s: s.posix_rename(source, target))
