"""Security on a real Grid Engine: TLS end to end, private job files, hostile ssh_dir, host keys."""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cluster_fixture import check, run, ssh_connect
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import sheepdog
from sheepdog._tls import certificate_for

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
    job = f'"$HOME"/{shlex.quote(ssh_dir)}/sheepdog_{request_id:03d}.py'
    text = check(ssh, f"cat {job}")
    fingerprint = certificate_for(cfg["dbfile"]).fingerprint
    assert f"tls_fingerprint={fingerprint!r}" in text
    assert re.search(r"Client\('https://", text)
    # Job files hold the secret: owner-only, on the cluster too.
    assert remote_mode(ssh, job) == "700"
    assert remote_mode(ssh, f'"$HOME"/{shlex.quote(ssh_dir)}') == "700"


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
    assert "sheepdog_001.py" in check(ssh, f"ls {folder}").split()
    assert remote_mode(ssh, folder) == "700"
    assert remote_mode(ssh, f"{folder}/sheepdog_001.py") == "700"
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
