"""Security properties (docs/security.rst): secrets, integrity, TLS, and hostile config values.

Local only: real gunicorn servers and real job files run as subprocesses, and
remote commands executed by a local bash instead of over SSH. The same
checks on the real cluster are in tests/e2e/test_security_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import http.server
import json
import logging
import os
import pickle
import re
import shlex
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stubrunner import write_job

import sheepdog.server.auth as signing
import sheepdog.server.tls as _tls
from sheepdog import submit_jobs
from sheepdog.config import Config, as_config
from sheepdog.errors import ConfigError, RemoteCommandError
from sheepdog.job_file import job_file_name, key_file_name, write_job_file
from sheepdog.poll import poll_until
from sheepdog.remote import CommandResult, Remote
from sheepdog.scheduler.gridengine import DEFAULT_ARRAY_LIMITS, GridEngine
from sheepdog.serialisation import deserialise_value, serialise_args, serialise_function
from sheepdog.server import Server, create_app, registry
from sheepdog.server.auth import SIGNATURE_HEADER, signed_headers
from sheepdog.server.tls import certificate_for, fingerprint_sha256, tls_dir
from sheepdog.storage import Storage
from sheepdog.stored_request import RequestJobs, StoredRequest

WAIT_S = 120.0
WORKER_PYTHON = sys.executable


def submit_one(storage: Storage, cfg: Config, rid: int, scheduler: Any) -> str:
    """Submit request ``rid`` with ``cfg`` to ``scheduler`` as one array task."""
    jobs = RequestJobs(StoredRequest(storage, rid), cfg, scheduler)
    return submit_jobs.submit_request(jobs, n_workers=1)


def square(x: int) -> int:
    return x * x


class Marker:
    """Unpickling this creates a directory: the side effect we check never happens."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def run_job(job: Path, task_id: int = 1) -> tuple[int, str, str]:
    env = {**os.environ, "SGE_TASK_ID": str(task_id)}
    env.pop("PYTHONPATH", None)  # like a worker node: sheepdog is not importable
    proc = subprocess.run(
        [WORKER_PYTHON, str(job)], env=env, capture_output=True, text=True, timeout=WAIT_S
    )
    return proc.returncode, proc.stdout, proc.stderr


def dump_tables(dbfile: str) -> list[Any]:
    with Storage(dbfile) as db:
        return [
            db.conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("requests", "tasks", "jobs")
        ]


# -- secrets ---------------------------------------------------------------------------


def test_each_request_has_its_own_secret_of_at_least_128_bits(tmp_path: Path) -> None:
    with Storage(str(tmp_path / "db.sqlite")) as db:
        secrets = [db.get_secret(db.new_request(b"F", None, [b"x"])) for _ in range(20)]
    assert len(set(secrets)) == 20
    for secret in secrets:
        assert re.fullmatch(r"[0-9a-f]+", secret)
        assert len(bytes.fromhex(secret)) * 8 >= 128


def test_signatures_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    assert signing.verify("ab" * 32, "ab" * 32)
    assert not signing.verify("ab" * 32, "ac" * 32)
    assert len(calls) == 2
    stub = Path(__file__).parent.parent / "worker_stub" / "sheepdog_worker.py"
    # The stub checks answers' signatures and the TLS pin with compare_digest, never ==.
    assert stub.read_text().count("hmac.compare_digest(") >= 2


def test_job_files_and_their_directory_are_private(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir(mode=0o755)
    path = write_job_file("job text\n", folder, 7, "ab" * 32)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / key_file_name(7, "ab" * 32)).stat().st_mode) == 0o600


def test_one_requests_secret_cannot_write_anothers_tasks(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    client = create_app(dbfile).test_client()
    with Storage(dbfile) as db:
        mine = db.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
        theirs = db.new_request(b"F", None, [b"y"], settings={"lease_s": 30.0})
        my_secret = db.get_secret(mine)
        [their_lease] = db.lease(theirs, worker="w", host="h", max_tasks=1, lease_s=30.0)
    before = dump_tables(dbfile)
    value = base64.b64encode(pickle.dumps(1)).decode()
    bodies = {
        "lease": {"worker": "w", "host": "h", "max_tasks": 1},
        "heartbeat": {"worker": "w", "leases": [their_lease.lease]},
        "results": {"worker": "w", "host": "h", "max_tasks": 0, "results": [
            {"index": 1, "lease": their_lease.lease, "ok": True, "value": value}]},
    }
    for action, body in bodies.items():
        path = f"/api/v1/requests/{theirs}/{action}"
        raw = json.dumps(body).encode()
        headers = signed_headers(my_secret, "POST", path, raw)
        assert client.post(path, data=raw, headers=headers).status_code == 401
    # Their lease token under my request renews nothing of theirs.
    path = f"/api/v1/requests/{mine}/heartbeat"
    raw = json.dumps(bodies["heartbeat"]).encode()
    headers = signed_headers(my_secret, "POST", path, raw)
    answer = client.post(path, data=raw, headers=headers).get_json()
    assert answer["renewed"] == [] and answer["lost"] == [their_lease.lease]
    assert dump_tables(dbfile) == before


# -- integrity: nothing is unpickled on the server -------------------------------------


def test_the_server_never_unpickles_signed_or_not(tmp_path: Path) -> None:
    dbfile = str(tmp_path / "db.sqlite")
    client = create_app(dbfile).test_client()
    with Storage(dbfile) as db:
        rid = db.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
        secret = db.get_secret(rid)
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(Marker(str(marker)))
    b64 = base64.b64encode(evil).decode()
    good_result = {"worker": "w", "host": "h", "max_tasks": 0, "results": [
        {"index": 1, "lease": "", "ok": True, "value": b64}]}
    bodies = [evil, json.dumps(good_result).encode(), b64.encode()]
    for action in ("lease", "heartbeat", "results", "function"):
        path = f"/api/v1/requests/{rid}/{action}"
        for raw in bodies:
            method = "GET" if action == "function" else "POST"
            signed = signed_headers(secret, method, path, raw)
            for headers in ({}, signed):
                response = client.open(path, method=method, data=raw, headers=headers)
                assert response.status_code < 500
    assert not marker.exists()
    # The signed result was stored as bytes; only the user's own get_results unpickles it.
    with Storage(dbfile) as db:
        assert db.get_results(rid) == [(b"x", evil)]
    assert not marker.exists()


# -- integrity: tampering in transit ----------------------------------------------------


class TamperingProxy(http.server.ThreadingHTTPServer):
    """Forward HTTP calls to ``upstream``, flipping one byte of each request or answer body."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], flip: str) -> None:
        self.upstream, self.flip, self.tampered = upstream, flip, 0
        super().__init__(("127.0.0.1", 0), _TamperHandler)

    def tamper(self, body: bytes) -> bytes:
        if not body:
            return body
        self.tampered += 1
        middle = len(body) // 2
        return body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]


class _TamperHandler(http.server.BaseHTTPRequestHandler):
    server: TamperingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.flip == "request":
            body = self.server.tamper(body)
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        conn.close()
        if self.server.flip == "response":
            answer = self.server.tamper(answer)
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "connection", "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = forward


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, Storage]]:
    dbfile = str(tmp_path / "db.sqlite")
    server = Server(None, None, dbfile, host="127.0.0.1", workers=1, threads=2)
    storage = Storage(dbfile)
    try:
        yield server, storage
    finally:
        server.stop()
        storage.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flip", "message"),
    [
        ("response", "is not signed with request"),
        ("request", "the server rejected our signature"),
    ],
)
def test_a_body_tampered_in_transit_is_refused(
    served: tuple[Server, Storage], tmp_path: Path, flip: str, message: str
) -> None:
    server, storage = served
    assert server.port is not None
    rid = storage.new_request(serialise_function(square), None, serialise_args([3]))
    proxy = TamperingProxy(("127.0.0.1", server.port), flip)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}/"
        code, out, err = run_job(write_job(tmp_path / "jobs", url, storage.get_secret(rid), rid,
                                           1, client_options={"retry_s": 5.0}))
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.tampered >= 1
    assert code == 4, f"{out}\n{err}"  # EXIT_AUTH
    assert message in err
    assert storage.open_task_indices(rid) == [1]
    assert storage.get_results(rid) == []


# -- TLS ----------------------------------------------------------------------------------


def test_certificate_is_private_reused_and_fingerprinted(tmp_path: Path) -> None:
    dbfile = tmp_path / "db.sqlite"
    first = certificate_for(dbfile)
    folder = tls_dir(dbfile)
    assert first.certfile.parent == folder == tmp_path / "db.sqlite.tls"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in (first.certfile, first.keyfile):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    der = ssl.PEM_cert_to_DER_cert(first.certfile.read_text())
    assert first.fingerprint == hashlib.sha256(der).hexdigest()
    assert fingerprint_sha256(first.certfile.read_bytes()) == first.fingerprint
    os.chmod(first.keyfile, 0o644)
    again = certificate_for(dbfile)
    assert again.fingerprint == first.fingerprint
    assert stat.S_IMODE(again.keyfile.stat().st_mode) == 0o600
    first.certfile.write_text("not a certificate")
    assert certificate_for(dbfile).fingerprint != first.fingerprint


def _served_fingerprint(port: int) -> str:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_a_certificate_is_renewed_only_when_no_server_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Certificates made now are already due for renewal, so every call wants to renew.
    monkeypatch.setattr(_tls, "VALIDITY_DAYS", _tls.RENEW_DAYS - 1)
    dbfile = tmp_path / "db.sqlite"
    first = certificate_for(dbfile)
    assert certificate_for(dbfile).fingerprint != first.fingerprint  # no server: renewed
    serving = certificate_for(dbfile)
    server = Server(None, None, str(dbfile), host="127.0.0.1", certfile=serving.certfile,
                    keyfile=serving.keyfile)
    try:
        assert server.port is not None
        assert _served_fingerprint(server.port) == serving.fingerprint
        # Before, each map renewed it here and pinned the new one in its job file, which
        # the running server does not serve: every worker of that map exited.
        for _ in range(2):
            assert certificate_for(dbfile).fingerprint == serving.fingerprint
        assert _served_fingerprint(server.port) == serving.fingerprint
    finally:
        server.stop()
    assert certificate_for(dbfile).fingerprint != serving.fingerprint  # no server again


def test_two_processes_generating_at_once_leave_a_key_that_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sheepdog.server.tls")
    dbfile = tmp_path / "db.sqlite"
    key_written, go_on = threading.Event(), threading.Event()
    real_write = _tls._write_private

    def write(path: Path, data: bytes) -> None:
        real_write(path, data)
        if threading.current_thread().name == "first" and path.name == "key.pem":
            key_written.set()  # the first has written its key, not yet its certificate
            assert go_on.wait(WAIT_S)

    monkeypatch.setattr(_tls, "_write_private", write)
    got: dict[str, Any] = {}

    def make(name: str) -> None:
        got[name] = certificate_for(dbfile)

    threads = {n: threading.Thread(target=make, args=(n,), name=n) for n in ("first", "second")}
    threads["first"].start()
    assert key_written.wait(WAIT_S)
    threads["second"].start()
    # Before, the second wrote a key and certificate of its own at once; now it waits.
    assert poll_until(
        lambda: not threads["second"].is_alive() or "waits for another process" in caplog.text,
        timeout_s=WAIT_S, interval_s=0.01,
    )
    go_on.set()
    for thread in threads.values():
        thread.join(WAIT_S)
    assert got["first"].fingerprint == got["second"].fingerprint
    folder = tls_dir(dbfile)
    assert _tls._matching_pair(folder / "cert.pem", folder / "key.pem") is not None


def test_a_key_that_does_not_match_its_certificate_is_replaced(tmp_path: Path) -> None:
    dbfile = tmp_path / "db.sqlite"
    first = certificate_for(dbfile)
    other = certificate_for(tmp_path / "other.sqlite")
    first.keyfile.write_bytes(other.keyfile.read_bytes())  # as a crash between the two writes
    again = certificate_for(dbfile)
    assert again.fingerprint != first.fingerprint
    assert _tls._matching_pair(again.certfile, again.keyfile) is not None


def test_grid_engine_path_variables_in_ssh_dir_are_refused() -> None:
    # Quoting keeps them from the shell, but qsub expands $USER etc. in -wd/-o/-e paths.
    for value in ("jobs/$USER", "$HOME/x", "a${JOB_ID}"):
        with pytest.raises(ConfigError, match="ssh_dir") as info:
            Config(host="h", ssh_dir=value)
        assert info.value.key == "ssh_dir"
    assert Config(host="h", ssh_dir="$(not a variable)").ssh_dir == "$(not a variable)"


def test_tls_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="'tls'") as info:
        Config(host="h", tls="yes")  # type: ignore[arg-type]
    assert info.value.key == "tls"
    assert Config(host="h").tls is False


# -- hostile config values, with remote commands run by a local bash ----------------------


class LocalShellRemote(Remote):
    """A head node whose commands run in a local bash, with a fake qsub, and are kept.

    Running the commands for real, rather than inspecting their text, shows that
    quoting holds against an actual shell.
    """

    def __init__(self, home: Path, bin_dir: Path) -> None:
        super().__init__("headnode")
        self.home_dir, self.bin_dir = home, bin_dir
        self.commands: list[str] = []

    def run(self, command: str, *, timeout_s: float = 120.0, check: bool = True,
            stdin: bytes | None = None,
            error: type[RemoteCommandError] = RemoteCommandError) -> CommandResult:
        self.commands.append(command)
        env = {"HOME": str(self.home_dir), "PATH": f"{self.bin_dir}:/usr/bin:/bin"}
        proc = subprocess.run(["bash", "-c", command], env=env, cwd=self.home_dir,
                              capture_output=True, text=True, timeout=timeout_s, input=None)
        result = CommandResult(command, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise error(command, proc.returncode, proc.stdout, proc.stderr, host=self.host)
        return result

    def connect(self) -> Any:
        return _LocalSFTPClient()


class LocalShellGridEngine(GridEngine):
    """The real Grid Engine scheduler on a :class:`LocalShellRemote`."""

    def __init__(self, home: Path, bin_dir: Path) -> None:
        self.remote = LocalShellRemote(home, bin_dir)
        super().__init__(self.remote)
        self.commands = self.remote.commands
        self._array_limits = DEFAULT_ARRAY_LIMITS  # SGE's defaults; no qconf here


class _LocalSFTPClient:
    def open_sftp(self) -> _LocalSFTP:
        return _LocalSFTP()


class _LocalSFTP:
    def __enter__(self) -> _LocalSFTP:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def open(self, path: str, mode: str) -> Any:
        return open(path, mode + "b")

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def posix_rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def remove(self, path: str) -> None:
        os.remove(path)


def hostile_values(marker_dir: Path) -> list[str]:
    """Strings that run a command in ``marker_dir`` if they ever reach a shell unquoted."""
    m = shlex.quote(str(marker_dir))
    return [
        f"sd dir; touch {m}/pwned-semicolon $(touch {m}/pwned-dollar)",
        f"`touch {m}/pwned-backtick`",
        f"x' ; touch {m}/pwned-quote ; '",
        f'x" ; touch {m}/pwned-dquote ; "',
        f"a && touch {m}/pwned-and || touch {m}/pwned-or",
        f"a | touch {m}/pwned-pipe > {m}/pwned-redirect",
        f"$(touch {m}/pwned-subshell)/jobs",
        f"-rf {m}/pwned-option",
        f"~/$HOME/*/{m}/pwned-glob?",
        f"a\ntouch {m}/pwned-newline",
        f"a\rtouch {m}/pwned-cr",
    ]


#: Every config key that reaches a shell, a job file or an SSH command line.
KEYS = ("ssh_dir", "shell", "ge_opts", "host", "ssh_user", "queue", "pe", "mem_resource",
        "localhost")


def config_with(key: str, value: str, dbfile: str) -> dict[str, Any]:
    base: dict[str, Any] = {"host": "headnode", "localhost": "127.0.0.1", "dbfile": dbfile,
                            "shell": WORKER_PYTHON}
    if key == "ge_opts":
        base[key] = [f"-N {value}"] if not value.startswith("-") else [value]
    elif key == "pe":
        base[key] = [value, 2]
    elif key == "mem_resource":
        base.update(mem_resource=value, mem_gb=1)
    else:
        base[key] = value
    return base


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Try every hostile value in every key; record what was rejected and what was run."""
    root = tmp_path_factory.mktemp("hostile")
    markers, home, bin_dir = root / "markers", root / "home", root / "bin"
    for folder in (markers, home, bin_dir):
        folder.mkdir()
    qsub = bin_dir / "qsub"
    qsub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" >> "$HOME/../qsub-argv"\necho 4242\n')
    qsub.chmod(0o755)
    dbfile = str(root / "db.sqlite")
    outcome: dict[str, Any] = {"rejected": [], "submitted": [], "markers": markers,
                               "home": home, "root": root}
    try:
        for key in KEYS:
            for value in hostile_values(markers):
                try:
                    cfg = as_config(config_with(key, value, dbfile))
                except ConfigError as exc:
                    outcome["rejected"].append((key, value, str(exc), exc.key))
                    continue
                scheduler = LocalShellGridEngine(home, bin_dir)
                with Storage(dbfile) as storage:
                    rid = storage.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
                    job_id = submit_one(storage, cfg, rid, scheduler)
                outcome["submitted"].append((key, value, rid, job_id, scheduler.commands, cfg))
    finally:
        registry.stop(dbfile)
    return outcome


def test_hostile_values_are_rejected_naming_the_key(hostile_run: dict[str, Any]) -> None:
    for key, value, message, error_key in hostile_run["rejected"]:
        assert key in message and error_key is not None and error_key.startswith(key), (
            key, value, message)
    rejected = {key for key, *_ in hostile_run["rejected"]}
    # Line breaks never get through, whatever the key.
    for key in KEYS:
        assert key in rejected
    newline_ok = [(k, v) for k, v, *_ in hostile_run["submitted"] if "\n" in v or "\r" in v]
    assert newline_ok == []
    print(f"\nhostile config values: {len(hostile_run['rejected'])} rejected, "
          f"{len(hostile_run['submitted'])} accepted and submitted through a real shell")


def test_accepted_hostile_values_run_no_command(hostile_run: dict[str, Any]) -> None:
    assert hostile_run["submitted"], "no hostile value got as far as a shell"
    accepted_keys = {key for key, *_ in hostile_run["submitted"]}
    assert "ssh_dir" in accepted_keys and "ge_opts" in accepted_keys
    assert sorted(os.listdir(hostile_run["markers"])) == []
    home: Path = hostile_run["home"]
    with Storage(str(hostile_run["root"] / "db.sqlite")) as storage:
        names = {rid: job_file_name(rid, storage.get_secret(rid))
                 for _k, _v, rid, *_ in hostile_run["submitted"]}
    for key, value, rid, job_id, commands, cfg in hostile_run["submitted"]:
        assert job_id == "4242"
        assert any("qsub -terse" in c for c in commands)
        if key == "ssh_dir":
            # The hostile string is a literal directory name under the home directory.
            folder = home / value if not value.startswith("~/") else home / value[2:]
            job = folder / names[rid]
            assert job.is_file(), (value, commands)
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert stat.S_IMODE(job.stat().st_mode) == 0o700
            argv = (hostile_run["root"] / "qsub-argv").read_text().splitlines()
            assert str(job) in {os.path.normpath(arg) for arg in argv}
        # The job file is still valid Python with each directive on its own line.
        folder = home / cfg.ssh_dir if not cfg.ssh_dir.startswith("~/") else home / cfg.ssh_dir[2:]
        text = (folder / names[rid]).read_text()
        compile(text, "job", "exec")
        if key == "ge_opts":
            assert text.count(f"#$ {cfg.ge_opts[0]}\n") == 1


# -- secrets never logged --------------------------------------------------------------


@pytest.mark.slow
def test_secrets_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full local run, with failed authentication, logged at DEBUG everywhere."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text("#!/bin/sh\necho 77\n")
    (bin_dir / "qsub").chmod(0o755)
    dbfile = str(tmp_path / "db.sqlite")
    cfg = Config(host="headnode", localhost="127.0.0.1", dbfile=dbfile, ssh_dir="jobs",
                 shell=WORKER_PYTHON)
    outputs: list[str] = []
    server = Server(None, None, dbfile, host="127.0.0.1", log_level="debug")
    registry.shared[(os.path.abspath(dbfile), False)] = server
    try:
        with caplog.at_level(logging.DEBUG):
            with Storage(dbfile) as storage:
                rid = storage.new_request(serialise_function(square), None,
                                          serialise_args([1, 2]), settings={"lease_s": 30.0})
                secret = storage.get_secret(rid)
                submit_one(storage, cfg, rid, LocalShellGridEngine(home, bin_dir))
            job = home / "jobs" / job_file_name(rid, secret)
            # The job file names the key file; only the key file (0600) holds the secret.
            assert secret not in job.read_text()
            key = home / "jobs" / key_file_name(rid, secret)
            assert f"secret_file={str(key)!r}" in job.read_text()
            assert key.read_text() == secret + "\n"
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
            code, out, err = run_job(job)
            assert code == 0, f"{out}\n{err}"
            outputs += [out, err]
            # Failed authentication: a job file for the same request with another secret,
            # and a call signed with a near-miss of the real secret.
            bad = write_job(tmp_path / "bad", server.url_for("127.0.0.1") + "/", secret[::-1],
                            rid, 1)
            code, out, err = run_job(bad)
            assert code == 4, f"{out}\n{err}"
            outputs += [out, err]
            assert server.port is not None
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            path = f"/api/v1/requests/{rid}/lease"
            conn.request("POST", path, body=b"{}", headers={
                **signed_headers(secret, "POST", path, b"{}"), SIGNATURE_HEADER: secret})
            assert conn.getresponse().status == 401
            conn.close()
        with Storage(dbfile) as storage:
            results = [deserialise_value(v) for _a, v in storage.get_tasks_with_results(rid)]
        assert results == [1, 4]
        server_log = server.output()
    finally:
        server.stop()
        registry.shared.pop((os.path.abspath(dbfile), False), None)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    # The refusals were logged (so the check below looked at real log lines).
    assert server_log.count("bad signature") >= 2, server_log
    for text in (logged, server_log, *outputs):
        assert secret not in text
        assert secret[::-1] not in text


def test_two_databases_sharing_ssh_dir_keep_their_own_job_files(tmp_path: Path) -> None:
    # Both databases have a request 1; before, both wrote ssh_dir/sheepdog_001.py.
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text('#!/bin/sh\nprintf "%s\\n" "$@" >> "$HOME/../qsub-argv"\n'
                                  "echo 4242\n")
    (bin_dir / "qsub").chmod(0o755)
    jobs = []
    for name in ("a", "b"):
        dbfile = str(tmp_path / f"{name}.sqlite")
        cfg = Config(host="headnode", localhost="127.0.0.1", dbfile=dbfile, ssh_dir="jobs",
                     shell=WORKER_PYTHON)
        try:
            with Storage(dbfile) as storage:
                rid = storage.new_request(b"F", None, [b"x"])
                assert rid == 1
                submit_one(storage, cfg, rid, LocalShellGridEngine(home, bin_dir))
                secret = storage.get_secret(rid)
        finally:
            registry.stop(dbfile)
        jobs.append((home / "jobs" / job_file_name(rid, secret), secret))
    (job_a, secret_a), (job_b, secret_b) = jobs
    assert job_a != job_b
    submitted = (tmp_path / "qsub-argv").read_text().splitlines()
    assert str(job_a) in submitted and str(job_b) in submitted
    for job, secret, other in ((job_a, secret_a, secret_b), (job_b, secret_b, secret_a)):
        key = job.parent / key_file_name(1, secret)
        assert f"secret_file={str(key)!r}" in job.read_text()
        assert key.read_text() == secret + "\n" != other + "\n"


def test_ge_opts_keep_the_output_files_in_ssh_dir(tmp_path: Path) -> None:
    """With ge_opts set, qsub still gets -wd/-o/-e for ssh_dir: output and result reprs do
    not go to the scheduler's default place (the home directory, with the user's umask)."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "qsub").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$HOME/../argv"\necho 7\n')
    (bin_dir / "qsub").chmod(0o755)
    dbfile = str(tmp_path / "db.sqlite")
    cfg = Config(host="headnode", localhost="127.0.0.1", dbfile=dbfile, ssh_dir="jobs",
                 ge_opts=["-l h_vmem=2G"])
    try:
        with Storage(dbfile) as storage:
            rid = storage.new_request(b"F", None, [b"x"], settings={"lease_s": 30.0})
            submit_one(storage, cfg, rid, LocalShellGridEngine(home, bin_dir))
    finally:
        registry.stop(dbfile)
    argv = (tmp_path / "argv").read_text().split("\n")
    jobs = str(home / "jobs") + "/"
    for flag in ("-wd", "-o", "-e"):
        assert argv[argv.index(flag) + 1] == jobs, argv
