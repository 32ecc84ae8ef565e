"""Sheepdog 0.2's ``Deployer``: an SSH connection to a Grid Engine head node.

Kept so that old code which builds one still works, ``deploy`` and ``submit``
included. sheepdog itself submits through its scheduler
(:mod:`sheepdog.scheduler`): a :class:`~sheepdog.scheduler.GridEngine` over a
:class:`~sheepdog.remote.Remote`.
"""

from __future__ import annotations

import shlex
from typing import Any

from .errors import SubmitError
from .job_file import JOB_FILE_MODE, put_stub
from .remote import CommandResult, Remote
from .scheduler.gridengine import SGE_ENV_PREAMBLE

__all__ = ["CommandResult", "Deployer"]


class Deployer(Remote):
    """``Deployer(host, port, user, keyfile=None)``: a :class:`Remote` set up for Grid Engine.

    Its commands run with Grid Engine's environment (``qsub`` on PATH).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("preamble", SGE_ENV_PREAMBLE)
        super().__init__(*args, **kwargs)

    def _get_jobfile_path(self, request_id: int, directory: str) -> str:
        """Where 0.2.3 put a request's job file: ``directory/sheepdog_<id>.py``."""
        return f"{self.absolute(directory)}/sheepdog_{request_id:03d}.py"

    def deploy(self, jobfile: str, request_id: int, directory: str) -> None:
        """Copy the text ``jobfile`` to ``directory/sheepdog_<id>.py`` on the head node, as 0.2.3.

        ``directory`` (relative to the home directory unless absolute) is made
        if needed, mode 0700; the file is written over SFTP, readable by you alone.
        The worker stub that job files run goes beside it (once per version, see
        :func:`~sheepdog.job_file.put_stub`): render ``jobfile`` with its key file in
        ``directory`` too.
        """
        name = self._get_jobfile_path(request_id, directory).rsplit("/", 1)[1]
        put_stub(self, directory)
        self.put(directory, [(name, jobfile, JOB_FILE_MODE)])

    def submit(self, request_id: int, directory: str) -> str:
        """``qsub`` the job file that :meth:`deploy` copied; return qsub's output.

        Raises :class:`~sheepdog.errors.SubmitError` with qsub's exit status and
        messages when it refuses the job (0.2.3 returned its empty output).
        """
        path = self._get_jobfile_path(request_id, directory)
        return self.run(f"qsub {shlex.quote(path)}", error=SubmitError).stdout
