"""``sheepdog doctor`` on real clusters: the right verdict on an ordinary one and a firewalled one.

On the ordinary cluster (whichever --cluster runs: Docker Grid Engine, the native cell, Slurm)
the execution nodes reach this machine, so every check passes and ``auto`` picks direct. On the
firewalled cluster (``firewalled_cluster``: no node has a route to this machine) direct fails,
the tunnel works, and ``auto`` picks the tunnel; a config that insists on ``direct`` is a
blocker whose fix names the tunnel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import REPO, ssh_connect
from cluster_fixture import run as run_on_head

import sheepdog
from sheepdog.doctor import FAIL, OK, WARN, Report

pytestmark = pytest.mark.e2e

WAIT_S = 300.0


def _statuses(report: Report) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


def _detail(report: Report, name: str) -> str:
    return next(check.detail + " | fix: " + check.fix
                for check in report.checks if check.name == name)


def _leftovers(cluster: dict[str, Any]) -> str:
    """The probe job's files still in ssh_dir, and jobs of it still queued."""
    client = ssh_connect(cluster)
    try:
        _, files, _ = run_on_head(client, "ls -a ~/.sheepdog 2>/dev/null | grep sheepdog_doctor_"
                                  " || true")
    finally:
        client.close()
    return files.strip()


def _run_cli(tmp_path: Path, cfg: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "sheepdog", "doctor", str(path), "--timeout", str(WAIT_S)],
        capture_output=True, text=True, env=env, timeout=WAIT_S + 120, check=False,
    )


def test_doctor_passes_everything_on_the_ordinary_cluster(config: dict[str, Any]) -> None:
    report = sheepdog.doctor(dict(config, connect="auto"), timeout_s=WAIT_S)
    assert report.ok, report.render()
    assert _statuses(report) == {
        "SSH login": OK, "scheduler": OK, "shell": OK, "probe job": OK, "worker Python": OK,
        "direct": OK, "tunnel": OK, "connect": OK,
    }, report.render()
    assert "'auto' picks direct" in _detail(report, "connect"), report.render()
    assert f"{config['ssh_user']}@" in _detail(report, "SSH login")
    assert "host key" in _detail(report, "SSH login") and "SHA256:" in _detail(report, "SSH login")
    # The probe job's files and its server are gone; the config's database was never made.
    assert _leftovers(config) == ""
    assert not os.path.exists(config["dbfile"])


def test_the_doctor_command_on_the_ordinary_cluster(config: dict[str, Any], tmp_path: Path) -> None:
    done = _run_cli(tmp_path, config)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].endswith("ready, no blockers"), done.stdout
    assert all(len(line) <= 80 for line in lines), done.stdout
    assert any(line.startswith("ok    worker Python") for line in lines), done.stdout


def test_doctor_names_a_host_key_it_cannot_check(config: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    report = sheepdog.doctor(dict(config, known_hosts=str(empty)), timeout_s=WAIT_S)
    assert not report.ok
    assert _statuses(report)["SSH login"] == FAIL
    assert "ssh-keyscan" in _detail(report, "SSH login"), report.render()
    assert {s for name, s in _statuses(report).items() if name != "SSH login"} == {"skip"}


@pytest.mark.firewalled
def test_doctor_on_the_firewalled_cluster_picks_the_tunnel(walled: dict[str, Any]) -> None:
    report = sheepdog.doctor(dict(walled, connect="auto"), timeout_s=WAIT_S)
    assert report.ok, report.render()
    statuses = _statuses(report)
    assert statuses["direct"] == WARN, report.render()
    assert "cannot connect to host.docker.internal" in _detail(report, "direct"), report.render()
    assert statuses["tunnel"] == OK and statuses["connect"] == OK, report.render()
    assert "'auto' picks the tunnel" in _detail(report, "connect"), report.render()
    assert _leftovers(walled) == ""


@pytest.mark.firewalled
def test_doctor_blocks_direct_on_the_firewalled_cluster(
    walled: dict[str, Any], tmp_path: Path
) -> None:
    done = _run_cli(tmp_path, dict(walled, connect="direct"))
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "FAIL  direct" in out and "FAIL  connect" in out, out
    assert "fix: set connect='tunnel', which works here" in " ".join(out.split()), out
    assert out.splitlines()[-1].endswith("fix and run it again"), out


def test_doctor_says_why_a_probe_job_with_a_wrong_shell_gave_no_answer(
    config: dict[str, Any],
) -> None:
    report = sheepdog.doctor(dict(config, shell="/nonexistent/python3"), timeout_s=WAIT_S)
    assert not report.ok
    statuses = _statuses(report)
    # The head node has no such file either: a warning that names shell and the path.
    assert statuses["shell"] == WARN, report.render()
    assert "shell is /nonexistent/python3" in _detail(report, "shell"), report.render()
    assert statuses["probe job"] == FAIL, report.render()
    assert "/nonexistent/python3" in _detail(report, "probe job"), report.render()
    assert "check the config's shell" in _detail(report, "probe job"), report.render()
    assert {statuses[name] for name in ("worker Python", "direct", "tunnel", "connect")} == {
        "skip"}, report.render()
    assert _leftovers(config) == ""


@pytest.mark.firewalled
def test_doctor_names_the_sshd_setting_when_forwarding_is_refused(
    walled: dict[str, Any], no_forwarding: None
) -> None:
    report = sheepdog.doctor(dict(walled, connect="auto"), timeout_s=WAIT_S)
    assert not report.ok
    statuses = _statuses(report)
    assert statuses["probe job"] == OK and statuses["direct"] == WARN, report.render()
    assert statuses["tunnel"] == WARN, report.render()
    assert "AllowTcpForwarding" in _detail(report, "tunnel"), report.render()
    # auto would pick the tunnel (the head node cannot reach us), which cannot start here.
    assert statuses["connect"] == FAIL, report.render()
    assert "'auto' picks the tunnel" in _detail(report, "connect"), report.render()
