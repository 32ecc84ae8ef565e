"""Unit tests of ``sheepdog doctor``: its report, its probe job run here, and its verdicts.

The probe job's file is run on this machine, under this Python, against a real sheepdog
server, a port where nothing listens and an HTTP server that is not sheepdog's. The end-to-end
tests (tests/e2e/test_doctor_e2e.py) run it on real clusters.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import sheepdog
from sheepdog import cli
from sheepdog.doctor import (
    FAIL,
    OK,
    SKIPPED,
    WARN,
    Check,
    Report,
    _Doctor,
    probe_job_file,
    render_check,
)
from sheepdog.scheduler import GridEngine, Slurm
from sheepdog.server import Server


def test_a_check_is_folded_to_80_columns_with_its_fix_below() -> None:
    check = Check("direct", FAIL, "exec1: cannot connect to laptop.example.org:35911: "
                  "timeout: timed out " * 3, "use connect='tunnel' (or 'auto') from here")
    render = render_check(check)
    lines = render.splitlines()
    assert lines[0].startswith("FAIL  direct         exec1: cannot connect")
    assert all(len(line) <= 80 for line in lines), render
    assert lines[-1].strip().startswith("fix: use connect='tunnel'"), render


def test_the_report_is_ok_only_without_a_blocker() -> None:
    report = Report("headnode", [Check("SSH login", OK, "fine"), Check("direct", WARN, "no")])
    assert report.ok and report.summary().endswith("ready, no blockers")
    report.checks.append(Check("tunnel", FAIL, "refused"))
    assert not report.ok and [c.name for c in report.blockers] == ["tunnel"]
    assert "1 blocker" in report.summary() and report.render().endswith(report.summary())


@pytest.fixture
def not_sheepdog() -> Iterator[int]:
    """An HTTP server on a loopback port that answers every GET with 404."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("prologue", [None, ["X=1", "export X"]])
def test_the_probe_job_reports_its_python_and_what_it_reaches(
    tmp_path: Path, not_sheepdog: int, closed_port: int, prologue: list[str] | None
) -> None:
    config = sheepdog.Config(host="headnode", shell=sys.executable, prologue=prologue)
    out = tmp_path / "answer.json"
    with Server(None, None, str(tmp_path / "db.sqlite"), host="127.0.0.1") as server:
        targets = [("direct", f"127.0.0.1:{server.port}"), ("tunnel", f"127.0.0.1:{closed_port}"),
                   ("other", f"127.0.0.1:{not_sheepdog}")]
        text = probe_job_file(config, GridEngine, str(out), targets, timeout_s=5)
        job = tmp_path / "probe.py"
        job.write_text(text)
        # As the scheduler starts it: by its #! line, or sh when a prologue runs first.
        command = ["sh", str(job)] if prologue else [sys.executable, str(job)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(out.read_text())
    assert found["version"] == list(sys.version_info[:3])
    assert found["node"] == socket.gethostname()
    assert found["reach"]["direct"] == {"ok": True,
                                        "said": f"127.0.0.1:{server.port} answered"}
    assert not found["reach"]["tunnel"]["ok"]
    assert "cannot connect to" in found["reach"]["tunnel"]["said"]
    assert "ConnectionRefusedError" in found["reach"]["tunnel"]["said"]
    assert not found["reach"]["other"]["ok"]
    assert "not as sheepdog's server" in found["reach"]["other"]["said"]
    assert not (tmp_path / "answer.json.part").exists()


def test_the_probe_job_carries_the_configs_options() -> None:
    config = sheepdog.Config(host="headnode", scheduler="slurm", mem_gb=2, prologue=["true"])
    text = probe_job_file(config, Slurm, "/home/u/.sheepdog/x.json", [("direct", "a:1")])
    assert text.startswith("#!/bin/sh\n#SBATCH --array=1-1")
    assert "#SBATCH --mem=2G" in text or "#SBATCH --mem=2048M" in text, text
    assert "probe('/home/u/.sheepdog/x.json', [['direct', 'a:1']], 5.0)" in text


def test_a_local_scheduler_checks_its_shell_before_the_probe_job() -> None:
    report = sheepdog.doctor({"scheduler": "local", "shell": "/usr/bin/python9"})
    assert report.target == "localhost"
    assert [(c.name, c.status) for c in report.blockers] == [("shell", "FAIL")]
    assert "/usr/bin/python9" in report.blockers[0].detail
    assert [c.status for c in report.checks[-3:]] == ["skip"] * 3


def test_a_head_node_that_refuses_the_connection_is_a_blocker(
    closed_port: int, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"host": "127.0.0.1", "ssh_port": closed_port,
                                "ssh_timeout_s": 5}))
    assert cli.main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  SSH login" in out and "Check host and ssh_port" in " ".join(out.split()), out
    assert "skip  scheduler" in out and "needs the SSH login" in out, out
    assert out.splitlines()[-1].endswith("fix and run it again"), out


def test_doctor_without_a_config_says_what_to_give(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.main(["doctor"])
    assert exited.value.code == 1
    assert "sheepdog doctor cluster.json" in capsys.readouterr().err


def test_doctor_without_a_config_reads_cluster_json_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    closed_port: int,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cluster.json").write_text(json.dumps(
        {"host": "127.0.0.1", "ssh_port": closed_port, "ssh_timeout_s": 5}))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("sheepdog doctor: checking 127.0.0.1") and "FAIL  SSH login" in out


def _verdicts(config: dict[str, Any], found: dict[str, Any]) -> dict[str, Check]:
    checks: list[Check] = []
    run = _Doctor(sheepdog.Config.from_mapping(dict(config, host="headnode")), 1, checks.append)
    run.server = SimpleNamespace(port=4242)  # type: ignore[assignment]
    run.scheduler = SimpleNamespace(host=None)  # type: ignore[assignment]
    run.check_python(found)
    run.check_connect(found, ("head", 5000), "")
    return {check.name: check for check in checks}


def _found(version: list[int], direct: bool, tunnel: bool) -> dict[str, Any]:
    return {"version": version, "python": ".".join(map(str, version)),
            "implementation": sys.implementation.name, "executable": "/usr/bin/python3",
            "node": "exec1", "reach": {"direct": {"ok": direct, "said": "d"},
                                       "tunnel": {"ok": tunnel, "said": "t"}}}


OURS = list(sys.version_info[:3])
OTHER_MINOR = [3, 6 if sys.version_info[1] != 6 else 7, 0]


@pytest.mark.parametrize(
    ("config", "version", "expected"),
    [
        ({}, OURS, OK),
        ({}, [2, 7, 18], FAIL),
        ({"mode": "bytecode"}, OTHER_MINOR, FAIL),
        ({"mode": "source"}, OTHER_MINOR, OK),
    ],
)
def test_the_workers_python_against_ours(
    config: dict[str, Any], version: list[int], expected: str
) -> None:
    check = _verdicts(dict(config, connect="direct"), _found(version, True, True))["worker Python"]
    assert check.status == expected, check
    if expected == FAIL and version[0] == 3:
        assert "mode='source'" in check.fix


@pytest.mark.parametrize(
    ("connect", "direct", "tunnel", "direct_status", "tunnel_status", "verdict", "fix"),
    [
        ("direct", True, False, OK, WARN, OK, ""),
        ("direct", False, True, FAIL, OK, FAIL, "set connect='tunnel', which works here"),
        ("tunnel", False, True, WARN, OK, OK, ""),
        ("tunnel", True, False, OK, FAIL, FAIL, "set connect='direct', which works here"),
        ("tunnel", False, False, WARN, FAIL, FAIL, "see the direct and tunnel checks above"),
    ],
)
def test_the_connect_verdict(
    connect: str, direct: bool, tunnel: bool, direct_status: str, tunnel_status: str,
    verdict: str, fix: str,
) -> None:
    checks = _verdicts({"connect": connect}, _found(OURS, direct, tunnel))
    assert (checks["direct"].status, checks["tunnel"].status) == (direct_status, tunnel_status)
    assert checks["connect"].status == verdict and checks["connect"].fix == fix, checks["connect"]


def test_a_relay_that_did_not_start_says_why() -> None:
    checks: list[Check] = []
    run = _Doctor(sheepdog.Config(host="headnode", connect="tunnel"), 1, checks.append)
    run.server = SimpleNamespace(port=4242)  # type: ignore[assignment]
    run.scheduler = SimpleNamespace(host=None)  # type: ignore[assignment]
    run.check_connect(_found(OURS, True, False), None, "sshd says AllowTcpForwarding no")
    tunnel = next(c for c in checks if c.name == "tunnel")
    assert tunnel.status == FAIL and "AllowTcpForwarding" in tunnel.detail
    assert SKIPPED not in {c.status for c in checks}
