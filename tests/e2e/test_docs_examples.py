"""Every code example of the documentation runs, on a real cluster, and prints what it says."""

from __future__ import annotations

import doctest
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cluster_fixture import hold_option, release_once_served, scheduler_of
from terminal import interruptible

import sheepdog
from sheepdog.job_file import stub_source
from sheepdog.poll import poll_until
from sheepdog.scheduler import GridEngine, scheduler_class
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def expected_lines(source: str) -> list[str]:
    """The ``# prints: ...`` lines of an example, in order."""
    return [
        line.split("# prints:", 1)[1].strip()
        for line in source.splitlines()
        if line.strip().startswith("# prints:")
    ]


@pytest.mark.parametrize(
    "example",
    sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")),
)
def test_example(example: str, config: dict[str, Any], tmp_path: Path) -> None:
    source = (EXAMPLES / example).read_text()
    expected = expected_lines(source)
    assert expected, f"{example} says nothing about what it prints"
    # As a reader runs it: the whole file, next to a cluster.json, nothing hidden.
    (tmp_path / "cluster.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / example)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, f"{example} failed:\n{done.stdout}\n{done.stderr}"
    printed = [line.strip() for line in done.stdout.splitlines()]
    position = 0
    for line in expected:
        assert line in printed[position:], (
            f"{example} should print {line!r}; it printed:\n{done.stdout}\n{done.stderr}"
        )
        position = printed.index(line, position) + 1


def test_every_example_is_in_the_docs() -> None:
    docs = "".join(p.read_text() for p in EXAMPLES.parent.glob("*.rst"))
    for example in EXAMPLES.glob("*.py"):
        if not example.name.startswith("_"):
            assert f"examples/{example.name}" in docs, f"{example.name} is not shown in the docs"


def test_readme_examples(config: dict[str, Any], tmp_path: Path) -> None:
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    section = readme.split("## Ten lines", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "the README's ten lines and its Executor example"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(dict(config, dbfile="./sheepdog.sqlite")))
    code = "\n".join(blocks).replace('".cluster/cluster.json"', repr(str(config_file)))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[0] == "[2, 3, 4]"
    assert lines[1] == "[((3, 4), 7), ((5, 'x'), None)]"
    assert lines[2].startswith("TypeError: unsupported operand")
    assert "Remote traceback" in done.stdout
    assert lines[-1] == str(sum(2 * i for i in range(100)))


# --- the sheepdog command, as docs/cli.rst shows it -------------------------------------

CLI_PAGE = EXAMPLES.parent / "cli.rst"

#: The command lines cli.rst shows, in order; each one is run below.
CLI_COMMANDS = [
    "sheepdog doctor cluster.json",
    "sheepdog doctor cluster.json --check numpy,flask",
    "sheepdog requests",
    "sheepdog status 2 --wait",
    "sheepdog results 1",
    "sheepdog results 1 --json",
    "sheepdog errors 1",
    "sheepdog logs 1 2",
    "sheepdog logs 1 2 --stream stdout",
    "sheepdog clean",
    "sheepdog clean --yes",
    "sheepdog dashboard --no-browser",
    "sheepdog cancel 2 --config cluster.json",
    "sheepdog serve --dbfile ./sheepdog.sqlite",
    "sheepdog serve --detach",
    "sheepdog serve --request 2 --port 41234 --timeout 3600",
    "sheepdog worker-stub > sheepdog_worker.py",
    "sheepdog jobfile mymodule:simulate --args '[1, 2, 3]' --config cluster.json",
]

#: Submits slow tasks and exits, so its server goes with it: work for ``sheepdog serve``.
SUBMIT_AND_LEAVE = """
import sys
import sheepdog

def slow(x):
    import time
    time.sleep(x)
    return x

conf = sheepdog.Config.from_file(sys.argv[1]).replace(workers=1)
if len(sys.argv) > 3:  # a scheduler option that holds the job until it is released
    conf = conf.replace(scheduler_opts=[sys.argv[3]])
print(sheepdog.map_async(slow, [float(sys.argv[2])] * 2, conf))
"""

CLI_TIMEOUT_S = 400


def wait_a_little(x: float) -> float:
    time.sleep(x)
    return x


def console_commands(page: Path) -> list[tuple[str, str, list[str]]]:
    """(command, comment, output shown) for every ``$`` line of the page's console blocks."""
    commands: list[tuple[str, str, list[str]]] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    inside = False
    for line in lines:
        if line.startswith(".. code-block::"):
            inside = line.split("::", 1)[1].strip() == "console"
            continue
        if inside and line.strip() and not line.startswith(" "):
            inside = False
        if not inside:
            continue
        text = line[3:] if line.startswith("   ") else line.strip()
        if text.startswith("$ "):
            command, _, comment = text[2:].partition("  #")
            commands.append((command.strip(), comment.strip(), []))
        elif commands:
            commands[-1][2].append(text.rstrip())
    for _, _, output in commands:
        while output and not output[-1]:
            output.pop()
    return commands


def shape(line: str) -> str:
    """A line with what varies from run to run (dates, numbers, hosts, states) made generic."""
    line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "DATE", line)
    line = re.sub(r"^in \S+:/\S+$", "in HOST:DIR", line.strip())  # where `clean` looked
    line = re.sub(r"\bon [\w.-]+\)", "on HOST)", line)
    line = re.sub(r"\b(running|finished)\b", "STATE", line)
    # Whether array tasks were still queued when a request finished varies from run to run.
    line = re.sub(
        r"no job of it was left on the cluster|deleted (Grid Engine|Slurm) jobs? [\d, ]+",
        "JOBS GONE", line,
    )
    line = re.sub(r"\d+", "N", line)
    return " ".join(line.split())


def as_the_cluster_writes_them(shown: list[str], config: dict[str, Any]) -> list[str]:
    """The page's job file (Grid Engine's ``#$`` lines) with the cluster's scheduler's directives.

    The page shows a Grid Engine job file of three array tasks; on Slurm, its ``#SBATCH`` lines
    stand in their place.
    """
    shell = config["shell"]
    page = GridEngine.directives(shell, 3, [])
    ours = scheduler_class(scheduler_of(config)).directives(shell, 3, [])
    start = shown.index(page[0])
    assert shown[start:start + len(page)] == page, shown
    return shown[:start] + ours + shown[start + len(page):]


def assert_shaped_like(shown: list[str], printed: str, what: str) -> None:
    """``printed`` has the lines ``shown`` in form; ``...`` in ``shown`` stands for any lines."""
    actual = [shape(line) for line in printed.splitlines()]
    segments: list[list[str]] = [[]]
    for line in shown:
        if line.strip() == "...":
            segments.append([])
        else:
            segments[-1].append(shape(line))
    message = f"{what}: the docs show\n" + "\n".join(shown) + f"\nbut it printed\n{printed}"
    position = 0
    for number, segment in enumerate(segments):
        if number == 0:
            assert actual[: len(segment)] == segment, message
            position = len(segment)
            continue
        if number == len(segments) - 1 and segment:
            assert actual[-len(segment):] == segment, message
            continue
        for start in range(position, len(actual) - len(segment) + 1):
            if actual[start : start + len(segment)] == segment:
                position = start + len(segment)
                break
        else:
            raise AssertionError(message)
    if len(segments) == 1:
        assert len(actual) == len(segments[0]), message


#: Where the columns of a ``sheepdog doctor`` line start: verdict, check, what it found.
DOCTOR_VERDICTS = ("ok", "warn", "FAIL", "skip")


def doctor_rows(text: str) -> list[str]:
    """The checks ``sheepdog doctor`` printed, in order (what each found varies by cluster)."""
    return [line[6:21].strip() for line in text.splitlines() if line[:6].strip() in DOCTOR_VERDICTS]


def assert_modules_checked_like(shown: list[str], done: subprocess.CompletedProcess[str]) -> None:
    """``doctor --check numpy,flask``: a row for each module, in the page's forms.

    The page shows flask missing on the node and numpy found on both sides. Our container
    nodes have neither; the native cell's node is this machine, which has flask.
    """
    printed = done.stdout
    message = f"the docs show\n{chr(10).join(shown)}\nbut it printed\n{printed}"
    blockers = any(line.startswith("FAIL") for line in printed.splitlines())
    assert done.returncode == (1 if blockers else 0), message
    rows = doctor_rows(printed)
    # In the order of their names, as the page shows them.
    assert rows[-5:] == ["module flask", "module numpy", "direct", "tunnel", "connect"], message
    lines = printed.splitlines()
    first = next(i for i, line in enumerate(lines) if line[6:21].strip() == "module flask")
    rest = next(i for i in range(first + 1, len(lines)) if lines[i][:6].strip() in DOCTOR_VERDICTS)
    flask = " ".join(" ".join(lines[first:rest]).split()[1:])  # the row, without its verdict
    missing = re.match(r"module flask flask: missing on \S+ \(ModuleNotFoundError: No module "
                       r"named 'flask'\); [\d.]+ here fix: install flask==", flask)
    found = re.fullmatch(r"module flask flask: [\d.]+ on \S+, [\d.]+ here", flask)
    assert missing or found, message
    assert shown[1].startswith("FAIL  module flask   flask: missing on node17"), shown
    assert re.fullmatch(r"ok +module numpy +numpy: [\d.]+ on node17, [\d.]+ here", shown[-2]), shown


def assert_dashboard_like(shown: list[str], argv: list[str], cwd: Path) -> None:
    """``dashboard --no-browser`` prints the page's lines, serves its URL, and stops at Ctrl-C."""
    with subprocess.Popen([sys.executable, "-m", "sheepdog", *argv], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          preexec_fn=interruptible) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().rstrip("\n") for _ in shown]
            message = (f"the docs show\n{chr(10).join(shown)}\nbut it printed\n"
                       f"{chr(10).join(lines)}")
            assert lines[0] == shown[0] and lines[2] == shown[2], message
            url = re.compile(r"  http://127\.0\.0\.1:\d+/\?token=\S+")
            assert url.fullmatch(lines[1]) and url.fullmatch(shown[1]), message
            with urllib.request.urlopen(lines[1].strip(), timeout=30) as page:
                assert page.status == 200 and b"sheepdog" in page.read()
            proc.send_signal(signal.SIGINT)  # "stop it with Ctrl-C"
            assert proc.wait(timeout=30) == 0, proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()


def assert_doctor_like(shown: list[str], printed: str, host: str) -> None:
    """The same checks as the page shows, in order, and the page's verdict for its head node."""
    message = "sheepdog doctor: the docs show\n" + "\n".join(shown) + f"\nbut it printed\n{printed}"
    assert doctor_rows(printed) == doctor_rows("\n".join(shown)), message
    lines = printed.replace(host, "headnode").splitlines()
    # The first line folds where the head node's name puts it.
    assert lines[-1] == shown[-1] and " ".join(lines[:2]) == " ".join(shown[:2]), message


def test_cli_page(config: dict[str, Any], tmp_path: Path) -> None:
    shown = console_commands(CLI_PAGE)
    assert [command for command, _, _ in shown] == CLI_COMMANDS, (
        "cli.rst shows other commands than this test runs: update CLI_COMMANDS and the steps"
    )
    db = tmp_path / "sheepdog.sqlite"
    config = dict(config, dbfile=str(db))
    config_file = tmp_path / "cluster.json"
    config_file.write_text(json.dumps(config))
    env = dict(os.environ)

    def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "sheepdog", *argv], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        )
        if check:
            assert done.returncode == 0, f"sheepdog {' '.join(argv)}:\n{done.stdout}{done.stderr}"
        return done

    def submit_and_leave(seconds: float, held: bool = False) -> int:
        hold = [hold_option(config)] if held else []
        done = subprocess.run(
            [sys.executable, "-c", SUBMIT_AND_LEAVE, str(config_file), str(seconds), *hold],
            cwd=tmp_path, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    # Request 1 is the page's own example; request 2 is still running.
    made = subprocess.run(
        [sys.executable, str(EXAMPLES / "cli_request.py")], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )
    assert made.returncode == 0, made.stderr
    assert sheepdog.map_async(wait_a_little, [2.0] * 6, dict(config, workers=2)) == 2

    outputs: dict[str, str] = {}
    detached_pid = None
    releasing: threading.Thread | None = None
    try:
        for command, _, output in shown:
            argv = shlex.split(command)[1:]
            if command.startswith("sheepdog cancel"):
                argv[1] = str(sheepdog.map_async(wait_a_little, [60.0] * 4, config))
            elif command.startswith("sheepdog serve --request"):
                rid = submit_and_leave(1.0)
                with Storage(str(db)) as storage:
                    port = storage.get_jobs(rid)[-1].port
                argv[argv.index("--request") + 1] = str(rid)
                argv[argv.index("--port") + 1] = str(port)
            elif command.startswith("sheepdog serve"):
                # Held until serve serves it: a fast cluster (Slurm's) could otherwise finish
                # both tasks before serve looks, leaving it nothing to serve.
                rid = submit_and_leave(1.0, held=True)
                releasing = release_once_served(config, str(db), rid, CLI_TIMEOUT_S)
            elif ">" in argv:
                argv = argv[: argv.index(">")]
            elif argv[0] == "jobfile":
                (tmp_path / "mymodule.py").write_text(
                    "def simulate(seed):\n    return seed * 2\n"
                )
            elif argv[0] == "dashboard":
                assert_dashboard_like(output, argv, tmp_path)
                continue
            elif "--check" in argv:
                assert_modules_checked_like(output, run(argv, check=False))
                continue
            done = run(argv)
            if releasing is not None:
                releasing.join(timeout=CLI_TIMEOUT_S)
                releasing = None
            printed = done.stdout + (done.stderr if argv[0] == "jobfile" else "")
            outputs[command] = done.stdout
            if argv[0] == "jobfile":
                output = as_the_cluster_writes_them(output, config)
            if argv[0] == "doctor":
                assert_doctor_like(output, printed, config["host"])
            elif output:
                assert_shaped_like(output, printed, command)
            if "--detach" in argv:
                detached_pid = int(re.search(r"pid (\d+)", done.stdout).group(1))  # type: ignore[union-attr]
                served = re.search(r"log (\S+);", done.stdout).group(1)  # type: ignore[union-attr]
                assert (tmp_path / served).exists()
                run(["status", str(rid), "--wait", "--timeout", str(CLI_TIMEOUT_S)])
                # A default, not a closure over the loop's detached_pid (ruff B023).
                def stopped(proc_dir: Path = Path(f"/proc/{detached_pid}")) -> bool:
                    return not proc_dir.exists()

                assert poll_until(stopped, timeout_s=60, interval_s=0.5), (
                    "serve --detach did not stop"
                )
                assert "every served request is finished" in (tmp_path / served).read_text()
                detached_pid = None
    finally:
        if detached_pid is not None and Path(f"/proc/{detached_pid}").exists():
            os.kill(detached_pid, signal.SIGTERM)

    # What the comments and the surrounding text promise.
    json_shown = next(c for cmd, c, _ in shown if cmd == "sheepdog results 1 --json")
    assert json_shown.startswith('[{"index": 1, "state": "done", ...}'), json_shown
    rows = json.loads(outputs["sheepdog results 1 --json"])
    assert [(r["index"], r["state"], r["args"], r["result"], r["error"]) for r in rows] == [
        (1, "done", [1, 1], 2, None), (2, "done", [1, 2], 3, None),
        (3, "failed", [2, 2], None, "ZeroDivisionError: division by zero"),
    ]
    assert outputs["sheepdog worker-stub > sheepdog_worker.py"] == stub_source()
    compile(outputs["sheepdog worker-stub > sheepdog_worker.py"], "sheepdog_worker.py", "exec")
    with Storage(str(db)) as storage:
        for row in storage.list_requests():
            assert not storage.open_task_indices(row["id"]), f"request {row['id']} left open"


def test_doctest_blocks(config: dict[str, Any]) -> None:
    """The ``>>>`` sessions of the index page and the README, with our cluster for "headnode"."""
    parser = doctest.DocTestParser()
    sources = {
        "index.rst": (EXAMPLES.parent / "index.rst").read_text(encoding="utf-8"),
        "README.md": (EXAMPLES.parents[1] / "README.md").read_text(encoding="utf-8"),
    }
    ran = 0
    for name, text in sources.items():
        session: list[str] = []
        for line in (line.strip() for line in text.splitlines()):
            if line.startswith(">>>") or (session and session[-1] and not line.startswith("`")):
                session.append(line)
            elif session and session[-1]:
                session.append("")
        text = "\n".join(session)
        assert '{"host": "headnode"}' in text, f"{name}: the session's config is not as expected"
        text = text.replace('{"host": "headnode"}', repr(config))
        test = parser.get_doctest(text, {}, name, name, 0)
        assert test.examples, f"{name} has no >>> session"
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        result = runner.run(test, out=lambda s: pytest.fail(s))
        assert result.failed == 0
        ran += result.attempted
    assert ran >= 4


def test_the_remote_error_shown_is_what_it_prints(config: dict[str, Any], tmp_path: Path) -> None:
    page = (EXAMPLES.parent / "executor.rst").read_text(encoding="utf-8")
    after = page.split("the worker stub's path vary)::\n\n", 1)[1].splitlines()
    shown_lines = []
    for line in after:
        if line.strip() and not line.startswith(" " * 8):
            break
        shown_lines.append(line[8:])
    (tmp_path / "cluster.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "remote_error.py")], cwd=tmp_path,
        capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr

    def comparable(lines: list[str]) -> list[str]:
        # Paths differ by machine, and only newer Pythons underline the failing expression.
        return [
            re.sub(r'File "[^"]+"', 'File "PATH"', line)
            for line in lines
            if line.strip(" ^~")
        ]

    assert_shaped_like(
        comparable(shown_lines), "\n".join(comparable(done.stdout.splitlines())), "remote_error.py"
    )


def test_ssh_keyscan_line_makes_a_known_hosts_sheepdog_accepts(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """ssh.rst's ``ssh-keyscan fear >> ~/.ssh/known_hosts``, for our head node and a new file."""
    page = (EXAMPLES.parent / "ssh.rst").read_text(encoding="utf-8")
    assert "ssh-keyscan fear >> ~/.ssh/known_hosts" in page
    known_hosts = tmp_path / "known_hosts"
    with open(known_hosts, "ab") as out:
        subprocess.run(
            ["ssh-keyscan", "-p", str(config["ssh_port"]), config["host"]],
            stdout=out, stderr=subprocess.DEVNULL, timeout=60, check=True,
        )
    conf = sheepdog.Config.from_mapping(dict(config, known_hosts=str(known_hosts)))
    assert sheepdog.map(abs, [-1, -2], conf, verbose=False) == [1, 2]
