"""ssh_client and the OpenSSH backend, without a cluster.

``ssh -G`` is the real one (it reads config files only). Where a master connection is
needed, a stand-in ``ssh`` on PATH (tests/fake_ssh.py) plays it: it runs the remote
command with this machine's shell, keeps "the master" as a file, refuses a login as a
server asking for a code would, and records every command line it was given.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sheepdog import Config
from sheepdog.cli import main
from sheepdog.errors import ConfigError, SSHError
from sheepdog.openssh import (
    LOGIN_HINT,
    OpenSSHRemote,
    can_prompt,
    config_wants_master,
    control_dir,
    remove_stale_socket,
    ssh_settings,
    takes_over,
)
from sheepdog.poll import poll_until
from sheepdog.remote import Remote
from sheepdog.scheduler import Scheduler, open_remote

FAKE_SSH = Path(__file__).resolve().parent / "fake_ssh.py"


# --- the config keys ------------------------------------------------------------------


def test_the_keys_default_to_auto_and_four_hours() -> None:
    config = Config(host="headnode")
    assert config.ssh_client == "auto"
    assert config.ssh_persist_s == 4 * 3600


@pytest.mark.parametrize("value", ["ssh", "OpenSSH", "", None])
def test_a_bad_ssh_client_names_the_key_and_the_choices(value: Any) -> None:
    with pytest.raises(ConfigError, match="'ssh_client'.*'paramiko', 'openssh', 'auto'"):
        Config(host="headnode", ssh_client=value)


@pytest.mark.parametrize("value", [0, -5, 0.5, float("nan"), "4h"])
def test_a_bad_ssh_persist_s_names_the_key(value: Any) -> None:
    with pytest.raises(ConfigError, match="'ssh_persist_s'"):
        Config(host="headnode", ssh_persist_s=value)


# --- what ssh -G says -----------------------------------------------------------------


def _ssh_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_a_control_path_in_the_ssh_config_asks_for_a_master(tmp_path: Path) -> None:
    cfg = _ssh_config(tmp_path, "Host cluster\n  ControlPath ~/.ssh/cm-%C\n")
    why = config_wants_master(ssh_settings("cluster", ssh_config=cfg))
    assert why is not None and "ControlPath" in why
    assert config_wants_master(ssh_settings("elsewhere", ssh_config=cfg)) is None


def test_control_master_in_a_match_block_asks_for_a_master(tmp_path: Path) -> None:
    cfg = _ssh_config(tmp_path, "Match host cluster\n  ControlMaster auto\n")
    why = config_wants_master(ssh_settings("cluster", ssh_config=cfg))
    assert why is not None and "ControlMaster auto" in why


def test_auto_picks_openssh_from_the_ssh_config_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _ssh_config(tmp_path, "Host cluster\n  ControlMaster auto\n")
    caplog.set_level(logging.INFO)
    remote = open_remote(Config(host="cluster", ssh_config=cfg), Scheduler)
    assert isinstance(remote, OpenSSHRemote)
    assert "ssh_client=auto chose openssh: your ssh config sets ControlMaster" in caplog.text


def test_auto_otherwise_starts_with_paramiko_ready_to_move(tmp_path: Path) -> None:
    cfg = _ssh_config(tmp_path, "Host cluster\n  Port 2222\n")
    remote = open_remote(Config(host="cluster", ssh_config=cfg), Scheduler)
    assert not isinstance(remote, OpenSSHRemote)
    assert remote.on_code is not None


def test_paramiko_and_openssh_are_taken_as_asked(tmp_path: Path) -> None:
    cfg = _ssh_config(tmp_path, "Host cluster\n  ControlMaster auto\n")
    paramiko_remote = open_remote(Config(host="cluster", ssh_config=cfg, ssh_client="paramiko"))
    assert not isinstance(paramiko_remote, OpenSSHRemote)
    assert paramiko_remote.openssh() is None  # never moves: no connection is made
    openssh = open_remote(Config(host="c", ssh_client="openssh", ssh_persist_s=60))
    assert isinstance(openssh, OpenSSHRemote) and openssh.persist_s == 60


# --- paramiko and a host that asks for a code ------------------------------------------


def test_paramiko_without_a_terminal_names_ssh_client_openssh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    remote = Remote("headnode", 22, "sheep")
    with pytest.raises(SSHError, match='asks for a second factor.*ssh_client="openssh"'):
        remote._answer_prompts(None, "sheep")  # type: ignore[arg-type]


def test_auto_moves_to_openssh_when_the_host_asks_for_a_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    remote = Remote("headnode", 22, "sheep", on_code=takes_over(600))
    with pytest.raises(SSHError):
        remote._answer_prompts(None, "sheep")  # type: ignore[arg-type]
    assert isinstance(remote._openssh, OpenSSHRemote) and remote._openssh.persist_s == 600
    assert "ssh_client=auto chose openssh" in caplog.text and "second factor" in caplog.text


# --- who may be prompted, and where the sockets live -----------------------------------


def test_can_prompt_only_with_a_terminal_or_a_forced_askpass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.delenv("SSH_ASKPASS", raising=False)
    monkeypatch.delenv("SSH_ASKPASS_REQUIRE", raising=False)
    assert not can_prompt()
    monkeypatch.setenv("SSH_ASKPASS", "/usr/bin/true")
    assert not can_prompt()  # ssh would not use it with a terminal around: not asked for
    for require in ("force", "prefer"):
        monkeypatch.setenv("SSH_ASKPASS_REQUIRE", require)
        assert can_prompt()


def test_the_control_directory_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = control_dir()
    assert path.parent == tmp_path and stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o755)
    with pytest.raises(SSHError, match="not a private directory"):
        control_dir()


# --- the backend, with a stand-in ssh --------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A stand-in ``ssh`` first on PATH; its master is a file, its calls a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!{sys.executable}\n" + FAKE_SSH.read_text())
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    paths = {"master": tmp_path / "master", "log": tmp_path / "calls.jsonl",
             "refuse": tmp_path / "refuse"}
    for name, path in paths.items():
        monkeypatch.setenv(f"FAKE_SSH_{name.upper()}", str(path))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal
    monkeypatch.delenv("SSH_ASKPASS", raising=False)
    return paths


def _calls(fake: dict[str, Path]) -> list[list[str]]:
    if not fake["log"].exists():
        return []
    return [json.loads(line) for line in fake["log"].read_text().splitlines()]


def _remote(tmp_path: Path) -> OpenSSHRemote:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("")
    return OpenSSHRemote("headnode", 2222, "sheep", ssh_config=str(cfg), persist_s=3600)


def test_commands_and_files_go_through_the_master(fake: dict[str, Path], tmp_path: Path) -> None:
    fake["master"].touch()
    remote = _remote(tmp_path)
    assert remote.run("echo hello; echo oops >&2").stdout == "hello\n"
    jobdir = tmp_path / "jobs"
    remote.put(str(jobdir), [("job.py", "print(1)\n", 0o700), ("key", "s3cret-value", 0o600)])
    assert (jobdir / "key").read_text() == "s3cret-value"
    assert stat.S_IMODE((jobdir / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE((jobdir / "job.py").stat().st_mode) == 0o700
    assert stat.S_IMODE(jobdir.stat().st_mode) == 0o700
    assert sorted(remote.list_dir(str(jobdir)) or []) == ["job.py", "key"]
    assert remote.list_dir(str(tmp_path / "nothing")) is None
    assert remote.read_bytes(str(jobdir / "key")) == b"s3cret-value"
    with pytest.raises(FileNotFoundError):
        remote.read_bytes(str(jobdir / "gone"))
    remote.rename(str(jobdir / "key"), str(jobdir / "key2"))
    remote.remove(str(jobdir / "key2"))
    remote.remove(str(jobdir / "key2"))  # already gone is fine
    assert sorted(remote.list_dir(str(jobdir)) or []) == ["job.py"]
    calls = _calls(fake)
    assert not any("s3cret-value" in " ".join(call) for call in calls), "a secret on argv"
    sessions = [call for call in calls if "-O" not in call and "-G" not in call]
    for call in sessions:
        options = dict(word.split("=", 1) for word in call if "=" in word and word[0].isupper())
        assert options["ControlMaster"] == "auto" and options["ControlPersist"] == "3600"
        assert options["BatchMode"] == "yes" and options["StrictHostKeyChecking"] == "yes"
        assert options["ControlPath"].startswith(str(control_dir()))


def test_a_lapsed_master_is_said_once_and_each_call_fails_at_once(
    fake: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sheepdog.openssh")
    fake["master"].touch()
    remote = _remote(tmp_path)
    remote.run("true")
    fake["master"].unlink()  # the master lapsed; a login needs a code
    fake["refuse"].touch()
    for _ in range(3):
        with pytest.raises(SSHError, match=LOGIN_HINT.replace("`", ".")):
            remote.run("true")
    assert caplog.text.count(LOGIN_HINT) == 1
    fake["master"].touch()  # `sheepdog login` in another process
    assert remote.run("echo back").stdout == "back\n"
    fake["master"].unlink()
    with pytest.raises(SSHError):
        remote.run("true")
    assert caplog.text.count(LOGIN_HINT) == 2, "a new lapse is said again"
    logins = [call for call in _calls(fake) if "-M" in call]
    assert logins and all("BatchMode=yes" in call for call in logins)


def test_a_refused_code_is_not_asked_for_again_by_the_same_connection(
    fake: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSH_ASKPASS", "/usr/bin/true")
    monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")
    fake["refuse"].touch()
    remote = _remote(tmp_path)
    for _ in range(2):
        with pytest.raises(SSHError, match="refused at the code.*nothing was submitted"):
            remote.run("true")
    logins = [call for call in _calls(fake) if "-M" in call]
    assert len(logins) == 1
    assert "BatchMode=no" in logins[0] and "NumberOfPasswordPrompts=1" in logins[0]


def test_the_forward_port_is_read_back_and_close_leaves_the_master(
    fake: dict[str, Path], tmp_path: Path,
) -> None:
    fake["master"].touch()
    remote = _remote(tmp_path)
    assert remote.forward(("127.0.0.1", 8000)) == 4242
    remote.close()
    assert fake["master"].exists()
    assert _remote(tmp_path).logout() and not fake["master"].exists()


def test_login_and_logout_commands(
    fake: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "ssh_config"
    cfg.write_text("")
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps({"host": "headnode", "ssh_port": 2222, "ssh_user": "sheep",
                                  "ssh_config": str(cfg), "ssh_client": "openssh"}))
    before = time.time()
    assert main(["login", str(config)]) == 0
    out = capsys.readouterr().out
    assert "logged in to sheep@headnode:2222" in out and "open until" in out
    # ssh_persist_s (4 h) from now, not now: the window starts at the login.
    untils = {time.strftime("%H:%M", time.localtime(at + 4 * 3600)) for at in (before, time.time())}
    assert any(f"open until {until}" in out for until in untils), out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert fake["master"].exists()
    assert main(["logout", str(config)]) == 0
    assert "closed the master connection" in capsys.readouterr().out
    assert main(["logout", str(config)]) == 0
    assert "no master connection" in capsys.readouterr().out
    config.write_text(json.dumps({"host": "headnode", "ssh_client": "paramiko"}))
    assert main(["login", str(config)]) == 0
    assert "keeps no login open" in " ".join(capsys.readouterr().out.split())


def test_an_unknown_host_key_is_refused_with_the_fix_and_gets_a_master_of_its_own(
    fake: dict[str, Path], tmp_path: Path,
) -> None:
    fake["master"].touch()  # a master opened with another known_hosts
    cfg = tmp_path / "ssh_config"
    cfg.write_text("")
    trusted = OpenSSHRemote("headnode", 2222, "sheep", ssh_config=str(cfg), persist_s=60)
    empty = OpenSSHRemote("headnode", 2222, "sheep", ssh_config=str(cfg), persist_s=60,
                          known_hosts=str(tmp_path / "empty"))
    assert trusted.control_path != empty.control_path
    fake["master"].unlink()
    with pytest.raises(SSHError, match="not in .*empty.*ssh-keyscan -p 2222 headnode"):
        empty.run("true")


def test_a_login_that_makes_no_master_fails_and_says_so(
    fake: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_SSH_NO_MASTER", "1")
    remote = _remote(tmp_path)
    with pytest.raises(SSHError, match="succeeded, but its master connection did not start.*"
                                       "disabling multiplexing"):
        remote.login_master(interactive=False)


def test_a_stale_control_socket_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    import socket

    stale = str(tmp_path / "stale")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)  # bound, never listening, then closed: as a killed master leaves it
    dead.close()
    assert remove_stale_socket(stale) and not os.path.exists(stale)
    live = str(tmp_path / "live")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as master:
        master.bind(live)
        master.listen(1)
        assert not remove_stale_socket(live) and os.path.exists(live)
    assert not remove_stale_socket(str(tmp_path / "none"))


def test_over_openssh_the_forward_reaches_the_server_through_a_gate_that_caps_it(
    fake: dict[str, Path], tmp_path: Path,
) -> None:
    """``ssh -R`` would connect anyone on the head node straight to the server: the forward
    goes to a gate here (the relay's program), bounded as the relay is (issue 25)."""
    from sheepdog.tunnel import RELAY_MIN_CONNECTIONS, Tunnel

    fake["master"].touch()
    remote = _remote(tmp_path)
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    tunnel = Tunnel(remote, lambda: ("127.0.0.1", server.getsockname()[1]))
    clients: list[socket.socket] = []
    try:
        tunnel.address()
        [forward] = [call for call in _calls(fake) if "forward" in call]
        gate_port = int(forward[forward.index("-R") + 1].rsplit(":", 1)[1])
        assert gate_port != server.getsockname()[1]
        gate = tunnel._gate
        assert gate is not None and gate.alive
        for _ in range(RELAY_MIN_CONNECTIONS):
            clients.append(socket.create_connection(("127.0.0.1", gate_port), timeout=10))
        assert poll_until(lambda: len(held) == RELAY_MIN_CONNECTIONS, timeout_s=10), len(held)
        clients.append(socket.create_connection(("127.0.0.1", gate_port), timeout=10))
        clients[-1].settimeout(10)
        assert clients[-1].recv(1) == b"", "one over the cap is closed at once"
        assert len(held) == RELAY_MIN_CONNECTIONS
    finally:
        tunnel.close()
        for sock in clients + held:
            sock.close()
        server.close()
    assert gate.proc.poll() is not None, "closing the tunnel ends its gate"


def test_the_gate_stops_with_its_connection_though_the_tunnel_was_never_closed(
    fake: dict[str, Path], tmp_path: Path,
) -> None:
    """A map's Remote closes; its tunnel may just be dropped: the gate must not outlive it."""
    from sheepdog.tunnel import Tunnel

    fake["master"].touch()
    remote = _remote(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as server:
        tunnel = Tunnel(remote, lambda: ("127.0.0.1", server.getsockname()[1]))
        tunnel.address()
        gate = tunnel._gate
        assert gate is not None and gate.alive
        remote.close()
        assert gate.proc.poll() is not None
