"""The cluster's array limits: reading qconf -sconf, caching it, splitting requests into jobs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sheepdog.errors import RemoteCommandError
from sheepdog.remote import CommandResult, Remote
from sheepdog.scheduler.gridengine import (
    DEFAULT_ARRAY_LIMITS,
    ArrayLimits,
    GridEngine,
    parse_global_config,
)
from sheepdog.sizing import job_sizes

#: The relevant part of ``qconf -sconf`` on the Docker cluster (Debian's gridengine 8.1.9).
SCONF = """\
#global:
execd_spool_dir              /var/spool/gridengine/execd
mailer                       /usr/bin/mail
max_unheard                  00:05:00
max_aj_instances             2000
max_aj_tasks                 75000
max_u_jobs                   0
max_jobs                     0
"""


def test_qconf_sconf_gives_both_limits() -> None:
    limits = parse_global_config(SCONF)
    assert limits == ArrayLimits(max_tasks=75_000, max_instances=2_000)
    assert limits.per_job == 2_000


def test_zero_means_no_limit() -> None:
    text = SCONF.replace("max_aj_tasks                 75000", "max_aj_tasks 0")
    assert parse_global_config(text).per_job == 2_000
    assert ArrayLimits(max_tasks=0, max_instances=0).per_job == 0
    assert ArrayLimits(max_tasks=3, max_instances=0).per_job == 3


def test_an_answer_without_the_keys_says_what_did_not_match() -> None:
    with pytest.raises(ValueError, match="max_aj_tasks") as info:
        parse_global_config("max_aj_instances 2000\nmax_aj_tasks lots\n")
    assert "max_aj_instances" not in str(info.value).split("for ", 1)[1].split(":")[0]
    assert "max_aj_tasks lots" in str(info.value)


class ScriptedRemote(Remote):
    """A head node whose commands answer from a script, counted."""

    def __init__(self, status: int, stdout: str) -> None:
        super().__init__("headnode")
        self.status, self.stdout = status, stdout
        self.commands: list[str] = []

    def run(self, command: str, **kwargs: Any) -> CommandResult:
        self.commands.append(command)
        result = CommandResult(command, self.status, self.stdout, "qconf: denied")
        if self.status != 0:
            raise RemoteCommandError(command, self.status, self.stdout, "qconf: denied")
        return result


def test_the_limits_are_read_once_per_connection() -> None:
    head = ScriptedRemote(0, SCONF)
    scheduler = GridEngine(head)
    assert scheduler.array_limits().max_tasks == 75_000
    assert scheduler.array_limits().max_instances == 2_000
    assert head.commands == ["qconf -sconf"]


def test_a_failed_qconf_warns_with_its_answer_and_assumes_the_defaults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    head = ScriptedRemote(1, "")
    scheduler = GridEngine(head)
    assert scheduler.array_limits() == DEFAULT_ARRAY_LIMITS
    assert "qconf -sconf" in caplog.text and "denied" in caplog.text
    assert scheduler.array_limits() == DEFAULT_ARRAY_LIMITS
    assert head.commands == ["qconf -sconf"]  # asked once


def test_an_unreadable_answer_warns_saying_what_did_not_match(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert GridEngine(ScriptedRemote(0, "nothing useful\n")).array_limits() == DEFAULT_ARRAY_LIMITS
    assert "max_aj_tasks" in caplog.text and "nothing useful" in caplog.text


@given(st.integers(1, 100_000), st.integers(0, 5_000))
def test_jobs_hold_every_worker_within_the_limit(n_workers: int, per_job: int) -> None:
    sizes = job_sizes(n_workers, per_job)
    assert sum(sizes) == n_workers
    assert all(size >= 1 for size in sizes)
    if per_job:
        assert all(size <= per_job for size in sizes)
        assert len(sizes) == -(-n_workers // per_job)  # as few jobs as the limit allows
    else:
        assert sizes == [n_workers]


def test_a_request_within_the_limit_is_one_job() -> None:
    assert job_sizes(5, 2) == [2, 2, 1]
    assert job_sizes(4, 4) == [4]
