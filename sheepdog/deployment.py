"""Sheepdog 0.2's ``Deployer``: an SSH connection to a Grid Engine head node.

Kept so that old code which builds one still works. Submitting is the
scheduler's business now (:mod:`sheepdog.scheduler`): a
:class:`~sheepdog.scheduler.GridEngine` over a :class:`~sheepdog.remote.Remote`.
"""

from __future__ import annotations

from typing import Any

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
