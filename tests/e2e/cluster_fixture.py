"""Start or find the cluster the end-to-end tests run on, and talk to it over SSH.

A cluster is described by a dict with sheepdog's own config keys (``host``, ``ssh_port``,
``ssh_user``, ``ssh_keyfile``, ``known_hosts``, ``localhost``, ``shell``), the same as the
``.cluster/*.json`` files that ``ci/cluster up`` writes, so it can be passed straight to sheepdog.
A Slurm cluster's dict also has ``"scheduler": "slurm"``; without that key the cluster runs
Grid Engine. Tests that act on the cluster behind sheepdog's back (submit a raw array job, delete
or list a job, shim a command) go through the per-scheduler helpers below, so that one test runs on
either scheduler.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# The reaper's image cannot be pulled here (no registry); we remove our containers ourselves.
# This must be set before testcontainers is first imported.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

import paramiko  # noqa: E402

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SHEEPDOG_IMAGE", "sheepdog-sge:latest")
SLURM_IMAGE = os.environ.get("SHEEPDOG_SLURM_IMAGE", "sheepdog-slurm:latest")
CONFIG_KEYS = ("host", "ssh_port", "ssh_user", "ssh_keyfile", "known_hosts", "localhost", "shell")
READY_TIMEOUT = float(os.environ.get("SHEEPDOG_CLUSTER_TIMEOUT", "240"))
USER = "sheep"


#: The Docker or Slurm cluster's containers while it runs, by node name (head, exec1, ... or
#: controller, node1, ...): for tests that act on a node as someone else (see run_as_stranger).
DOCKER_NODES: dict[str, Any] = {}
#: The firewalled Docker cluster's containers while it runs, by node name.
FIREWALLED_NODES: dict[str, Any] = {}
#: An ordinary user other than the cluster's user, made on the execution nodes when needed.
STRANGER = "stranger"


class ClusterStartError(RuntimeError):
    """The test cluster could not be started or reached; the message says why and what to do."""


# ---- talking to a cluster ----------------------------------------------------------------------


def ssh_connect(cluster: dict[str, Any], timeout: float = 20) -> paramiko.SSHClient:
    """Open an SSH connection to the cluster's head node, checking its host key strictly."""
    client = paramiko.SSHClient()
    client.load_host_keys(cluster["known_hosts"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        cluster["host"],
        port=int(cluster["ssh_port"]),
        username=cluster["ssh_user"],
        key_filename=cluster["ssh_keyfile"],
        look_for_keys=False,
        allow_agent=False,
        timeout=timeout,
        banner_timeout=timeout,
        auth_timeout=timeout,
    )
    return client


def run(client: paramiko.SSHClient, command: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run a shell command on the head node; return (exit status, stdout, stderr)."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def check(client: paramiko.SSHClient, command: str, timeout: float = 60) -> str:
    """Run a shell command on the head node and return its stdout; raise if it fails."""
    status, out, err = run(client, command, timeout)
    if status != 0:
        raise AssertionError(f"{command!r} exited with {status}\nstdout: {out}\nstderr: {err}")
    return out


def relays_on_head(cluster: dict[str, Any]) -> int:
    """How many sheepdog tunnel relays run on the head node (the [s] keeps grep from finding
    itself)."""
    client = ssh_connect(cluster)
    try:
        _, out, _ = run(client, "ps -eo args | grep -c '[s]heepdog relay' || true")
    finally:
        client.close()
    return int(out.strip() or 0)


def wait_for_job(client: paramiko.SSHClient, job_id: str, timeout: float = 180) -> None:
    """Wait until Grid Engine no longer knows job ``job_id`` (all its tasks ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, out, _ = run(client, f"qstat -j {shlex.quote(job_id)}")
        if status != 0:
            return
        time.sleep(1)
    _, qstat, _ = run(client, "qstat -f; qstat -j " + shlex.quote(job_id))
    raise AssertionError(f"job {job_id} still not finished after {timeout:.0f}s:\n{qstat}")


# Slurm job states after which a job (or array task) never runs again.
SLURM_FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


def wait_for_slurm_job(client: paramiko.SSHClient, job_id: str, timeout: float = 180) -> None:
    """Wait until every task of Slurm job ``job_id`` is in a final state.

    A failed ``squeue`` is not read as "finished": the job must be seen in final states. Once
    slurmctld has forgotten the job (MinJobAge after it ended, 5 s with accounting), squeue says
    "Invalid job id specified" and the states are read from ``sacct``.
    """
    from sheepdog.scheduler.slurm import INVALID_JOB_ID

    deadline = time.monotonic() + timeout
    command = f"squeue -h -t all -j {shlex.quote(job_id)} -o '%i %T'"
    accounting = f"sacct -n -P -X -j {shlex.quote(job_id)} -o JobID,State"
    out = ""
    while time.monotonic() < deadline:
        status, out, err = run(client, command)
        if status != 0 and INVALID_JOB_ID.match(err.strip()):
            status, out, err = run(client, accounting)
            # "CANCELLED by 1000": the state is the first word.
            out = "\n".join(line.split()[0].replace("|", " ") for line in out.splitlines()
                            if line.strip())
        states = [line.split()[-1] for line in out.splitlines() if line.strip()]
        if status == 0 and states and all(state in SLURM_FINAL_STATES for state in states):
            return
        if status != 0:
            out = f"squeue exited with {status}: {err}"
        time.sleep(1)
    raise AssertionError(f"Slurm job {job_id} still not finished after {timeout:.0f}s:\n{out}")


# ---- one test, either scheduler ----------------------------------------------------------------


def scheduler_of(cluster: dict[str, Any]) -> str:
    """The cluster's scheduler: ``"gridengine"`` (no ``scheduler`` key) or ``"slurm"``."""
    name = str(cluster.get("scheduler", "gridengine"))
    assert name in ("gridengine", "slurm"), f"a test cluster runs gridengine or slurm, not {name!r}"
    return name


def is_slurm(cluster: dict[str, Any]) -> bool:
    """True when the cluster runs Slurm."""
    return scheduler_of(cluster) == "slurm"


def hold_option(cluster: dict[str, Any]) -> str:
    """The scheduler option that submits a job held (``scheduler_opts``): released by
    :func:`release_once_served`."""
    return "--hold" if is_slurm(cluster) else "-h"


def release_once_served(
    cluster: dict[str, Any], dbfile: str, request_id: int, timeout_s: float = 300.0,
) -> threading.Thread:
    """Release the request's held job, in a thread, once a server answers on its port.

    For a test of ``sheepdog serve`` on work left by a process that has gone: held, a
    fast cluster cannot finish the tasks (through that process's server, or one an
    in-process watcher restarted) before ``serve`` looks, leaving it nothing to serve.
    """
    from sheepdog.config import as_config
    from sheepdog.net import health_problem
    from sheepdog.poll import poll_until
    from sheepdog.scheduler import open_remote
    from sheepdog.storage import Storage

    with Storage(dbfile) as storage:
        (job,) = storage.get_jobs(request_id)
    url = f"http://{job.listen_address or '127.0.0.1'}:{job.port}/"
    release = "scontrol release" if is_slurm(cluster) else "qrls"

    def run() -> None:
        assert poll_until(lambda: health_problem(url, timeout_s=2) is None,
                          timeout_s=timeout_s), f"nothing served request {request_id} at {url}"
        with open_remote(as_config(cluster)) as remote:
            remote.run(f"{release} {job.job_id}")

    thread = threading.Thread(target=run, name=f"release-{request_id}", daemon=True)
    thread.start()
    return thread


def label_of(cluster: dict[str, Any]) -> str:
    """What sheepdog calls the cluster's jobs in messages ("Grid Engine", "Slurm")."""
    from sheepdog.scheduler import scheduler_class

    return scheduler_class(scheduler_of(cluster)).label


def open_cluster_remote(cluster: dict[str, Any]) -> Any:
    """An SSH connection to the head node set up as sheepdog's scheduler sets it up.

    Grid Engine's preamble reads /etc/profile where ``qsub`` is missing, which resets PATH
    on a Slurm head node: commands there must run with Slurm's.
    """
    from sheepdog import Config
    from sheepdog.scheduler import open_remote, scheduler_class

    return open_remote(Config.from_mapping(cluster), scheduler_class(scheduler_of(cluster)))


def open_cluster_scheduler(cluster: dict[str, Any]) -> Any:
    """The cluster's :class:`~sheepdog.scheduler.Scheduler`, as sheepdog opens it."""
    from sheepdog import Config
    from sheepdog.scheduler import open_scheduler

    return open_scheduler(Config.from_mapping(cluster))


#: The raw-directives config key of each scheduler (Grid Engine's is the original's ``ge_opts``).
RAW_OPTIONS_KEY = {"gridengine": "ge_opts", "slurm": "scheduler_opts"}


def raw_options(
    cluster: dict[str, Any], *, gridengine: list[str], slurm: list[str]
) -> dict[str, Any]:
    """The config entry that passes raw scheduler options: ``gridengine``'s or ``slurm``'s."""
    name = scheduler_of(cluster)
    return {RAW_OPTIONS_KEY[name]: gridengine if name == "gridengine" else slurm}


#: Slurm job states in which a job is leaving or has left: what a deleted job ends in.
SLURM_LEAVING_STATES = frozenset({"COMPLETING", "CANCELLED"})


def job_listed(cluster: dict[str, Any], job_id: str) -> bool:
    """True while the scheduler still lists job ``job_id`` as queued, running or in error.

    A scheduler that does not answer raises: an unknown state is never read as "gone".
    """
    with open_cluster_scheduler(cluster) as scheduler:
        found = scheduler.status([job_id])
    assert found is not None, f"the {label_of(cluster)} scheduler did not answer about {job_id}"
    return job_id in found and bool(found[job_id].states - {_done_state()})


def job_deleted(cluster: dict[str, Any], job_id: str) -> bool:
    """True once job ``job_id`` has left the queue or is being deleted.

    Grid Engine: an array task that qdel caught while starting can stay ``dr``/``dt`` until its
    execd reports; Grid Engine has accepted the deletion by then. Slurm: ``CANCELLED`` or
    ``COMPLETING`` (its processes being killed).
    """
    with open_cluster_scheduler(cluster) as scheduler:
        found = scheduler.status([job_id])
    if found is None:
        return False
    job = found.get(job_id)
    if job is None or not job.states - {_done_state()}:
        return True
    if is_slurm(cluster):
        return all(state in SLURM_LEAVING_STATES | SLURM_FINAL_STATES for state in job.native)
    return all("d" in state for state in job.native)


def _done_state() -> Any:
    from sheepdog.scheduler import State

    return State.DONE


def delete_job(cluster: dict[str, Any], job_id: str) -> None:
    """Delete job ``job_id`` with the scheduler's own command (qdel, scancel); fail if it fails."""
    with open_cluster_scheduler(cluster) as scheduler:
        deletion = scheduler.delete([job_id])
    assert deletion.error is None, deletion.describe()


def delete_all_jobs(cluster: dict[str, Any]) -> None:
    """Delete every sheepdog job of the cluster's user (best effort: a test cluster of ours)."""
    user = shlex.quote(cluster["ssh_user"])
    if is_slurm(cluster):
        command = f"scancel -u {user}"
    else:
        command = f"qdel -u {user} 'sheepdog_*'"
    with open_cluster_scheduler(cluster) as scheduler:
        scheduler.host.run(command, check=False, timeout_s=60)


def delete_test_jobs(cluster: dict[str, Any], dbfile: str) -> None:
    """Delete the jobs of every request in the test's database, so no test inherits them.

    A test that ends with work open (map_async, a failure mid-map) would leave array
    tasks holding slots for ``worker_retry_s``; a test that needs a free slot (the Eqw
    test) would wait on them. Jobs that already ended are fine.
    """
    from sheepdog.storage import Storage

    if not os.path.isfile(dbfile):
        return
    with Storage(dbfile) as storage:
        job_ids = [job.job_id for request in storage.list_requests()
                   for job in storage.get_jobs(request["id"])]
    if job_ids:
        with open_cluster_scheduler(cluster) as scheduler:
            scheduler.delete(job_ids)


#: The command that lists jobs, which sheepdog's watcher runs on the head node.
STATUS_COMMAND = {"gridengine": "qstat", "slurm": "squeue"}
#: What each says when its scheduler daemon is down.
STATUS_DOWN_MESSAGE = {
    "gridengine": 'error: unable to contact qmaster using port 6444 on host "head"',
    "slurm": "slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
}


def compute_nodes(client: paramiko.SSHClient, cluster: dict[str, Any]) -> list[str]:
    """The names of the cluster's execution (compute) nodes, from the scheduler."""
    command = "sinfo -h -N -o %N" if is_slurm(cluster) else "qconf -sel"
    return sorted(set(check(client, command).split()))


def submit_smoke_array(
    client: paramiko.SSHClient, cluster: dict[str, Any], tasks: int, args: str = ""
) -> tuple[str, str]:
    """Copy the smoke task script to a fresh directory and submit it as an array job, raw.

    ``qsub -terse -t 1-N`` or ``sbatch --parsable --array=1-N``; the tasks write
    ``smoke.o<job>.<task>`` and ``smoke.e<job>.<task>`` there. Returns (job id, directory).
    """
    slurm = is_slurm(cluster)
    directory = check(client, "echo $HOME").strip() + f"/.sheepdog/smoke-{uuid.uuid4().hex[:8]}"
    check(client, f"mkdir -p {shlex.quote(directory)}")
    index_variable = "SLURM_ARRAY_TASK_ID" if slurm else "SGE_TASK_ID"
    shebang = f"#!{cluster['shell']}\n" if slurm else ""
    with client.open_sftp() as sftp:
        with sftp.open(f"{directory}/task.py", "w") as f:
            f.write(shebang + task_script(index_variable))
    d = shlex.quote(directory)
    if slurm:
        out = check(
            client,
            f"sbatch --parsable --job-name=smoke --array=1-{tasks} --chdir={d} "
            f"--output={d}/smoke.o%A.%a --error={d}/smoke.e%A.%a {d}/task.py {args}",
        )
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = out.strip().split(";")[0]
    else:
        out = check(
            client,
            f"qsub -terse -N smoke -t 1-{tasks} -S {shlex.quote(cluster['shell'])} "
            f"-wd {d} -o {d}/ -e {d}/ {d}/task.py {args}",
        )
        job_id = out.strip().split(".")[0]
    assert job_id.isdigit(), f"the submission printed {out!r}"
    return job_id, directory


def wait_for_array(
    client: paramiko.SSHClient, cluster: dict[str, Any], job_id: str, timeout: float = 180
) -> None:
    """Wait until every task of job ``job_id`` has ended, on either scheduler."""
    if is_slurm(cluster):
        wait_for_slurm_job(client, job_id, timeout)
    else:
        wait_for_job(client, job_id, timeout)


def wait_until_usable(cluster: dict[str, Any], timeout: float = READY_TIMEOUT) -> None:
    """Wait until the ordinary user can log in over SSH and query the queue, as sheepdog does."""
    deadline = time.monotonic() + timeout
    last = ""
    query = "sinfo" if cluster.get("scheduler") == "slurm" else "qstat -f -q all.q"
    while time.monotonic() < deadline:
        try:
            client = ssh_connect(cluster, timeout=10)
            try:
                status, out, err = run(client, query, timeout=20)
            finally:
                client.close()
            if status == 0:
                return
            last = f"{query} exited with {status}: {err or out}"
        except (OSError, paramiko.SSHException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    raise ClusterStartError(
        f"cannot run {query} as {cluster['ssh_user']} over SSH on "
        f"{cluster['host']}:{cluster['ssh_port']} after {timeout:.0f}s (last error: {last})"
    )


def run_as_stranger(choice: str, script: str, timeout: float = 120) -> dict[str, tuple[int, str]]:
    """Run ``python3 -c script`` as STRANGER on every execution node; return {node: (status, out)}.

    STRANGER is an ordinary user other than the one sheepdog logs in as, made here if missing:
    in the execution containers of the Docker or Slurm cluster (as root, with docker exec), or
    on this host for the native cluster, whose execution daemon runs here.
    """
    results: dict[str, tuple[int, str]] = {}
    if choice in ("docker", "slurm"):
        nodes = {n: c for n, c in DOCKER_NODES.items() if n.startswith(("exec", "node"))}
        assert nodes, f"the {choice} cluster has no execution nodes running"
        for name, container in nodes.items():
            wrapped = container.get_wrapped_container()
            made = wrapped.exec_run(
                ["sh", "-c", f"id {STRANGER} >/dev/null 2>&1 || useradd -M -s /bin/sh {STRANGER}"],
                user="root",
            )
            assert made.exit_code == 0, made.output
            done = wrapped.exec_run(["python3", "-c", script], user=STRANGER, workdir="/tmp")
            results[name] = (done.exit_code, done.output.decode(errors="replace"))
        return results
    if choice == "native":
        subprocess.run(
            ["sh", "-c", f"id {STRANGER} >/dev/null 2>&1 || useradd -M -s /bin/sh {STRANGER}"],
            check=True, timeout=timeout,
        )
        done = subprocess.run(
            ["runuser", "-u", STRANGER, "--", "python3", "-c", script],
            cwd="/tmp", capture_output=True, text=True, timeout=timeout,
        )
        results[socket.gethostname()] = (done.returncode, done.stdout + done.stderr)
        return results
    raise AssertionError(
        f"--cluster={choice}: this test needs --cluster=docker, slurm or native, where it "
        f"can make a second ordinary user ({STRANGER}) on the execution nodes"
    )


# ---- existing clusters ---------------------------------------------------------------------------


def native_cluster() -> dict[str, Any]:
    """Bring up the native cluster on this host (``ci/cluster up --native``); return its details."""
    result = subprocess.run(
        [str(REPO / "ci" / "cluster"), "up", "--native"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=READY_TIMEOUT + 600,
    )
    if result.returncode != 0:
        raise ClusterStartError(f"'ci/cluster up --native' failed:\n{result.stdout}")
    return load_config(REPO / ".cluster" / "native.json")


def load_config(path: Path) -> dict[str, Any]:
    """Read a cluster.json file, checking that it has every connection key."""
    config: dict[str, Any] = json.loads(path.read_text())
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ClusterStartError(f"{path} lacks {', '.join(missing)}")
    return config


def ssh_url_cluster(url: str, options: dict[str, str | None]) -> dict[str, Any]:
    """Describe an existing cluster given as ``ssh://user@host:port`` plus key/host-key options."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname or not parts.username:
        raise ClusterStartError(f"--cluster={url}: expected ssh://user@host[:port]")
    keyfile = options.get("keyfile")
    known_hosts = options.get("known_hosts") or str(Path("~/.ssh/known_hosts").expanduser())
    if not keyfile:
        raise ClusterStartError(
            "--cluster=ssh://... needs --cluster-keyfile (or SHEEPDOG_TEST_KEYFILE): the private "
            "key that logs in to the head node"
        )
    return {
        "host": parts.hostname,
        "ssh_port": parts.port or 22,
        "ssh_user": parts.username,
        "ssh_keyfile": str(Path(keyfile).expanduser().resolve()),
        "known_hosts": str(Path(known_hosts).expanduser().resolve()),
        "localhost": options.get("localhost") or socket.getfqdn(),
        "shell": options.get("shell") or "/usr/bin/python3",
    }


# ---- the Docker cluster --------------------------------------------------------------------------


def build_image(which: str = "--sge") -> None:
    """Build a cluster image (and its debootstrapped base when missing) with ci/build-image.

    ``which`` is ci/build-image's flag: ``--sge`` or ``--slurm``.
    """
    result = subprocess.run(
        [str(REPO / "ci" / "build-image"), which],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise ClusterStartError(f"ci/build-image {which} failed:\n{result.stdout}")


def _write_key_pair(directory: Path) -> tuple[Path, str]:
    """Make an ed25519 key pair in ``directory``; return the private key path and public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = directory / "id_ed25519"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode() + " sheepdog-tests"


def _gateway_of(node: Any) -> str:
    """The address host.docker.internal has on a node: where the server must listen.

    The server listens only where the workers reach this machine, not everywhere, and
    host.docker.internal (the Docker host's gateway) resolves only inside the containers.
    """
    code, found = node.exec(["getent", "ahostsv4", "host.docker.internal"])
    if code != 0 or not found.split():
        raise ClusterStartError(f"host.docker.internal does not resolve on a node: {found!r}")
    return str(found.split()[0].decode())


def _logs(containers: list[Any]) -> str:
    chunks = []
    for name, container in containers:
        try:
            text = container.get_wrapped_container().logs(tail=60).decode(errors="replace")
        except Exception as exc:  # noqa: BLE001 - best effort while reporting another failure
            text = f"(no logs: {exc})"
        chunks.append(f"--- {name} ---\n{text}")
    return "\n".join(chunks)


#: Where host.docker.internal points on the firewalled cluster: TEST-NET-1 (RFC 5737), an
#: address routed nowhere, as this machine is from a cluster behind NAT or a firewall.
UNROUTED_ADDRESS = "192.0.2.1"


@contextmanager
def docker_cluster(
    workdir: Path, exec_nodes: int = 2, *, firewalled: bool = False
) -> Iterator[dict[str, Any]]:
    """Start a head node and ``exec_nodes`` execution nodes with testcontainers; remove them after.

    The nodes share a private network and a volume for /home (so job output is visible from the
    head node, as on a real cluster); SSH is published on a random port of 127.0.0.1.

    ``firewalled``: no node has a route to this machine, as on a cluster whose users sit
    behind NAT or a VPN. The nodes are on an internal network (Docker forwards nothing from
    it), the name the workers are given for this machine (host.docker.internal) points at an
    address routed nowhere, and the server listens on this machine's loopback only. This
    machine reaches the head node's SSH at its address on that network (only it can).
    """
    nodes = [("head", {"SGE_ROLE": "head"})] + [
        (f"exec{i}", {"SGE_ROLE": "exec"}) for i in range(1, exec_nodes + 1)
    ]
    with _container_cluster(
        workdir, kind="Docker", image=IMAGE, build_flag="--sge", prefix="sheepdog",
        env={"SGE_MASTER": "head"}, nodes=nodes,
        status_command=["/usr/local/sbin/sge-setup", "status", str(exec_nodes)], extra={},
        firewalled=firewalled,
    ) as (cluster, containers):
        # Each kind of cluster has its own registry: both may run in one session.
        nodes_of = FIREWALLED_NODES if firewalled else DOCKER_NODES
        nodes_of.update(containers)
        try:
            yield cluster
        finally:
            nodes_of.clear()


@contextmanager
def _container_cluster(
    workdir: Path,
    *,
    kind: str,
    image: str,
    build_flag: str,
    prefix: str,
    env: dict[str, str],
    nodes: list[tuple[str, dict[str, str]]],
    status_command: list[str],
    extra: dict[str, Any],
    firewalled: bool = False,
) -> Iterator[tuple[dict[str, Any], list[tuple[str, Any]]]]:
    """Start ``nodes`` (the first is the SSH login node) on a private network; remove them after.

    Yields the cluster's config keys and the (name, container) pairs. Whatever was started is
    removed when a later step fails, and the error carries the containers' logs.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    engine = _docker_engine()
    build_image(build_flag)
    started = time.monotonic()
    keyfile, public_key = _write_key_pair(workdir)
    suffix = uuid.uuid4().hex[:8]
    volume = engine.volumes.create(f"{prefix}-home-{suffix}")
    network = Network(docker_network_kw={"internal": True} if firewalled else None).create()
    gateway = UNROUTED_ADDRESS if firewalled else "host-gateway"
    containers: list[tuple[str, Any]] = []
    try:
        for name, role_env in nodes:
            container = (
                DockerContainer(image)
                .with_name(f"{prefix}-{name}-{suffix}")
                .with_network(network)
                .with_network_aliases(name)
                .with_volume_mapping(volume.name, "/home", "rw")
                .with_kwargs(
                    hostname=name,
                    init=True,
                    extra_hosts={"host.docker.internal": gateway},
                )
            )
            for key, value in {**env, **role_env, "SHEEPDOG_USER": USER,
                               "SHEEPDOG_AUTHORIZED_KEYS": public_key}.items():
                container.with_env(key, value)
            if not containers and not firewalled:
                # Only on the loopback interface, like the compose files; a random free port.
                container.ports["22/tcp"] = ("127.0.0.1",)  # type: ignore[assignment]
            containers.append((name, container))
            container.start()
        login = containers[0][1]
        _wait_ready(login, status_command, containers)
        if firewalled:
            # No published port: a port published from an internal network is not forwarded.
            login.get_wrapped_container().reload()
            ssh_host, port = _address_on(login, network), 22
        else:
            ssh_host, port = "127.0.0.1", int(login.get_exposed_port(22))
        known_hosts = workdir / "known_hosts"
        _known_hosts_of(login, port, known_hosts, ssh_host)
        cluster = {
            "host": ssh_host,
            "ssh_port": port,
            "ssh_user": USER,
            "ssh_keyfile": str(keyfile),
            "known_hosts": str(known_hosts),
            "localhost": "host.docker.internal",
            # Firewalled: where no node can reach, this machine's loopback.
            "listen_address": "127.0.0.1" if firewalled else _gateway_of(login),
            "shell": "/usr/bin/python3",
            # SHEEPDOG_TEST_SSH_CLIENT=openssh runs a suite through OpenSSH's master connection.
            **({"ssh_client": os.environ["SHEEPDOG_TEST_SSH_CLIENT"]}
               if os.environ.get("SHEEPDOG_TEST_SSH_CLIENT") else {}),
            **extra,
        }
        wait_until_usable(cluster)
        logger.info("%s cluster ready in %.1f s", kind, time.monotonic() - started)
    except Exception as exc:
        logs = _logs(containers)
        _remove(containers, network, volume)
        raise ClusterStartError(f"the {kind} test cluster did not start: {exc}\n{logs}") from exc
    try:
        yield cluster, containers
    finally:
        _remove(containers, network, volume)


def _docker_engine() -> Any:
    """A client of the local Docker engine; ClusterStartError when none answers."""
    try:
        import docker

        engine = docker.from_env()  # type: ignore[attr-defined]
        engine.ping()
    except Exception as exc:
        raise ClusterStartError(
            f"no Docker engine answers ({exc}); start it (the Docker and Slurm clusters need one), "
            "or run the Grid Engine tests with --cluster=native"
        ) from exc
    return engine


def _address_on(container: Any, network: Any) -> str:
    """The container's IP address on ``network`` (a testcontainers Network)."""
    networks = container.get_wrapped_container().attrs["NetworkSettings"]["Networks"]
    address = networks.get(network.name, {}).get("IPAddress")
    if not address:
        raise ClusterStartError(f"the head node has no address on network {network.name}")
    return str(address)


def _known_hosts_of(container: Any, port: int, path: Path, host: str = "127.0.0.1") -> None:
    """Write ``path`` as a known_hosts file for host:port from the container's host keys."""
    code, keys = container.exec(["sh", "-c", "cat /etc/ssh/ssh_host_*_key.pub"])
    if code != 0 or not keys.strip():
        raise ClusterStartError(f"could not read the node's SSH host keys (exit {code})")
    entry = host if port == 22 else f"[{host}]:{port}"
    path.write_text(
        "".join(
            f"{entry} {' '.join(line.split()[:2])}\n"
            for line in keys.decode().splitlines()
            if line.strip()
        )
    )


@contextmanager
def slurm_cluster(
    workdir: Path, compute_nodes: int = 2, *, accounting: bool = True, primary: bool = True,
) -> Iterator[dict[str, Any]]:
    """Start a Slurm controller and ``compute_nodes`` compute nodes; remove them after.

    The controller (slurmctld) is also the SSH login node, published on a random port of
    127.0.0.1; the compute nodes (slurmd) are ``node1`` .. ``nodeN``. All share a private network
    and a volume for /home, as in docker/slurm/compose.yaml.

    ``accounting``: slurmdbd keeps accounting (sacct answers) and slurmctld forgets a finished
    job after MinJobAge=5 s, as most real sites run it; without, scontrol knows a finished job
    for 300 s and sacct does not answer, as on a site without accounting.

    ``primary``: its containers are the ones :data:`DOCKER_NODES` names (the session's
    ``cluster``). A second cluster beside it must not take those names over: the tests
    after it would freeze, reconfigure and read the wrong cluster's nodes.
    """
    nodes = [("controller", {"SLURM_ROLE": "controller"})] + [
        (f"node{i}", {"SLURM_ROLE": "compute"}) for i in range(1, compute_nodes + 1)
    ]
    with _container_cluster(
        workdir, kind="Slurm", image=SLURM_IMAGE, build_flag="--slurm", prefix="sheepdog-slurm",
        env={"SLURM_CONTROLLER": "controller", "SLURM_COMPUTE_NODES": str(compute_nodes),
             "SLURM_ACCOUNTING": "1" if accounting else "0"},
        nodes=nodes,
        status_command=["/usr/local/sbin/slurm-setup", "status", str(compute_nodes)],
        extra={"scheduler": "slurm"},
    ) as (cluster, containers):
        if not primary:
            yield cluster
            return
        DOCKER_NODES.update(containers)
        try:
            yield cluster
        finally:
            DOCKER_NODES.clear()


def _wait_ready(head: Any, status_command: list[str], containers: list[Any]) -> None:
    """Wait until ``status_command`` succeeds in the head container; fail if a container exits."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = b""
    while time.monotonic() < deadline:
        code, last = head.exec(status_command)
        if code == 0:
            return
        for name, container in containers:
            container.get_wrapped_container().reload()
            if container.get_wrapped_container().status == "exited":
                raise ClusterStartError(f"container {name} exited")
        time.sleep(1)
    raise ClusterStartError(
        f"cluster not ready after {READY_TIMEOUT:.0f}s: {last.decode(errors='replace')}"
    )


def _remove(containers: list[Any], network: Any, volume: Any) -> None:
    for name, container in reversed(containers):
        try:
            container.stop()
        except Exception:  # keep removing the rest
            logger.warning("could not remove container %s", name, exc_info=True)
    for thing in (network, volume):
        try:
            thing.remove()
        except Exception:
            logger.warning("could not remove %s", thing, exc_info=True)


@contextmanager
def recording_http_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on this machine that answers every GET with "ok" and records its path.

    Yields the port and the list of paths seen, for tests whose array tasks call back.
    """
    seen: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server calls it by this name
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def task_script(index_variable: str) -> str:
    """The smoke tests' array task: prints its index and host, or calls back to a URL first.

    ``index_variable`` is the scheduler's array index (``SGE_TASK_ID``, ``SLURM_ARRAY_TASK_ID``).
    Without a URL argument a task holds its slot for 2 s, so 10 tasks cannot all fit on one node.
    """
    return f"""\
import json, os, socket, sys, time, urllib.request
task = int(os.environ["{index_variable}"])
url = sys.argv[1] if len(sys.argv) > 1 else ""
if url:
    with urllib.request.urlopen("%s/task/%d" % (url, task), timeout=30) as reply:
        reply.read()
else:
    time.sleep(2)
print(json.dumps({{"task": task, "host": socket.gethostname()}}))
"""


def parse_task_outputs(text: str, errors: str) -> dict[int, str]:
    """Map task index to host from the smoke tasks' stdout; fail if any task wrote to stderr."""
    # Any error output means a task went wrong, even if other tasks printed their line.
    assert not errors.strip(), f"tasks wrote errors:\n{errors}"
    found = {}
    for line in text.splitlines():
        record = json.loads(line)
        found[record["task"]] = record["host"]
    return found


def task_outputs(client: paramiko.SSHClient, directory: str, job_id: str) -> dict[int, str]:
    """Map task index to the host it ran on, from the smoke job's output files in ``directory``."""
    d = shlex.quote(directory)
    text = check(client, f"cat {d}/smoke.o{job_id}.* 2>/dev/null || true")
    errors = check(client, f"cat {d}/smoke.e{job_id}.* 2>/dev/null || true")
    return parse_task_outputs(text, errors)


# ---- a map running while the test acts -------------------------------------------------


def map_in_thread(
    f: Any, args: Any, config: Any
) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``sheepdog.map`` in a thread; its results or error land in the returned dict."""
    import sheepdog

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["results"] = sheepdog.map(f, args, config, verbose=False)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# ---- a login node that asks for a one-time code ------------------------------------------------

#: The drop-in that docker/mfa-setup writes; removing it turns the second factor off again.
MFA_DROP_IN = "/etc/ssh/sshd_config.d/50-sheepdog-mfa.conf"


def _put_file(container: Any, directory: str, name: str, data: bytes, mode: int) -> None:
    """Copy ``data`` into the container as ``directory/name`` (root's), never via a command line."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))
    if not container.get_wrapped_container().put_archive(directory, buffer.getvalue()):
        raise ClusterStartError(f"could not copy {name} into the container")


def _as_root(container: Any, command: list[str]) -> str:
    done = container.get_wrapped_container().exec_run(command, user="root")
    output = done.output.decode(errors="replace")
    if done.exit_code != 0:
        raise ClusterStartError(f"{command} failed in the container ({done.exit_code}): {output}")
    return str(output)


def login_node(cluster: dict[str, Any]) -> Any:
    """The Docker or Slurm cluster's login node (the container sshd runs in)."""
    return DOCKER_NODES["controller" if is_slurm(cluster) else "head"]


def logs_in_with_key_only(cluster: dict[str, Any]) -> bool:
    """Whether a key alone logs in (no second factor); False while sshd restarts.

    Only the key is offered: paramiko's SSHClient would answer a code prompt by reading
    stdin, in its transport thread, which under pytest raises and ends that thread with an
    unhandled exception (an error in whichever test runs then).
    """
    key = paramiko.PKey.from_path(cluster["ssh_keyfile"])
    known = paramiko.HostKeys(cluster["known_hosts"])
    try:
        sock = socket.create_connection((cluster["host"], int(cluster["ssh_port"])), timeout=5)
    except OSError:
        return False
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = transport.auth_timeout = 5
        transport.start_client(timeout=5)
        entry = (cluster["host"] if int(cluster["ssh_port"]) == 22
                 else f"[{cluster['host']}]:{cluster['ssh_port']}")
        server_key = transport.get_remote_server_key()
        if not known.check(entry, server_key):
            return False
        more = transport.auth_publickey(cluster["ssh_user"], key)
        return transport.is_authenticated() and not more
    except (paramiko.SSHException, OSError, EOFError):
        return False  # refused, reset, no banner yet
    finally:
        transport.close()


def enable_mfa(cluster: dict[str, Any], secret_b32: str) -> None:
    """Make the login node ask for the TOTP of ``secret_b32`` after the key (docker/mfa-setup)."""
    node = login_node(cluster)
    _put_file(node, "/root", "mfa-setup", (REPO / "docker" / "mfa-setup").read_bytes(), 0o700)
    _put_file(node, "/root", "totp-secret", f"{secret_b32}\n".encode(), 0o600)
    _as_root(node, ["/root/mfa-setup", "/root/totp-secret"])


def disable_mfa(cluster: dict[str, Any]) -> None:
    """Undo :func:`enable_mfa`: the drop-in goes, sshd reloads, keys alone log in again."""
    node = login_node(cluster)
    _as_root(node, ["sh", "-c", f"rm -f {MFA_DROP_IN} /etc/sheepdog/totp && "
                    "for p in /run/sshd-sheepdog-*.pid; do kill -HUP $(cat $p); done"])
