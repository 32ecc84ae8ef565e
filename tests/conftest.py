"""Shared pytest set-up: the ``--cluster`` options and which tests each choice runs.

The ``cluster`` fixture itself, and the cluster it starts or finds, are in tests/e2e/
(``conftest.py`` and ``cluster_fixture.py``), so a unit run never imports them. Its options are
here: pytest takes command-line options only from the conftest files it loads at start-up,
and ``pytest tests`` loads this one, not tests/e2e's.

``--cluster=docker`` (default) starts a head node and two execution nodes with testcontainers;
``--cluster=native`` brings up the cluster on this host (``ci/cluster up --native``);
``--cluster=ssh://user@host:port`` uses an existing cluster (see ``--cluster-keyfile`` and friends);
``--cluster=slurm`` starts a Slurm controller and two compute nodes with testcontainers.

The end-to-end suite runs on either scheduler. Tests marked ``gridengine("why")`` test something
only Grid Engine has and run on every cluster but Slurm; tests marked ``slurm`` need the Slurm
cluster and run only there. The others are deselected (not skipped: CI fails on any skip).
Tests marked ``firewalled`` start a second Docker cluster whose nodes cannot reach this machine
(``firewalled_cluster``); they run with ``--cluster=docker`` and are deselected otherwise.
Tests marked ``native`` check this host's own Grid Engine cell; they run only with
``--cluster=native``.
Tests marked ``containers`` reconfigure a node of a Docker or Slurm test cluster (the login
node's sshd); they run only with ``--cluster=docker`` or ``--cluster=slurm``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sheepdog cluster")
    group.addoption(
        "--cluster",
        default=os.environ.get("SHEEPDOG_TEST_CLUSTER", "docker"),
        help="cluster for the e2e tests: docker (default), native or ssh://user@host:port "
        "(Grid Engine), or slurm (all but the gridengine-marked tests) [env SHEEPDOG_TEST_CLUSTER]",
    )
    for name, env, text in [
        ("keyfile", "SHEEPDOG_TEST_KEYFILE", "private key for ssh:// clusters"),
        ("known-hosts", "SHEEPDOG_TEST_KNOWN_HOSTS", "known_hosts file for ssh:// clusters"),
        ("localhost", "SHEEPDOG_TEST_LOCALHOST", "name by which workers reach this machine"),
        ("shell", "SHEEPDOG_TEST_SHELL", "the workers' Python (default /usr/bin/python3)"),
    ]:
        group.addoption(
            f"--cluster-{name}", default=os.environ.get(env), help=f"{text} [env {env}]"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the tests that apply to the chosen cluster's scheduler; deselect the others.

    ``gridengine``-marked tests run on every cluster but Slurm, ``slurm``-marked ones only on
    Slurm. A ``gridengine`` marker must say why the test is Grid Engine's alone.
    """
    choice = config.getoption("--cluster")
    on_slurm = choice == "slurm"
    keep, drop = [], []
    for item in items:
        only_ge = item.get_closest_marker("gridengine")
        only_slurm = item.get_closest_marker("slurm") is not None
        if only_ge is not None and not (only_ge.args or only_ge.kwargs.get("reason")):
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.gridengine needs a reason, as in "
                '@pytest.mark.gridengine("qmod: Slurm has no such command")'
            )
        if only_ge is not None and only_slurm:
            raise pytest.UsageError(f"{item.nodeid} is marked both gridengine and slurm")
        if only_slurm:
            wanted = on_slurm
        elif only_ge is not None:
            wanted = not on_slurm
        else:
            wanted = True
        if item.get_closest_marker("firewalled") is not None and choice != "docker":
            wanted = False  # the firewalled cluster is a Docker one of its own, beside docker
        if item.get_closest_marker("native") is not None and choice != "native":
            wanted = False  # a test of this host's own Grid Engine cell
        if item.get_closest_marker("containers") is not None and choice not in (
            "docker", "slurm"
        ):
            wanted = False  # it changes a container's sshd: not this host's, nor yours
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config.stash[_NOT_FOR_THIS_SCHEDULER] = [item.nodeid for item in drop]


_NOT_FOR_THIS_SCHEDULER = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Name the tests deselected for the cluster's scheduler, so none goes unnoticed."""
    dropped = config.stash.get(_NOT_FOR_THIS_SCHEDULER, [])
    if dropped:
        terminalreporter.write_sep(
            "-", f"{len(dropped)} deselected: not for --cluster={config.getoption('--cluster')}"
        )
        for nodeid in dropped:
            terminalreporter.write_line(nodeid)


@pytest.fixture(scope="session")
def original02_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database made by the published Sheepdog 0.2.3 itself (see tests/original02.py).

    Built once per session; copy it before opening it with sheepdog, which migrates it.
    """
    import original02

    path = tmp_path_factory.mktemp("sheepdog-0.2.3") / "sheepdog.sqlite"
    original02.build_original_database(path)
    return path


# Hypothesis: "dev" (fast) by default, "ci" (thorough) where ci/test asks for it.
import strategies  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

strategies.register_profiles()
_hypothesis_settings.load_profile(os.environ.get("SHEEPDOG_HYPOTHESIS_PROFILE", "dev"))
