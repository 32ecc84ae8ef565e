"""Tests for sheepdog.job_file: rendering (golden file, hostile values) and writing."""

from __future__ import annotations

import ast
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import sheepdog.client
from sheepdog import Config
from sheepdog.errors import ConfigError
from sheepdog.job_file import (
    JOB_DIR_MODE,
    JOB_FILE_MODE,
    KEY_FILE_MODE,
    STUB_FILE_MODE,
    job_file,
    job_file_name,
    key_file_name,
    put_stub,
    stub_file_name,
    stub_path,
    stub_source,
    worker_limits,
    write_job_file,
)
from sheepdog.scheduler import Slurm, check_options
from sheepdog.scheduler.local import LocalHost

GOLDEN = Path(__file__).parent / "golden" / "job_file.txt"
#: The golden files name the stub's file by this, as its digest changes with every edit.
STUB_PLACEHOLDER = "sheepdog_worker-<digest>.py"
SECRET = "0123456789abcdef" * 4
KEY_FILE = "/home/me/.sheepdog/" + key_file_name(12, SECRET)
STUB_FILE = "/home/me/.sheepdog/" + stub_file_name()
#: What render()'s directives (-l h_rt=1:00:00,mem_grab=2G) give the worker.
LIMITS = {"mem_limit_bytes": 2 * 1024**3, "run_limit_s": 3600}
REPO = Path(__file__).resolve().parent.parent


def render(**overrides: object) -> str:
    values: dict[str, object] = {
        "url": "http://submit.example.org:5000/",
        "secret_file": KEY_FILE,
        "request_id": 12,
        "n_args": 30,
        "shell": "/usr/bin/python3",
        "grid_engine_opts": ["-wd $HOME/.sheepdog/", "-l h_rt=1:00:00,mem_grab=2G", "-r y"],
    }
    values.update(overrides)
    return job_file(**values)  # type: ignore[arg-type]


def client_call(text: str) -> ast.Call:
    """Return the ``Client(...)`` call node of a rendered job file."""
    calls = [
        node
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "go"
        and isinstance(node.func.value, ast.Call)
    ]
    assert len(calls) == 1, "the job file should end with exactly one Client(...).go()"
    inner = calls[0].func.value  # type: ignore[attr-defined]
    assert isinstance(inner, ast.Call)
    return inner


def test_golden_job_file() -> None:
    """The rendered job file matches tests/golden/job_file.txt (rewritten when deleted)."""
    text = render(array_size=10, client_options={"batch": 4, "retry_s": 900.0})
    text = text.replace(stub_file_name(), STUB_PLACEHOLDER)
    if not GOLDEN.exists():
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
        pytest.fail(f"{GOLDEN} was missing and has been written: review it, commit it, rerun")
    assert text == GOLDEN.read_text(encoding="utf-8")


def stub_named(text: str) -> str:
    """Return the path of the worker stub that a rendered job file runs (its STUB line)."""
    lines = [line for line in text.splitlines() if line.startswith("STUB = ")]
    assert len(lines) == 1, "the job file should name its stub once"
    value = ast.literal_eval(lines[0][len("STUB = "):])
    assert isinstance(value, str)
    return value


def test_job_file_is_valid_python_with_the_stub_and_its_directives() -> None:
    text = render()
    compile(text, "sheepdog_012.py", "exec")
    assert stub_named(text) == STUB_FILE  # beside the key file, named by its digest
    assert stub_source().splitlines()[0] not in text  # run from its file, not pasted
    assert len(text.splitlines()) < 30
    header = text.split("# sheepdog job file", 1)[0].splitlines()
    assert header[0] == "#!/usr/bin/python3"
    assert [line for line in header if line.startswith("#$")] == [
        "#$ -S /usr/bin/python3",
        "#$ -t 1-30",
        "#$ -wd $HOME/.sheepdog/",
        "#$ -l h_rt=1:00:00,mem_grab=2G",
        "#$ -r y",
    ]
    call = client_call(text)
    # The secret is not in the job file: the second argument is None, and the
    # secret_file keyword names the key file beside it.
    assert [ast.literal_eval(arg) for arg in call.args[:3]] == [
        "http://submit.example.org:5000/",
        None,
        12,
    ]
    assert ast.literal_eval(call.keywords[-1].value) == KEY_FILE
    assert ast.unparse(call.args[3]) == "int(os.environ.get('SGE_TASK_ID', '1'))"


def client_keywords(text: str) -> dict[str, object]:
    return {kw.arg or "": ast.literal_eval(kw.value) for kw in client_call(text).keywords}


def test_the_job_file_passes_the_memory_and_run_time_limits_of_its_directives() -> None:
    assert client_keywords(render()).items() >= LIMITS.items()
    # Limits given in the client options win; None means "from the directives", as in Client.
    given = client_keywords(render(client_options={"mem_limit_bytes": 5, "run_limit_s": None}))
    assert (given["mem_limit_bytes"], given["run_limit_s"]) == (5, 3600)
    bare = client_keywords(render(grid_engine_opts=["-r y"]))
    assert "mem_limit_bytes" not in bare and "run_limit_s" not in bare


def test_a_limit_the_scheduler_cannot_read_is_none_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The worker said so on stderr and went on without it, when it read its job file.
    keywords = client_keywords(render(grid_engine_opts=["-l h_vmem=2GB,h_rt=60"]))
    assert "mem_limit_bytes" not in keywords and keywords["run_limit_s"] == 60
    assert "no memory limit: '2GB' is not a Grid Engine memory specifier" in caplog.text
    assert worker_limits(Slurm, ["--time=1h", "--mem=1G"]) == {"mem_limit_bytes": 1024**3}


def test_a_job_file_runs_the_stub_beside_it(tmp_path: Path) -> None:
    """The stub's code runs in the job file's own namespace, as when it was pasted."""
    key = tmp_path / "dir with 'quotes' and spaces" / key_file_name(12, SECRET)
    text = render(secret_file=str(key))
    head, call = text.rsplit('if __name__ == "__main__":', 1)
    job = key.parent / "job.py"
    key.parent.mkdir()
    job.write_text(head + "print(Client.__module__, EXIT_SECRET)\n", encoding="utf-8")
    run = [sys.executable, str(job)]
    missing = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 7, missing.stderr  # as for a key file it cannot read
    assert "cannot read the worker stub here" in missing.stderr
    assert "the same path" in missing.stderr
    put_stub(LocalHost(), str(key.parent))
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "__main__ 7\n"), done.stderr


def test_put_stub_writes_it_once_whole_and_private(tmp_path: Path) -> None:
    host = RecordingHost()
    folder = tmp_path / "jobs"
    path = put_stub(host, str(folder))
    assert path == f"{folder}/{stub_file_name()}"
    assert Path(path).read_text(encoding="utf-8") == stub_source()
    assert stat.S_IMODE(Path(path).stat().st_mode) == STUB_FILE_MODE == 0o600
    # Written under a temporary name in the same directory, then renamed: never in part.
    [(directory, [(temp, _, mode)])] = host.puts
    assert (directory, mode) == (str(folder), STUB_FILE_MODE) and temp.startswith(".")
    assert host.renames == [(f"{folder}/{temp}", path)]
    assert sorted(p.name for p in folder.iterdir()) == [stub_file_name()]
    # Once there, it is not written again.
    assert put_stub(host, str(folder)) == path
    assert len(host.puts) == 1


def test_put_stub_leaves_no_temporary_file_when_the_rename_fails(tmp_path: Path) -> None:
    host = RecordingHost(fail_rename=True)
    with pytest.raises(OSError, match="no rename"):
        put_stub(host, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


class RecordingHost(LocalHost):
    """This machine as a host, recording what put_stub writes and renames."""

    def __init__(self, fail_rename: bool = False) -> None:
        self.puts: list[tuple[str, list[tuple[str, str, int]]]] = []
        self.renames: list[tuple[str, str]] = []
        self.fail_rename = fail_rename

    def put(self, directory: str, files: Sequence[tuple[str, str, int]]) -> None:
        self.puts.append((directory, list(files)))
        super().put(directory, files)

    def rename(self, source: str, target: str) -> None:
        if self.fail_rename:
            raise OSError("no rename")
        self.renames.append((source, target))
        super().rename(source, target)


@pytest.fixture(
    params=[
        "plain",
        "with space",
        "quote'single",
        'quote"double',
        "semi;colon",
        "$(touch /tmp/pwned)",
        "`touch /tmp/pwned`",
        "back\\slash",
        "new\nline",
        "uni\u2028code",
    ]
)
def awkward(request: pytest.FixtureRequest) -> str:
    """A value holding something that breaks naive quoting."""
    value: str = request.param
    return value


def has_line_break(value: str) -> bool:
    return value != value.replace("\n", "").replace("\u2028", "")


def test_awkward_url_and_options_round_trip_as_python_literals(awkward: str) -> None:
    url = f"http://host:1/{awkward}/"
    options = {"retry_s": 5.0, "note": awkward}
    text = render(url=url, client_options=options, tls_fingerprint=f"ab:{awkward}")
    compile(text, "job", "exec")
    call = client_call(text)
    assert ast.literal_eval(call.args[0]) == url
    assert {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords} == {
        **options,
        **LIMITS,
        "tls_fingerprint": f"ab:{awkward}",
        "secret_file": KEY_FILE,
    }
    # The Python literal never spills onto a line of its own.
    assert text.count("\n") == render().count("\n")


def test_awkward_directive_values_are_kept_on_their_line_or_rejected(awkward: str) -> None:
    shell = f"/opt/py{awkward}/bin/python3"
    opt = f"-N job{awkward}"
    if has_line_break(awkward):
        with pytest.raises(ConfigError, match="line break"):
            render(shell=shell)
        with pytest.raises(ConfigError, match="line break"):
            render(grid_engine_opts=[opt])
        return
    # The shell goes on the #! line, where a space would split it: the rule that Config
    # applies (one rule, in sheepdog/directives.py) refuses it here too.
    if " " in shell:
        with pytest.raises(ConfigError, match="'shell'"):
            render(shell=shell)
        with pytest.raises(ConfigError, match="'shell'"):
            Config(host="h", shell=shell)
        shell = "/opt/py/bin/python3"
    else:
        assert Config(host="h", shell=shell).shell == shell
    assert Config(host="h", ge_opts=(opt,)).ge_opts == (opt,)
    text = render(shell=shell, grid_engine_opts=[opt])
    compile(text, "job", "exec")
    header = text.split("# sheepdog job file", 1)[0].splitlines()
    assert all(line.startswith("#") for line in header)
    assert f"#$ {opt}" in header
    s_lines = [line for line in header if line.startswith("#$ -S ")]
    assert len(s_lines) == 1
    import shlex

    assert shlex.split(s_lines[0][len("#$ -S ") :]) == [shell]


@pytest.mark.parametrize(
    "values",
    [
        {"ge_opts": ("-N a\x0bb",)},  # a vertical tab ends a line for Python and Grid Engine
        {"ge_opts": ("-N a\u2028b",)},
        {"ge_opts": ("-l h_rt=1 -t 1-5",)},  # -t after another option
        {"ge_opts": ("-cwd -S '/bin/sh'",)},
        {"prologue": ("echo a\x0cb",)},
        {"shell": "/usr/bin/python3\x85"},
    ],
)
def test_config_refuses_what_the_job_file_would_refuse(values: dict[str, object]) -> None:
    # Before, Config accepted these and the request was stored, then failed as "never
    # submitted" when job_file refused them: now both apply one rule before anything is
    # stored, Config's when it is built, the scheduler's (-t, -S) when it is opened.
    with pytest.raises(ConfigError) as from_config:
        check_options(Config(host="h", **values))  # type: ignore[arg-type]
    overrides = {
        "grid_engine_opts": list(values.get("ge_opts", ())),
        "prologue": values.get("prologue"),
        "shell": values.get("shell", "/usr/bin/python3"),
    }
    with pytest.raises(ConfigError) as from_job_file:
        render(**overrides)
    assert from_config.value.key == from_job_file.value.key


@pytest.mark.parametrize("opt", ["-t 1-5", "-S /bin/sh", "-l a=1 -t 2", "-cwd -S '/bin/sh'"])
def test_options_that_sheepdog_sets_are_rejected(opt: str) -> None:
    with pytest.raises(ConfigError, match="remove -[tS]"):
        render(grid_engine_opts=[opt])


def test_other_dash_t_options_are_allowed() -> None:
    assert "#$ -tc 5" in render(grid_engine_opts=["-tc 5"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secret_file": SECRET}, "absolute path"),
        ({"secret_file": "relative/key"}, "absolute path"),
        ({"secret_file": None}, "absolute path"),
        ({"secret_file": "/a\nb"}, "line break"),
        ({"request_id": 0}, "request_id"),
        ({"n_args": 0}, "n_args"),
        ({"array_size": 0}, "array_size"),
        ({"url": "ftp://x/"}, "http://"),
        ({"shell": " "}, "shell"),
        ({"grid_engine_opts": "-r y"}, "list of strings"),
        ({"client_options": {"batch": [1]}}, "cannot be written"),
        ({"client_options": {"a b": 1}}, "cannot be written"),
    ],
)
def test_bad_values_raise_config_error(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        render(**overrides)
    assert SECRET not in str(info.value)


GOLDEN_PROLOGUE = Path(__file__).parent / "golden" / "job_file_prologue.txt"


def test_golden_prologue_job_file() -> None:
    """A job file with a prologue matches tests/golden/job_file_prologue.txt."""
    text = render(
        array_size=10, prologue=["module load python/3.11", ". '/opt/my env/bin/activate'"]
    )
    text = text.replace(stub_file_name(), STUB_PLACEHOLDER)
    if not GOLDEN_PROLOGUE.exists():
        GOLDEN_PROLOGUE.write_text(text, encoding="utf-8")
        pytest.fail(f"{GOLDEN_PROLOGUE} was missing and has been written: review it, rerun")
    assert text == GOLDEN_PROLOGUE.read_text(encoding="utf-8")


def test_prologue_runs_in_sh_then_execs_the_python_on_the_same_file(tmp_path: Path) -> None:
    text = render(prologue=["export SHEEPDOG_TEST_VAR='from the prologue'", "echo sh-ran >&2"])
    compile(text, "sheepdog_012.py", "exec")
    # Run only the head: the shell block, then Python printing what it sees.
    head = text.split("# sheepdog job file", 1)[0]
    script = tmp_path / "job.py"
    script.write_text(
        head + 'import os, sys\nprint(os.environ["SHEEPDOG_TEST_VAR"], sys.argv[1:])\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        ["/bin/sh", str(script), "x y"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the prologue ['x y']\n"
    assert done.stderr == "sh-ran\n"


@pytest.mark.parametrize("line", ["a\nb", "x'''y", "nul\x00", 3])
def test_bad_prologue_lines_raise_config_error(line: object) -> None:
    with pytest.raises(ConfigError, match="prologue"):
        render(prologue=[line])


def test_write_job_file_is_private(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    path = write_job_file("first", folder, 7, SECRET)
    path = write_job_file("second", folder, 7, SECRET)
    assert path == folder / job_file_name(7, SECRET)
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == JOB_FILE_MODE == 0o700
    assert stat.S_IMODE(folder.stat().st_mode) == JOB_DIR_MODE == 0o700
    key = folder / key_file_name(7, SECRET)
    assert key.read_text() == SECRET + "\n"
    assert stat.S_IMODE(key.stat().st_mode) == KEY_FILE_MODE == 0o600
    stub = folder / stub_file_name()
    assert stub.read_text(encoding="utf-8") == stub_source()
    assert stat.S_IMODE(stub.stat().st_mode) == STUB_FILE_MODE
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, key.name, stub.name])


def test_write_job_file_creates_missing_directories(tmp_path: Path) -> None:
    path = write_job_file("x", tmp_path / "a" / "b", 1234, SECRET)
    assert path.name.startswith("sheepdog_1234_")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_the_job_file_names_the_key_file_and_never_holds_the_secret() -> None:
    # Grid Engine copies job scripts world-readable into each execution node's spool.
    for text in (render(), render(prologue=["true"]), render(tls_fingerprint="ab" * 32)):
        assert SECRET not in text
        assert SECRET[::-1] not in text
        call = client_call(text)
        assert ast.literal_eval(call.args[1]) is None
        assert {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}["secret_file"] == (
            KEY_FILE
        )


def test_job_files_are_named_apart_per_database() -> None:
    # Two databases that share ssh_dir both have a request 12: their files must not clash.
    other = "fedcba9876543210" * 4
    assert job_file_name(12, SECRET) != job_file_name(12, other)
    assert key_file_name(12, SECRET) != key_file_name(12, other)
    assert job_file_name(12, SECRET).startswith("sheepdog_012_")
    assert job_file_name(12, SECRET)[:-3] == key_file_name(12, SECRET)[:-4]
    # The name is all anyone sees of the secret; it is a hash, not a piece of it.
    tag = job_file_name(12, SECRET)[len("sheepdog_012_"):-3]
    assert tag not in SECRET


def test_write_job_file_refuses_a_bad_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 32 hex") as info:
        write_job_file("x", tmp_path, 1, "hunter2")
    assert "hunter2" not in str(info.value)


def test_stub_source_is_the_checkout_file() -> None:
    assert stub_path() == REPO / "worker_stub" / "sheepdog_worker.py"
    assert stub_source() == stub_path().read_text(encoding="utf-8")


def test_sheepdog_client_exports_the_stub_client() -> None:
    assert sheepdog.client.Client is sheepdog.client.stub.Client
    assert sheepdog.client.stub.__file__ == str(stub_path())


# --- Slurm's job files ----------------------------------------------------------------------

GOLDEN_SLURM = Path(__file__).parent / "golden" / "job_file_slurm.txt"
GOLDEN_SLURM_PROLOGUE = Path(__file__).parent / "golden" / "job_file_slurm_prologue.txt"
SLURM_CONFIG = Config(host="h", scheduler="slurm", mem_gb=2, h_rt="3600", queue="main",
                      pe=("smp", 2), max_running=4, scheduler_opts=("--qos=normal",))


def render_slurm(**overrides: object) -> str:
    values: dict[str, object] = {
        "grid_engine_opts": SLURM_CONFIG.job_options(Slurm), "scheduler": Slurm,
        "max_running": SLURM_CONFIG.max_running,
    }
    values.update(overrides)
    return render(**values)


def check_golden(path: Path, text: str) -> None:
    text = text.replace(stub_file_name(), STUB_PLACEHOLDER)
    if not path.exists():
        path.write_text(text, encoding="utf-8")
        pytest.fail(f"{path} was missing and has been written: review it, commit it, rerun")
    assert text == path.read_text(encoding="utf-8")


def test_golden_slurm_job_file() -> None:
    """A Slurm job file matches tests/golden/job_file_slurm.txt (rewritten when deleted)."""
    check_golden(GOLDEN_SLURM, render_slurm(
        array_size=10, client_options={"batch": 4, "retry_s": 900.0}
    ))


def test_golden_slurm_prologue_job_file() -> None:
    """A Slurm job file with a prologue matches tests/golden/job_file_slurm_prologue.txt."""
    check_golden(GOLDEN_SLURM_PROLOGUE, render_slurm(
        array_size=10, prologue=["module load python/3.11", ". '/opt/my env/bin/activate'"]
    ))


def test_a_slurm_job_file_is_python_that_reads_slurms_index_and_limits() -> None:
    text = render_slurm()
    compile(text, "sheepdog_012.py", "exec")
    header = text.split("# sheepdog job file", 1)[0].splitlines()
    assert header[0] == "#!/usr/bin/python3"
    assert [line for line in header if line.startswith("#")][1:6] == [
        "#SBATCH --array=1-30%4", "#SBATCH --qos=normal", "#SBATCH --mem=2G",
        "#SBATCH --time=1:00:00", "#SBATCH --partition=main",
    ]
    assert not any(line.startswith("#$") for line in header)
    assert ast.unparse(client_call(text).args[3]) == (
        "int(os.environ.get('SLURM_ARRAY_TASK_ID', '1'))"
    )
    assert client_keywords(text).items() >= LIMITS.items()  # --mem=2G, --time=1:00:00


def test_awkward_slurm_options_are_kept_on_their_line_or_rejected(awkward: str) -> None:
    opt = f"--comment=job{awkward}"
    if has_line_break(awkward):
        with pytest.raises(ConfigError, match="line break") as info:
            render_slurm(grid_engine_opts=[opt])
        assert info.value.key == "scheduler_opts[0]"
        with pytest.raises(ConfigError, match="line break"):
            Config(host="h", scheduler="slurm", scheduler_opts=(opt,))
        return
    assert Config(host="h", scheduler="slurm", scheduler_opts=(opt,)).scheduler_opts == (opt,)
    text = render_slurm(grid_engine_opts=[opt])
    compile(text, "job", "exec")
    header = text.split("# sheepdog job file", 1)[0].splitlines()
    assert all(line.startswith("#") for line in header)
    assert f"#SBATCH {opt}" in header
    assert sum(line.startswith("#SBATCH --array") for line in header) == 1


@pytest.mark.parametrize("opt", ["--array=1-5", "-a 1-5", "-J name", "--job-name=x",
                                 "--parsable"])
def test_options_that_sheepdog_sets_on_slurm_are_rejected_by_the_job_file(opt: str) -> None:
    with pytest.raises(ConfigError, match="remove .* from scheduler_opts"):
        render_slurm(grid_engine_opts=[opt])
    # Grid Engine would have taken some of them: the rule is the scheduler's.
    if opt == "--parsable":
        assert "#$ --parsable" in render(grid_engine_opts=[opt])
