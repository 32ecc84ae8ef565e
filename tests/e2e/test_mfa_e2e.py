"""A login node that asks for a one-time code after the key: one code for everything.

The login node's sshd requires ``AuthenticationMethods publickey,keyboard-interactive``
with Debian's libpam-google-authenticator (TOTP, RFC 6238), set up at the start of this
module by docker/mfa-setup and undone at its end. The code is typed by
tests/askpass_totp.py (``SSH_ASKPASS`` with ``SSH_ASKPASS_REQUIRE=force``), which
computes it from the test's secret and counts every time it is asked.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import (
    REPO,
    disable_mfa,
    enable_mfa,
    is_slurm,
    login_node,
    logs_in_with_key_only,
    map_in_thread,
)

import sheepdog
from sheepdog import Config
from sheepdog.errors import SSHError
from sheepdog.openssh import LOGIN_HINT, OpenSSHRemote, openssh_of
from sheepdog.poll import poll_until
from sheepdog.scheduler import Scheduler, open_remote
from sheepdog.storage import Storage

# The login node's sshd is made to ask for a code: a container of ours, never this host's.
pytestmark = [pytest.mark.e2e, pytest.mark.containers]

WAIT_S = 300.0
ASKPASS = REPO / "tests" / "askpass_totp.py"


@dataclass
class Mfa:
    """The code-asking cluster: its config file, the askpass environment, the prompt count."""

    config_file: Path
    cluster: dict[str, Any]
    env: dict[str, str]
    count_file: Path

    def prompts(self) -> int:
        """How often the askpass program was asked for a code so far."""
        if not self.count_file.exists():
            return 0
        return len(self.count_file.read_text().splitlines())

    def sheepdog(self, *args: str, env: dict[str, str] | None = None,
                 timeout_s: float = WAIT_S) -> subprocess.CompletedProcess[str]:
        """Run the ``sheepdog`` command in a new process, with the askpass environment."""
        return subprocess.run(
            [sys.executable, "-m", "sheepdog", *args], capture_output=True, text=True,
            env=env or self.env, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False,
        )

    def remote(self) -> OpenSSHRemote:
        remote = openssh_of(open_remote(Config.from_mapping(self.cluster), Scheduler))
        assert remote is not None
        return remote


@pytest.fixture(scope="module")
def mfa(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mfa]:
    """The cluster's login node asks for a TOTP after the key, for this module's tests.

    The masters live in a directory of the module's own (``XDG_RUNTIME_DIR``), so none
    opened before (without a code) is reused; the askpass program is the only one asked.
    """
    work = tmp_path_factory.mktemp("mfa")
    secret = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
    secret_file = work / "totp-secret"
    secret_file.touch(mode=0o600)
    secret_file.write_text(secret + "\n")
    count_file = work / "prompts"
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    env = {
        "XDG_RUNTIME_DIR": str(runtime),
        "SSH_ASKPASS": str(ASKPASS),
        "SSH_ASKPASS_REQUIRE": "force",
        "SHEEPDOG_TEST_TOTP_SECRET_FILE": str(secret_file),
        "SHEEPDOG_TEST_TOTP_COUNT_FILE": str(count_file),
    }
    # The cluster's own config: ssh_client is left at its default, "auto".
    config = {k: v for k, v in cluster.items() if k != "ssh_client"}
    config_file = work / "cluster.json"
    config_file.write_text(json.dumps(dict(config, dbfile=str(work / "sheepdog.sqlite"))))
    enable_mfa(cluster, secret)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert poll_until(lambda: not logs_in_with_key_only(cluster), timeout_s=30,
                              interval_s=0.2), "the login node still lets a key alone in"
            yield Mfa(config_file, config, dict(os.environ), count_file)
            found = Mfa(config_file, config, dict(os.environ), count_file).remote()
            found.logout()
    finally:
        disable_mfa(cluster)
        assert poll_until(lambda: logs_in_with_key_only(cluster), timeout_s=30,
                          interval_s=0.2), "keys alone do not log in again"


@pytest.fixture
def conf(mfa: Mfa, config: dict[str, Any]) -> dict[str, Any]:
    """The code-asking cluster's config (ssh_client at its default) with the test's database."""
    return dict(mfa.cluster, dbfile=config["dbfile"])


def add(a: int, b: int) -> int:
    return a + b


def slow_square(x: int) -> int:
    import time

    time.sleep(1.0)
    return x * x


def tiny(x: int) -> int:
    return x + 1


def test_one_code_for_login_map_attach_tunnel_doctor_serve_and_ten_thousand_tasks(
    mfa: Mfa, conf: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    before = mfa.prompts()
    login = mfa.sheepdog("login", str(mfa.config_file))
    assert login.returncode == 0, login.stderr
    assert "logged in to" in login.stdout and "open until" in login.stdout, login.stdout
    assert mfa.prompts() == before + 1
    config_file = tmp_path / "conf.json"
    config_file.write_text(json.dumps(conf))

    caplog.set_level(logging.INFO, logger="sheepdog.remote")
    # The seed's quickstart; ssh_client="auto" finds the code and moves to OpenSSH.
    assert sheepdog.map(add, [(1, 1), (1, 2), (2, 2)], conf) == [2, 3, 4]
    assert "ssh_client=auto chose openssh" in caplog.text
    # map_async, then attach in a new process.
    rid = sheepdog.map_async(add, [(3, 4), (5, 6)], conf)
    attached = mfa.sheepdog("attach", str(rid), "--config", str(config_file), "--dbfile",
                            conf["dbfile"], "--timeout", str(WAIT_S))
    assert attached.returncode == 0, attached.stdout + attached.stderr
    assert sheepdog.get_results(rid, conf["dbfile"], block=False) == [((3, 4), 7), ((5, 6), 11)]
    # Tunnel mode: the forward and the relay go through the master.
    assert sheepdog.map(add, [(1, 2), (3, 4)], dict(conf, connect="tunnel")) == [3, 7]
    # doctor, in a new process.
    doctor = mfa.sheepdog("doctor", str(config_file))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    said = " ".join(doctor.stdout.split())
    assert "client openssh (ssh_client='auto'), master connection" in said, said
    assert "closes after" in said and "asks for a second factor" in said, said
    # map_async in a process that exits (its server goes with it), then `sheepdog serve` in
    # another. The job is held until serve runs, so that serve has the work to do.
    hold, release = ("--hold", "scontrol release") if is_slurm(conf) else ("-h", "qrls")
    script = tmp_path / "fire_and_forget.py"
    script.write_text("import json, sys, sheepdog\n"
                      "print(sheepdog.map_async(abs, [-5, -6], json.loads(sys.argv[1])))\n")
    fired = subprocess.run(
        [sys.executable, str(script), json.dumps(dict(conf, scheduler_opts=[hold]))],
        capture_output=True, text=True, env=mfa.env, timeout=WAIT_S, check=False,
    )
    assert fired.returncode == 0, fired.stderr
    served_id = int(fired.stdout.strip())
    with Storage(conf["dbfile"]) as storage:
        (job,) = storage.get_jobs(served_id)
    mfa.remote().run(f"{release} {job.job_id}")
    serve = mfa.sheepdog("serve", "--dbfile", conf["dbfile"], "--timeout", str(WAIT_S))
    assert serve.returncode == 0, serve.stdout + serve.stderr
    assert f"request {served_id} is finished" in serve.stdout, serve.stdout
    assert sheepdog.get_results(served_id, conf["dbfile"], block=False) == [(-5, 5), (-6, 6)]
    # 10,000 tiny tasks.
    n = 10_000
    assert sheepdog.map(tiny, range(n), dict(conf, workers=4), verbose=False) == \
        [x + 1 for x in range(n)]
    assert mfa.prompts() == before + 1, "asked for a code more than once"


def test_a_wrong_code_fails_within_seconds_and_submits_nothing(
    mfa: Mfa, conf: dict[str, Any],
) -> None:
    mfa.remote().logout()
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHEEPDOG_TEST_TOTP_WRONG", "1")
        with pytest.raises(SSHError, match="login .* failed|Permission denied"):
            sheepdog.map(add, [(1, 1)], conf)
    took = time.monotonic() - started
    assert took < 30, f"a wrong code took {took:.1f} s to fail"
    with Storage(conf["dbfile"]) as storage:
        jobs = [job for request in storage.list_requests()
                for job in storage.get_jobs(request["id"])]
    assert jobs == []
    listing = "squeue -h -u sheep" if is_slurm(conf) else "qstat -u sheep"
    done = login_node(conf).get_wrapped_container().exec_run(
        ["su", "-l", "sheep", "-c", listing])
    assert done.exit_code == 0 and not done.output.strip(), done.output


def test_master_killed_mid_map_loses_nothing_and_finishes_after_login(
    mfa: Mfa, conf: dict[str, Any], caplog: pytest.LogCaptureFixture,
) -> None:
    login = mfa.sheepdog("login", str(mfa.config_file))
    assert login.returncode == 0, login.stderr
    prompts = mfa.prompts()
    n = 12
    cfg = dict(conf, connect="tunnel", workers=2, batch=1)
    caplog.set_level(logging.INFO, logger="sheepdog")  # what the map did, should it hang
    with pytest.MonkeyPatch.context() as patch:
        # This process cannot answer a prompt (no terminal, no askpass): a lapsed master
        # is said once, and waited for.
        patch.delenv("SSH_ASKPASS")
        thread, outcome = map_in_thread(slow_square, list(range(1, n + 1)), cfg)
        with Storage(conf["dbfile"]) as storage:
            assert poll_until(
                lambda: any(storage.count_results(r["id"]) >= 2
                            for r in storage.list_requests()), timeout_s=WAIT_S,
            ), outcome
        master = mfa.remote().master()
        assert master.running
        pid = int(master.detail.split("pid=")[1].rstrip(")"))
        os.kill(pid, signal.SIGKILL)
        assert poll_until(lambda: LOGIN_HINT in caplog.text, timeout_s=120), caplog.text
        assert mfa.prompts() == prompts, "a process without a terminal asked for a code"
        login = mfa.sheepdog("login", str(mfa.config_file))
        assert login.returncode == 0, login.stderr
        thread.join(WAIT_S)
    assert not thread.is_alive(), _stuck(thread, conf["dbfile"], caplog.text)
    assert outcome.get("results") == [x * x for x in range(1, n + 1)], outcome
    assert caplog.text.count(LOGIN_HINT) >= 1
    said_once = [r for r in caplog.records
                 if r.name == "sheepdog.openssh" and r.levelno >= logging.WARNING]
    assert len(said_once) == 1, [r.getMessage() for r in said_once]
    assert mfa.prompts() == prompts + 1


def _stuck(thread: threading.Thread, dbfile: str, log: str) -> str:
    """Where a map that did not return waits, its tasks and jobs, and its log."""
    frame = sys._current_frames().get(thread.ident or 0)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(ended)"
    with Storage(dbfile) as storage:
        rows = [(r["id"], storage.task_counts(r["id"]), storage.get_jobs(r["id"]))
                for r in storage.list_requests()]
    return f"the map did not return; its thread is at:\n{stack}\nrequests: {rows}\nlog:\n{log}"


PARAMIKO_IN_A_TERMINAL = r"""
import json, sys
from sheepdog import Config
from sheepdog.scheduler import Scheduler, open_remote
config = Config.from_mapping(dict(json.load(open(sys.argv[1])), ssh_client="paramiko"))
first = open_remote(config, Scheduler)
print("said", first.run("echo one").stdout.strip(), first.run("echo two").stdout.strip())
first.close()
second = open_remote(config, Scheduler)
print("said", second.run("echo three").stdout.strip())
second.close()
print("done")
"""


def test_paramiko_in_a_terminal_is_asked_once_per_connection(mfa: Mfa, tmp_path: Path) -> None:
    import pty
    import select

    sys.path.insert(0, str(ASKPASS.parent))
    from askpass_totp import totp

    secret = Path(mfa.env["SHEEPDOG_TEST_TOTP_SECRET_FILE"]).read_text().strip()
    env = {k: v for k, v in mfa.env.items() if not k.startswith("SSH_ASKPASS")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: a process whose terminal is the pty
        os.execvpe(sys.executable, [sys.executable, "-c", PARAMIKO_IN_A_TERMINAL,
                                    str(mfa.config_file)], env)
    seen, prompts = b"", 0
    deadline = time.monotonic() + 120
    try:
        while b"done" not in seen and time.monotonic() < deadline:
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child exited and closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if seen.count(b"Verification code:") > prompts:
                prompts += 1
                os.write(fd, totp(secret).encode() + b"\n")
    finally:
        if b"done" not in seen:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode(errors="replace")
    assert "said one two" in text and "said three" in text and "done" in text, text
    assert prompts == 2, f"{prompts} prompts for two connections: {text}"
