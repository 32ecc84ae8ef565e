"""The lease state machine: lease, renew, complete, expire, cancel, fail and rerun tasks.

A task is ``pending`` until a worker leases it (``leased``, with a token and an
expiry), then ``done`` or ``error`` when its result comes, or ``cancelled``.
A lease that is not renewed in time returns its task to ``pending``, and after
``max_attempts`` makes it ``error`` (kind ``lost``). The ``*_in`` methods run
inside the caller's write transaction, so that the server carries out a signed
call's effect and records its answer together (:meth:`Queue.answer_once`).

:class:`Queue` is these transitions together, one concern a module:
:mod:`.leases` (lease, renew, expire), :mod:`.completion` (results, and a result
with the next lease), :mod:`.nonces` (a signed call's effect once per nonce) and
:mod:`.interventions` (cancel, fail, rerun).
"""

from __future__ import annotations

from .completion import Completion
from .interventions import LOST_KINDS, RERUN_CHOICES, Interventions
from .leases import RENEW_SQL, RUN_SQL, Lease, lease_token, run_of_token
from .nonces import NONCE_PRUNE_EVERY_S, NonceReusedError, Nonces

__all__ = [
    "LOST_KINDS",
    "NONCE_PRUNE_EVERY_S",
    "RENEW_SQL",
    "RERUN_CHOICES",
    "RUN_SQL",
    "Lease",
    "NonceReusedError",
    "Queue",
    "lease_token",
    "run_of_token",
]


class Queue(Completion, Nonces, Interventions):
    """The task queue's transitions, each in one write transaction."""
