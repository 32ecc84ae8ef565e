"""Security on a real cluster: TLS end to end, private job files, hostile ssh_dir, host keys."""

from __future__ import annotations

import json
import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cluster_fixture import (
    STRANGER,
    check,
    is_slurm,
    raw_options,
    run,
    run_as_stranger,
    ssh_connect,
    wait_for_array,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import sheepdog
from sheepdog.job_file import job_file_name, key_file_name
from sheepdog.poll import poll_until
from sheepdog.server.tls import certificate_for
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e


def cube(x: int) -> int:
    return x**3


@pytest.fixture
def ssh(cluster: dict[str, Any]) -> Iterator[paramiko.SSHClient]:
    client = ssh_connect(cluster)
    yield client
    client.close()


def remote_mode(ssh: paramiko.SSHClient, path: str) -> str:
    return check(ssh, f"stat -c %a {path}").strip()


def test_tls_round_trip_with_pinned_certificate(
    config: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    ssh_dir = f".sheepdog/tls-{uuid.uuid4().hex[:8]}"
    cfg = dict(config, tls=True, ssh_dir=ssh_dir)
    request_id = sheepdog.map_async(cube, range(1, 7), cfg)
    results = sheepdog.get_results(request_id, cfg["dbfile"], timeout_s=300)
    assert [r for _, r in results] == [x**3 for x in range(1, 7)]
    assert sheepdog.get_errors(request_id, cfg["dbfile"]) == []
    # The job file on the head node talks https and pins this database's certificate.
    with Storage(cfg["dbfile"]) as storage:
        secret = storage.get_secret(request_id)
    job = f'"$HOME"/{shlex.quote(ssh_dir)}/{job_file_name(request_id, secret)}'
    key = f'"$HOME"/{shlex.quote(ssh_dir)}/{key_file_name(request_id, secret)}'
    text = check(ssh, f"cat {job}")
    assert secret not in text
    assert check(ssh, f"cat {key}").strip() == secret
    fingerprint = certificate_for(cfg["dbfile"]).fingerprint
    assert f"tls_fingerprint={fingerprint!r}" in text
    assert re.search(r"Client\('https://", text)
    # Key files hold the secret: owner-only, on the cluster too, as are job files.
    assert remote_mode(ssh, key) == "600"
    assert remote_mode(ssh, job) == "700"
    assert remote_mode(ssh, f'"$HOME"/{shlex.quote(ssh_dir)}') == "700"


def hold_until(marker: str) -> str:
    """Keep the array task running until ``marker`` exists (bounded), then name the node."""
    import os
    import socket
    import time

    deadline = time.monotonic() + 300
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return socket.gethostname()


# Run as another ordinary user on an execution node: look for the secret wherever a stranger
# can read. argv[1] is the secret reversed (so this scanner's own command line never holds
# it), argv[2] what marks a worker's command line, argv[3] the spool's job scripts (globs).
SCAN = r"""
import glob, json, os, sys
secret, mark, spool = sys.argv[1][::-1].encode(), sys.argv[2], json.loads(sys.argv[3])
found = {"hits": [], "scripts": [], "unreadable": [], "procs": 0, "workers": 0}
paths = set()
for pattern in spool:
    paths.update(glob.glob(pattern, recursive=True))
for path in sorted(paths):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        found["unreadable"].append(path)
        continue
    found["scripts"].append(path)
    if secret in data:
        found["hits"].append(path)
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for what in ("cmdline", "environ"):
        try:
            with open("/proc/%s/%s" % (pid, what), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if what == "cmdline":
            found["procs"] += 1
            found["workers"] += mark.encode() in data
        if secret in data:
            found["hits"].append("/proc/%s/%s" % (pid, what))
print(json.dumps(found))
"""


def test_a_stranger_on_an_execution_node_cannot_find_the_secret(
    config: dict[str, Any], ssh: paramiko.SSHClient, request: pytest.FixtureRequest
) -> None:
    """While a job runs, another user on the nodes finds the secret nowhere they can read.

    Grid Engine copies each job script world-readable into the execution node's spool
    (job_scripts/<job id>), and command lines are world-readable in /proc: before, the job
    script's last line held the secret. Slurm spools it as job<id>/slurm_script, in a
    directory of the job's user.
    """
    ssh_dir = f".sheepdog/stranger-{uuid.uuid4().hex[:8]}"
    home = check(ssh, 'printf %s "$HOME"')
    marker = f"{home}/{ssh_dir}/release"
    cfg = dict(config, ssh_dir=ssh_dir, workers=2)
    request_id = sheepdog.map_async(hold_until, [marker, marker], cfg)
    try:
        with Storage(cfg["dbfile"]) as storage:
            secret = storage.get_secret(request_id)
            assert poll_until(lambda: storage.task_counts(request_id).get("leased", 0) >= 2,
                              timeout_s=240, interval_s=0.5), storage.task_counts(request_id)
            (job,) = [j.job_id for j in storage.get_jobs(request_id)]
        choice = request.config.getoption("--cluster")
        if is_slurm(cfg):
            mark, spool = "/slurm_script", ["/var/spool/slurmd/**/slurm_script"]
        else:
            mark = f"job_scripts/{job}"
            spool = [f"{root}/**/job_scripts/*"
                     for root in ("/var/spool/gridengine", "/var/lib/gridengine")]
        reports = {}
        argv = [secret[::-1], mark, json.dumps(spool)]
        for node, (status, out) in run_as_stranger(
            choice, f"import sys; sys.argv[1:] = {argv!r}\n{SCAN}"
        ).items():
            assert status == 0, f"the scan as {STRANGER} failed on {node}: {out}"
            reports[node] = json.loads(out.strip().splitlines()[-1])
    finally:
        check(ssh, f"touch {shlex.quote(marker)}")
    assert all(not r["hits"] for r in reports.values()), reports
    # The scan was not blind: the stranger saw the workers' command lines and, on Grid
    # Engine, read this job's spooled script (Slurm's spool directory is the user's alone).
    assert sum(r["workers"] for r in reports.values()) >= 1, reports
    if not is_slurm(cfg):
        spooled = [p for r in reports.values() for p in r["scripts"]
                   if p.endswith(f"/job_scripts/{job}")]
        assert spooled, reports
    results = sheepdog.get_results(request_id, cfg["dbfile"], timeout_s=300)
    assert all(isinstance(host, str) and host for _, host in results), results


def test_hostile_ssh_dir_is_a_literal_directory(
    config: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    token = uuid.uuid4().hex[:8]
    # With $USER in it, Grid Engine itself would expand the -wd path: Config refuses that.
    with pytest.raises(sheepdog.ConfigError, match="ssh_dir"):
        sheepdog.map(cube, [2], dict(config, ssh_dir=f"sd; touch /tmp/pwned-{token}-$USER"))
    ssh_dir = (f"sd dir {token}; touch /tmp/pwned-{token} $(touch /tmp/pwned2-{token}) "
               f"`touch /tmp/pwned3-{token}` 'q\"")
    cfg = dict(config, ssh_dir=ssh_dir)
    assert sheepdog.map(cube, [2, 3], cfg, verbose=False) == [8, 27]
    folder = f'"$HOME"/{shlex.quote(ssh_dir)}'
    with Storage(cfg["dbfile"]) as storage:
        name = job_file_name(1, storage.get_secret(1))
    assert name in check(ssh, f"ls {folder}").split()
    assert remote_mode(ssh, folder) == "700"
    assert remote_mode(ssh, f"{folder}/{name}") == "700"
    status, out, err = run(ssh, f"ls -d /tmp/*{token}* 2>&1")
    assert status != 0 and "No such file" in out + err, out
    # Nothing was created on this machine either (the native cluster shares /tmp).
    assert not list(Path("/tmp").glob(f"*pwned*{token}*"))


def test_unknown_host_key_is_refused(config: dict[str, Any], tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(sheepdog.HostKeyError, match="ssh-keyscan") as info:
        sheepdog.map(cube, [1], dict(config, known_hosts=str(empty)), verbose=False)
    assert "never accepts unknown keys" in str(info.value)


def _other_key(key_type: str) -> str:
    """A freshly generated public key of ``key_type``, in known_hosts form."""
    private: Any
    if key_type == "ssh-ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif key_type.startswith("ecdsa-sha2-nistp"):
        curve = {"256": ec.SECP256R1(), "384": ec.SECP384R1(), "521": ec.SECP521R1()}
        private = ec.generate_private_key(curve[key_type[-3:]])
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


def test_a_changed_host_key_is_refused(config: dict[str, Any], tmp_path: Path) -> None:
    lines = []
    for line in Path(config["known_hosts"]).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            host, key_type, *_ = line.split()
            lines.append(f"{host} {_other_key(key_type)}")
    assert lines, f"{config['known_hosts']} has no keys"
    forged = tmp_path / "known_hosts"
    forged.write_text("\n".join(lines) + "\n")
    with pytest.raises(sheepdog.HostKeyError, match="does NOT match"):
        sheepdog.map(cube, [1], dict(config, known_hosts=str(forged)), verbose=False)


def test_a_node_that_cannot_see_the_key_file_says_why(
    config: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    """As on execution nodes that do not share ssh_dir: the .e file says what to fix.

    The job is held, its key file removed, then released: on every cluster the worker
    then runs without the file, as it would on a node that does not mount ssh_dir.
    """
    ssh_dir = f".sheepdog/unshared-{uuid.uuid4().hex[:8]}"
    folder = check(ssh, 'printf %s "$HOME"') + "/" + ssh_dir
    held = raw_options(
        config,
        gridengine=["-h", f"-wd {folder}", f"-o {folder}/", f"-e {folder}/"],
        slurm=["--hold", f"--chdir={folder}", f"--output={folder}/out.%A.%a",
               f"--error={folder}/err.%A.%a"],
    )
    cfg = dict(config, ssh_dir=ssh_dir, **held)
    request_id = sheepdog.map_async(cube, [2], cfg)
    with Storage(cfg["dbfile"]) as storage:
        secret = storage.get_secret(request_id)
        (job,) = [j.job_id for j in storage.get_jobs(request_id)]
    check(ssh, f"rm {shlex.quote(folder + '/' + key_file_name(request_id, secret))}")
    check(ssh, f"scontrol release {job}" if is_slurm(config) else f"qrls {job}")
    wait_for_array(ssh, config, job, timeout=240)
    name = job_file_name(request_id, secret)
    error_files = f"err.{job}.*" if is_slurm(config) else f"{name}.e{job}.*"
    errors = check(ssh, f"cat {shlex.quote(folder)}/{error_files} 2>/dev/null || true")
    assert "the request's secret file" in errors and "does not exist on" in errors, errors
    assert "the execution nodes must see ssh_dir at the same path" in errors, errors
    assert "Traceback" not in errors and "Client(" not in errors, errors
