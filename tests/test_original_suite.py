"""The public behaviour that Sheepdog 0.2.3's own test suite checked, run against ours.

0.2.3's suite (``sheepdog/tests/`` of its repository, nose) tested the names a
user imports and calls: ``from sheepdog import job_file``, ``Deployer.deploy``
and ``submit``, ``Storage``, ``get_server``, ``default_config``, and the
"Restarting the server" recipe of its docs. Each test below restates one of
them; where sheepdog changed a detail on purpose (a job file holds a key file's
path, not a password), ``docs/upgrading.rst`` says so and the test checks the
new detail. Its tests of internals (SQL tables, HTTP basic auth, base64
pickles, mocks of paramiko's calls) are not public behaviour and are not here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stubrunner import WORKER_PYTHON
from test_docs_blocks import block

import sheepdog
from sheepdog.config import Config
from sheepdog.errors import SubmitError
from sheepdog.job_file import stub_file_name
from sheepdog.poll import poll_until
from sheepdog.remote import CommandResult, Remote
from sheepdog.server import get_server, registry
from sheepdog.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 120.0


def fresh_python(code: str, cwd: Path) -> str:
    """Run ``code`` in a new interpreter importing this checkout; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=WAIT_S, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- the package's names (0.2.3: sheepdog/__init__.py) -------------------------------------


def test_import_sheepdog_gives_the_storage_server_and_deployment_modules(tmp_path: Path) -> None:
    out = fresh_python(
        "import sheepdog\n"
        "print(sheepdog.storage.Storage.__name__, sheepdog.server.get_server.__name__,\n"
        "      sheepdog.deployment.Deployer.__name__, sheepdog.serialisation.__name__)\n",
        tmp_path,
    )
    assert out.split() == ["Storage", "get_server", "Deployer", "sheepdog.serialisation"]


def test_from_sheepdog_import_job_file_gives_the_function(tmp_path: Path) -> None:
    out = fresh_python(
        "from sheepdog import job_file\n"
        "from sheepdog.job_file import job_stem\n"  # the module's other names still import
        "print(callable(job_file), job_file.__name__, job_stem.__name__)\n",
        tmp_path,
    )
    assert out.split() == ["True", "job_file", "job_stem"]


def test_job_file_writes_the_shebang_options_array_and_client_line() -> None:
    """0.2.3's test_job_file.py, with a key file's path where it took the password."""
    from sheepdog import job_file

    text = job_file("http://myurl:1/", "/home/me/.sheepdog/k.key", 7, 1000, "/my/py", ["-r y"])
    lines = text.splitlines()
    assert lines[0] == "#!/my/py"
    assert "#$ -r y" in lines and "#$ -t 1-1000" in lines
    assert "'http://myurl:1/', None, 7," in lines[-1].replace('"', "'")
    assert "secret_file='/home/me/.sheepdog/k.key'" in lines[-1]
    assert "mypass" not in text


def test_default_config_ge_opts_is_the_023_list_and_counts_as_unset() -> None:
    ge_opts = sheepdog.default_config["ge_opts"]
    assert ge_opts == ["-wd $HOME/.sheepdog/", "-o $HOME/.sheepdog/", "-e $HOME/.sheepdog/"]
    # 0.2.3's way to add an option to the defaults:
    extended = Config.from_mapping({"host": "fear", "ge_opts": [*ge_opts, "-l h_vmem=2G"]})
    assert extended.ge_opts == (*ge_opts, "-l h_vmem=2G")
    # The whole default_config given back is the default, on Slurm too.
    plain = Config.from_mapping({**sheepdog.default_config, "host": "fear", "scheduler": "slurm"})
    assert plain.ge_opts is None and plain == Config(host="fear", scheduler="slurm")


# -- Deployer.deploy and Deployer.submit (0.2.3: test_deployment.py) -----------------------


class FakeHead:
    """What a Deployer sends to the head node, for ``put`` and ``run`` (no SSH in a unit test)."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.puts: list[tuple[str, list[tuple[str, str, int]]]] = []
        self.commands: list[str] = []

    def put(self, directory: str, files: list[tuple[str, str, int]]) -> None:
        self.puts.append((directory, list(files)))

    def run(self, command: str, *, error: type[Exception] = SubmitError, **_: Any) -> CommandResult:
        self.commands.append(command)
        if command.startswith("test -f "):  # the worker stub is there already
            return CommandResult(command, 0, "", "")
        if self.status:
            raise error(command, self.status, "", "qsub: Unknown option")  # type: ignore[call-arg]
        return CommandResult(command, 0, 'Your job 118 ("sheepdog_123.py") has been submitted\n',
                             "")


@pytest.fixture
def head(monkeypatch: pytest.MonkeyPatch) -> FakeHead:
    fake = FakeHead()
    monkeypatch.setattr(Remote, "put", lambda self, d, files: fake.put(d, files))
    monkeypatch.setattr(Remote, "run", lambda self, c, **kw: fake.run(c, **kw))
    monkeypatch.setattr(Remote, "home", property(lambda self: "/home/me"))
    return fake


def test_deployer_deploys_a_job_file_as_023_named_it(head: FakeHead) -> None:
    d = sheepdog.Deployer("test", 22, "user")
    d.deploy("jobfile contents", 123, "/path/to/dir")
    assert head.puts == [("/path/to/dir", [("sheepdog_123.py", "jobfile contents", 0o700)])]
    # The worker stub the job file runs is looked for beside it (here it is there).
    assert head.commands == [f"test -f /path/to/dir/{stub_file_name()}"]
    d.deploy("other", 5, ".sheepdog")  # relative: under the home directory, as in 0.2.3
    assert head.puts[-1] == (".sheepdog", [("sheepdog_005.py", "other", 0o700)])


def test_deployer_submits_with_qsub_and_returns_its_answer(head: FakeHead) -> None:
    d = sheepdog.Deployer("test", 22, "user")
    out = d.submit(123, "/path/to/dir")
    assert head.commands == ["qsub /path/to/dir/sheepdog_123.py"]
    assert "Your job 118" in out
    head.status = 2
    with pytest.raises(SubmitError, match="Unknown option") as refused:
        d.submit(123, "/path/to/dir")
    assert refused.value.exit_status == 2


# -- Storage and get_server (0.2.3: test_storage.py, test_server.py) -----------------------


def test_storage_counts_and_lists_results_and_errors_as_023(tmp_path: Path) -> None:
    with Storage(str(tmp_path / "db.sqlite")) as storage:
        args = [b"abc", b"def", b"geh"]
        rid = storage.new_request(b"F", b"", args)
        assert storage.count_tasks(rid) == 3
        storage.store_result(rid, 1, b"ABC")
        storage.store_result(rid, 2, b"DEF")
        storage.store_error(rid, 3, "oops")
        assert storage.get_results(rid) == [(b"abc", b"ABC"), (b"def", b"DEF")]
        assert storage.get_tasks_with_results(rid) == [(b"abc", b"ABC"), (b"def", b"DEF"),
                                                       (b"geh", None)]
        assert storage.get_errors(rid) == [(b"geh", "oops")]
        assert (storage.count_results(rid), storage.count_errors(rid),
                storage.count_results_and_errors(rid)) == (2, 1, 3)
        assert storage.get_details(rid, 2)[2] == b"def"
        for bad in (lambda: storage.get_details(rid + 1, 2), lambda: storage.get_details(rid, 4),
                    lambda: storage.store_result(rid, 4, b"r")):
            with pytest.raises(ValueError):
                bad()


@pytest.fixture
def clean_registry() -> Iterator[None]:
    before = dict(registry.shared)
    yield
    for key, server in list(registry.shared.items()):
        if key not in before:
            server.stop()
            registry.shared.pop(key, None)


@pytest.mark.usefixtures("clean_registry")
def test_get_server_keeps_one_server_per_port(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    first = get_server(None, "password", dbfile, host="127.0.0.1")
    assert get_server(first.port, "password", dbfile) is first
    with pytest.raises(RuntimeError):
        get_server(first.port, "password", dbfile + "_")
    with pytest.raises(RuntimeError):
        get_server(first.port, "password_", dbfile)


# -- the seed's "Restarting the server", as written --------------------------------------

SUBMIT = textwrap.dedent(
    """
    import os, sys, time, sheepdog

    def slow(x):
        import os, time
        deadline = time.monotonic() + 120
        while not os.path.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.05)
        return x + 1

    GATE = sys.argv[2]
    conf = {"scheduler": "local", "ssh_dir": sys.argv[3], "localhost": "127.0.0.1",
            "shell": sys.argv[1]}
    print(sheepdog.map_async(slow, range(3), conf, ns={"GATE": GATE}), flush=True)
    time.sleep(600)  # killed, as a crash would, while the workers wait for the gate
    """
)


def answers(port: int) -> bool:
    """Whether a server listens on ``port`` of this machine."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_the_023_restart_recipe_works_as_written(tmp_path: Path) -> None:
    """A dead server's workers find the one the recipe starts, as the 0.2 docs promised."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gate = tmp_path / "gate"
    submitter = subprocess.Popen(
        [sys.executable, "-c", SUBMIT, WORKER_PYTHON, str(gate), str(tmp_path / "jobs")],
        cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    recipe: subprocess.Popen[str] | None = None
    try:
        assert submitter.stdout is not None
        rid = int(submitter.stdout.readline() or 0)
        assert rid, submitter.stderr.read() if submitter.stderr else ""
        dbfile = str(tmp_path / "sheepdog.sqlite")
        with Storage(dbfile) as storage:
            assert poll_until(lambda: bool(storage.get_jobs(rid)), timeout_s=WAIT_S)
            port = storage.get_jobs(rid)[-1].port
            submitter.send_signal(signal.SIGKILL)  # its server stops by itself
            submitter.wait(timeout=WAIT_S)
            assert poll_until(lambda: not answers(port), timeout_s=WAIT_S), "the server lives on"
            gate.touch()  # the workers finish their tasks and find no server
            assert storage.count_results(rid) == 0
            script = tmp_path / "restart.py"
            script.write_text("\n".join(block("upgrading.rst", "import sys").lines) + "\n")
            recipe = subprocess.Popen(
                [sys.executable, str(script), str(rid)], cwd=tmp_path, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            assert poll_until(lambda: storage.count_results(rid) == 3, timeout_s=WAIT_S), (
                "the workers never reached the restarted server")
            assert storage.listen_address_for_port(port) is not None
            assert sorted(v for _, v in sheepdog.get_results(rid, dbfile)) == [1, 2, 3]
    finally:
        for proc in (submitter, recipe):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate(timeout=WAIT_S)  # and closes its pipes
