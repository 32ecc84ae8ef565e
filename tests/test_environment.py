"""The environment on the nodes: module versions reported by workers and by doctor's probe.

The worker side runs for real (the stub's functions, a real job file run by the
Debian Python, which has no Flask, against a real server); the Docker cluster's
end-to-end test is tests/e2e/test_environment_e2e.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from server_helpers import Api, error_of, lease_body
from stubrunner import WORKER_PYTHON
from test_executor import local_config
from test_integration_local import Setup, finish

import sheepdog
from sheepdog import cli
from sheepdog.client import stub
from sheepdog.config import Config
from sheepdog.doctor import FAIL, OK, WARN, _Doctor, check_modules_of, probe_job_file
from sheepdog.environment import compare, local_versions, mismatch_warning, payload_modules
from sheepdog.errors import ConfigError
from sheepdog.scheduler import GridEngine
from sheepdog.serialisation import serialise_function
from sheepdog.server import create_app
from sheepdog.server.protocol import MAX_MODULES
from sheepdog.storage import Storage

FLASK = local_versions(["flask"])["flask"][1]


def uses_flask(x: int) -> str:
    return f"{flask.__name__}{x}"


# -- the stub's report -----------------------------------------------------------------------


def test_module_version_says_whether_it_imports_and_its_version() -> None:
    assert stub.module_version("flask") == [True, FLASK] and FLASK
    missing = stub.module_version("no_such_module_here")
    assert missing[0] is False and "ModuleNotFoundError" in missing[1]
    assert stub.MAX_MODULES == MAX_MODULES  # the server's bound is the stub's


def test_the_payload_names_its_modules_and_the_report_leaves_out_the_stdlib() -> None:
    import json as stdlib_json

    def both(x: int) -> str:
        return stdlib_json.dumps(uses_flask(x))

    assert payload_modules(serialise_function(both)) == ["flask"]
    report = stub.environment({"flask", "json", "builtins", "__main__"})
    assert report == {"python": stub.platform.python_version(), "modules": {"flask": [True, FLASK]}}


def test_a_worker_reports_its_environment_once_with_its_first_lease(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        rid = setup.request(len, [[1], [1, 2], [1, 2, 3]])
        # The Debian Python plays the worker; its report is what its payload names.
        code, out, err = finish(setup.start(setup.job(rid, 3, batch=1), 1))
        assert code == 0, f"{out}\n{err}"
        reports = setup.storage.worker_environments(rid)
        assert len(reports) == 1, reports  # one worker, one report, three leases
        assert reports[0]["python"] == subprocess.run(
            [WORKER_PYTHON, "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        assert reports[0]["modules"] == {}  # len is a builtin: nothing to compare
    finally:
        setup.close()


# -- the server keeps it -------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    with Storage(str(tmp_path / "server.sqlite")) as storage:
        yield storage


@pytest.fixture
def api(db: Storage, tmp_path: Path) -> Api:
    rid = db.new_request(b"FUNCTION", None, [b"a", b"b"], settings={"lease_s": 30.0})
    app = create_app(str(tmp_path / "server.sqlite"), max_body_bytes=64 * 1024)
    return Api(app.test_client(), rid, db.get_secret(rid))


def test_the_server_keeps_a_lease_s_environment(api: Api, db: Storage) -> None:
    env = {"python": "3.9.2", "modules": {"numpy": [True, "1.19.5"], "scipy": [False, "gone"]}}
    response = api.call("POST", "lease", dict(lease_body(1), environment=env))
    assert response.status_code == 200
    assert db.worker_environments(api.rid) == [
        {"worker": "w1", "host": "node1", **env}]
    assert api.call("POST", "lease", lease_body(1)).status_code == 200  # optional
    assert len(db.worker_environments(api.rid)) == 1


@pytest.mark.parametrize("env", [
    "3.9", {"python": 3, "modules": {}}, {"python": "3.9"},
    {"python": "3.9", "modules": {"numpy": "1.0"}},
    {"python": "3.9", "modules": {"numpy": [1, "1.0"]}},
    {"python": "3.9", "modules": {f"m{i}": [True, None] for i in range(MAX_MODULES + 1)}},
    {"python": "3.9", "modules": {"numpy": [True, "x" * 1000]}},
])
def test_a_malformed_environment_is_a_400_that_says_its_shape(
    api: Api, db: Storage, env: Any
) -> None:
    error = error_of(api.call("POST", "lease", dict(lease_body(1), environment=env)), 400)
    assert error["code"] == "bad_field" and "'environment' must be" in error["message"]
    assert db.task_counts(api.rid).get("leased", 0) == 0


# -- the warning at map time -----------------------------------------------------------------


def test_the_warning_names_each_mismatched_module_and_both_versions() -> None:
    reports = [
        {"host": "node1", "python": "3.9.2", "modules": {"flask": [True, "0.1"],
                                                         "numpy": [True, "1.0"]}},
        {"host": "node2", "python": "3.9.2", "modules": {"flask": [True, "0.1"]}},
    ]
    here = {"flask": [True, "3.1.3"], "numpy": [True, "1.0"]}
    warning = mismatch_warning(7, reports, lambda names: here)
    assert warning is not None
    assert warning.startswith("request 7: the workers' modules differ from this machine's")
    assert "flask: 0.1 on node1 (Python 3.9.2), 3.1.3 here" in warning
    assert "node2" in warning and "numpy" not in warning
    assert mismatch_warning(7, reports[1:], lambda names: {"flask": [True, "0.1"]}) is None


def test_a_map_warns_once_when_a_workers_module_version_differs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's flask is a stand-in package of version 0.0.1, found by its prologue."""
    fake = tmp_path / "node-site" / "flask"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\n')
    config = local_config(tmp_path, prologue=[f"PYTHONPATH={fake.parent}",
                                              "export PYTHONPATH"])
    with caplog.at_level(logging.WARNING, logger="sheepdog"):
        assert sheepdog.map(uses_flask, range(4), config, timeout_s=120) == [
            f"flask{i}" for i in range(4)]
    said = [r.getMessage() for r in caplog.records if "modules differ" in r.getMessage()]
    assert len(said) == 1, said
    assert f"flask: 0.0.1 on {stub.socket.gethostname()}" in said[0]
    assert f"{FLASK} here" in said[0]


# -- sheepdog doctor --check -----------------------------------------------------------------


def run_probe(tmp_path: Path, modules: list[str]) -> dict[str, Any]:
    """doctor's probe job file, run by the Debian Python as an execution node would."""
    config = Config(host="headnode", shell=WORKER_PYTHON)
    out = tmp_path / "answer.json"
    job = tmp_path / "probe.py"
    job.write_text(probe_job_file(config, GridEngine, str(out), [], modules=modules))
    done = subprocess.run([WORKER_PYTHON, str(job)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(out.read_text()))


def test_doctor_check_marks_a_missing_module_as_a_blocker(tmp_path: Path) -> None:
    found = run_probe(tmp_path, ["flask", "json"])
    assert found["modules"]["flask"][0] is False  # the Debian Python has no Flask
    assert found["modules"]["json"][0] is True
    run = _Doctor(Config(host="headnode", shell=WORKER_PYTHON), 10.0, lambda check: None)
    run.modules = ["flask", "json"]
    run.check_modules(found)
    flask_check, json_check = run.report.checks
    assert (flask_check.name, flask_check.status) == ("module flask", FAIL)
    assert flask_check.detail.startswith(f"flask: missing on {found['node']} "
                                         "(ModuleNotFoundError")
    assert f"{FLASK} here" in flask_check.detail
    assert f"install flask=={FLASK}" in flask_check.fix
    assert (json_check.name, json_check.status) == ("module json", OK)
    assert not run.report.ok


def test_doctor_check_warns_when_the_versions_differ() -> None:
    (c,) = compare({"flask": [True, "0.0.1"]})
    assert c.status == "warn" and c.describe("n1") == f"flask: 0.0.1 on n1, {FLASK} here"
    run = _Doctor(Config(host="headnode"), 10.0, lambda check: None)
    run.modules = ["flask"]
    run.check_modules({"node": "n1", "modules": {"flask": [True, "0.0.1"]}})
    assert [(c.status, c.name) for c in run.report.checks] == [(WARN, "module flask")]
    assert run.report.ok  # a warning, not a blocker


def test_doctor_check_takes_names_or_a_function() -> None:
    assert check_modules_of("numpy, scipy.linalg") == ["numpy", "scipy.linalg"]
    assert check_modules_of(["numpy"]) == ["numpy"]
    assert check_modules_of(uses_flask) == ["flask"]
    with pytest.raises(ConfigError, match="'num py' is not a module name"):
        check_modules_of("num py")


def test_the_doctor_command_passes_check_on(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    class _Report:
        ok = True

        def summary(self) -> str:
            return "ready"

    def fake_doctor(config: Any, **kwargs: Any) -> _Report:
        seen.update(kwargs)
        return _Report()

    monkeypatch.setattr(cli, "doctor", fake_doctor)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"host": "headnode"}))
    assert cli.main(["doctor", str(path), "--check", "numpy,flask"]) == 0
    assert seen["check"] == "numpy,flask"

