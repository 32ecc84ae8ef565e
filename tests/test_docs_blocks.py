"""Every code block of the documentation is run by some test, or is on a short, tested list.

The runnable examples (``docs/examples/*.py``, shown whole with
``literalinclude``) run on a real Grid Engine in
``tests/e2e/test_docs_examples.py``. The few Python fragments that are not
whole programs are on :data:`FRAGMENTS`, and a test here or there executes
each of them; a new Python block that is neither fails
:func:`test_every_python_block_is_run`. What a reader sees must run as shown
(no hidden set-up) and fit the page without a scroll bar.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

import sheepdog
from sheepdog.config import as_config
from sheepdog.deployment import Deployer
from sheepdog.job_file import job_file, job_stem, key_file_name

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PYTHON = {"python", "python3", "py", "pycon", "ipython"}

#: Furo's content column shows 90 characters of code at 1280 px (measured in headless
#: Chromium); we keep to what an 80-column terminal shows, and Python to PEP 8's 79.
CODE_COLUMNS = 80
PYTHON_COLUMNS = 79

CONFIG_LINE = 'conf = {"host": "fear", "ge_opts": ["-l ubuntu=1", "-l lr=0"]}'
CLIENT_LINE = "Client("
GETTING_STARTED_FETCH = "import sheepdog"
GETTING_STARTED_LOCAL = "import sys"

UPGRADING_TEST = "tests/test_upgrade_02.py::test_the_upgrading_page_examples_run"

#: Python blocks that are not whole programs: (file, first line) -> the test that runs it.
FRAGMENTS = {
    ("configuration.rst", CONFIG_LINE): "test_the_three_ways_to_write_a_config",
    ("tips.rst", CLIENT_LINE): "test_the_client_line_is_the_last_line_of_a_job_file",
    ("getting-started.rst", GETTING_STARTED_FETCH): "test_getting_started_fetches_results",
    ("getting-started.rst", GETTING_STARTED_LOCAL): "test_the_local_try_out_runs_as_shown",
    ("index.rst", ">>> import sheepdog"): "tests/e2e/test_docs_examples.py::test_doctest_blocks",
    ("README.md", ">>> import sheepdog"): "tests/e2e/test_docs_examples.py::test_doctest_blocks",
    ("upgrading.rst", "import sheepdog"): UPGRADING_TEST,
    ("upgrading.rst", "from sheepdog import Storage"): UPGRADING_TEST,
    ("upgrading.rst", "from sheepdog.storage import Storage"): UPGRADING_TEST,
    ("upgrading.rst", "import sys"):
        "tests/test_original_suite.py::test_the_023_restart_recipe_works_as_written",
    ("README.md", "import sheepdog"): "tests/e2e/test_docs_examples.py::test_readme_examples",
    ("README.md", "from sheepdog import Executor"):
        "tests/e2e/test_docs_examples.py::test_readme_examples",
    ("api.rst", "import sys"): "tests/test_session.py::test_the_api_page_session_runs_as_shown",
    ("schedulers.rst", "import sheepdog"):
        "tests/e2e/test_slurm_map.py::test_the_slurm_quickstart_of_the_docs_runs_as_shown",
    ("watching.rst", "import sheepdog"):
        "tests/dashboard/test_dashboard.py::test_the_notebook_example_of_the_docs_runs_as_shown",
}


@dataclass
class Block:
    """One code block of a page: its language (``literal`` for ``::``) and its lines."""

    file: str
    line: int
    language: str
    lines: list[str]
    include: str | None = None

    @property
    def first(self) -> str:
        return next((line.strip() for line in self.lines if line.strip()), "")

    @property
    def is_python(self) -> bool:
        return self.language in PYTHON or self.first.startswith(">>>")


def _indented_body(lines: list[str], start: int) -> list[str]:
    """The lines of the indented body that follows ``lines[start - 1]``, dedented."""
    body: list[str] = []
    i = start
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    indents = [len(x) - len(x.lstrip()) for x in body if x.strip()]
    cut = min(indents, default=0)
    return [x[cut:] for x in body]


def rst_blocks(path: Path) -> list[Block]:
    """The code blocks of a reStructuredText page, directives and ``::`` literal blocks alike."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    for number, line in enumerate(lines):
        match = re.match(r"\s*\.\. (code-block|code|sourcecode|literalinclude)::\s*(\S*)", line)
        if match:
            kind, argument = match.groups()
            body = _indented_body(lines, number + 1)
            content = [x for x in body if not x.startswith(":")]
            if kind == "literalinclude":
                blocks.append(Block(path.name, number + 1, "include", content, include=argument))
            else:
                blocks.append(Block(path.name, number + 1, argument or "default", content))
        elif line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            body = _indented_body(lines, number + 1)
            blocks.append(Block(path.name, number + 1, "literal", body))
    return blocks


def markdown_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file."""
    blocks: list[Block] = []
    language, start, body = None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.startswith("```"):
            if language is None:
                language, start, body = line[3:].strip() or "text", number + 1, []
            else:
                blocks.append(Block(path.name, start, language, body))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def all_blocks() -> list[Block]:
    blocks = [b for page in sorted(DOCS.glob("*.rst")) for b in rst_blocks(page)]
    return blocks + markdown_blocks(REPO / "README.md")


def block(file: str, first: str) -> Block:
    found = [b for b in all_blocks() if b.file == file and b.first == first]
    assert len(found) == 1, f"{file}: expected one block starting {first!r}, found {len(found)}"
    return found[0]


def test_the_block_finder_sees_every_kind_of_block(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text(
        "Title\n=====\n\nText::\n\n   literal\n\n.. code-block:: python\n\n   x = 1\n   y = 2\n\n"
        ".. literalinclude:: examples/a.py\n   :start-after: # --8<-- [example]\n\n"
        ".. code:: console\n\n   $ ls\n",
        encoding="utf-8",
    )
    found = [(b.language, b.lines, b.include) for b in rst_blocks(page)]
    assert found == [
        ("literal", ["literal"], None),
        ("python", ["x = 1", "y = 2"], None),
        ("include", [], "examples/a.py"),
        ("console", ["$ ls"], None),
    ]


def test_every_python_block_is_run() -> None:
    untested = [
        f"{b.file}:{b.line} starts {b.first!r}"
        for b in all_blocks()
        if b.is_python and (b.file, b.first) not in FRAGMENTS
    ]
    assert not untested, (
        "Python blocks that no test runs; make each a docs/examples/*.py literalinclude "
        "(with # prints: lines) or add it to FRAGMENTS with a test that runs it:\n"
        + "\n".join(untested)
    )


def test_every_fragment_on_the_list_is_still_in_the_docs() -> None:
    present = {(b.file, b.first) for b in all_blocks() if b.is_python}
    assert set(FRAGMENTS) <= present, set(FRAGMENTS) - present


def shown_source(b: Block) -> str:
    """What a literalinclude shows: the whole file, or what follows its start-after marker."""
    assert b.include is not None and b.include.startswith("examples/"), b
    source = (DOCS / b.include).read_text(encoding="utf-8")
    page = (DOCS / b.file).read_text(encoding="utf-8").splitlines()
    options = _indented_body(page, b.line)
    marker = next((o.split(":", 2)[2].strip() for o in options if o.startswith(":start-after:")),
                  None)
    return source.split(marker, 1)[1] if marker else source


def test_every_literalinclude_is_a_runnable_example() -> None:
    includes = [b for b in all_blocks() if b.language == "include"]
    assert includes
    for b in includes:
        shown = shown_source(b)
        # The reader sees where conf comes from: pasting the example runs it.
        assert 'conf = sheepdog.Config.from_file("cluster.json")' in shown, b.include
        assert "_conf" not in shown, b.include
        assert "# prints:" in shown, f"{b.include} says nothing about what it prints"


def undefined_names(source: str, name: str) -> list[str]:
    """ruff's F821 (undefined name) findings for a piece of Python, as text."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821",
         "--output-format", "concise", "--stdin-filename", name, "-"],
        input=source, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return [line for line in done.stdout.splitlines() if "F821" in line]


def test_every_example_runs_as_shown_without_hidden_names() -> None:
    problems = []
    for b in all_blocks():
        if b.language == "include":
            problems += undefined_names(shown_source(b), f"{b.file}:{b.line}:{b.include}")
        elif b.is_python and not b.first.startswith(">>>"):
            if (b.file, b.first) in {("configuration.rst", CONFIG_LINE), ("tips.rst", CLIENT_LINE)}:
                continue  # fragments: one line of a config, the last line of a job file
            problems += undefined_names("\n".join(b.lines), f"{b.file}:{b.line}")
    assert not problems, "examples that use names they do not define:\n" + "\n".join(problems)


def test_undefined_names_are_found() -> None:
    assert undefined_names("print(conf)\n", "x.py")
    assert not undefined_names("conf = 1\nprint(conf)\n", "x.py")


def test_no_code_line_is_wider_than_the_page_shows() -> None:
    wide = []
    for b in all_blocks():
        lines = shown_source(b).splitlines() if b.language == "include" else b.lines
        limit = PYTHON_COLUMNS if b.is_python or b.language == "include" else CODE_COLUMNS
        wide += [f"{b.file}:{b.line}: {len(line)} > {limit}: {line}"
                 for line in lines if len(line) > limit]
    assert not wide, "code lines the docs theme would cut:\n" + "\n".join(wide)


def test_the_line_width_check_sees_a_wide_line(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text("T\n=\n\n.. code-block:: console\n\n   $ " + "x" * 80 + "\n")
    (found,) = rst_blocks(page)
    assert max(map(len, found.lines)) > CODE_COLUMNS


def test_the_getting_started_config_is_a_valid_config() -> None:
    (shown,) = [b for b in all_blocks() if b.file == "getting-started.rst" and b.language == "json"]
    config = as_config(json.loads("\n".join(shown.lines)))
    assert config.host == "headnode.example.org" and config.ssh_user == "ag123"


def test_getting_started_fetches_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sheepdog.serialisation import serialise_args, serialise_function, serialise_value
    from sheepdog.storage import Storage

    monkeypatch.chdir(tmp_path)
    with Storage("./sheepdog.sqlite") as storage:
        rid = storage.new_request(serialise_function(abs), b"", serialise_args([0, 1]))
        storage.complete(rid, [
            {"index": i + 1, "ok": True, "value": serialise_value((i * i, f"node{i + 1}")),
             "stdout": "", "stderr": ""} for i in range(2)
        ])
    exec("\n".join(block("getting-started.rst", GETTING_STARTED_FETCH).lines), {})
    assert capsys.readouterr().out == "0 (0, 'node1')\n1 (1, 'node2')\n"


@pytest.mark.slow
def test_the_local_try_out_runs_as_shown(tmp_path: Path) -> None:
    """The scheduler="local" map of Getting started, in a fresh Python, from an empty home."""
    source = "\n".join(block("getting-started.rst", GETTING_STARTED_LOCAL).lines)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[32, 9]\n"
    assert (tmp_path / ".sheepdog").is_dir()  # ssh_dir, under this home


def test_the_config_tables_show_every_key_of_config() -> None:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from config_keys import config_sections, default_text
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    import dataclasses

    sections = config_sections()
    listed = [name for names in sections.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(sheepdog.Config))
    page = (DOCS / "configuration.rst").read_text(encoding="utf-8")
    used = re.findall(r"^\.\. config-keys:: (.+)$", page, flags=re.M)
    assert sorted(used) == sorted(sections), "every section of Config has its table"
    fields = {f.name: f for f in dataclasses.fields(sheepdog.Config)}
    assert default_text(fields["host"]) == 'required (not for ``scheduler="local"``)'
    assert default_text(fields["ssh_port"]) == "``22``"
    assert default_text(fields["ssh_user"]) == "your user name on this machine"
    assert {"prologue", "capture_bytes", "tls"} <= set(listed)


def test_the_three_ways_to_write_a_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = block("configuration.rst", CONFIG_LINE).lines
    assert len(lines) == 3
    first: dict[str, object] = {}
    exec(lines[0], {"sheepdog": sheepdog}, first)  # the documented line itself
    (tmp_path / ".cluster").mkdir()
    (tmp_path / ".cluster" / "cluster.json").write_text(json.dumps(first["conf"]))
    monkeypatch.chdir(tmp_path)
    configs = []
    for line in lines:
        namespace: dict[str, object] = {}
        exec(line, {"sheepdog": sheepdog}, namespace)
        configs.append(as_config(namespace["conf"]))  # type: ignore[arg-type]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].host == "fear"
    assert configs[0].ge_opts == ("-l ubuntu=1", "-l lr=0")


def test_the_client_line_is_the_last_line_of_a_job_file() -> None:
    # Shown folded to fit the page; the job file has it on one line.
    shown = " ".join(line.strip() for line in block("tips.rst", CLIENT_LINE).lines)
    shown = shown.replace("( ", "(").replace(", )", ")")
    secret = "ab" * 32
    key = "/home/you/.sheepdog/" + key_file_name(32, secret)
    text = job_file("http://your.host:1234/", key, 32, 10, "/usr/bin/python3", [])
    last = text.rstrip("\n").splitlines()[-1].strip()
    assert last == shown.replace("<tag>", job_stem(32, secret).rsplit("_", 1)[1])


def test_the_job_file_shown_with_a_prologue_is_what_sheepdog_writes() -> None:
    (shown,) = [b for b in all_blocks() if b.file == "executor.rst" and b.first == "#!/bin/sh"]
    head = shown.lines[: shown.lines.index("'''") + 1]
    assert shown.lines[len(head):] == ["# ... the worker stub ..."]
    prologue = head[head.index("''''true") + 1 : -2]
    shell = re.fullmatch(r'exec (\S+) "\$0" "\$@"', head[-2])
    assert shell, head[-2]
    tasks = re.fullmatch(r"#\$ -t 1-(\d+)", head[2])
    assert tasks, head[2]
    n = int(tasks.group(1))
    text = job_file("http://h:1/", "/h/.sheepdog/k.key", 1, n, shell.group(1), [], array_size=n,
                    prologue=prologue)
    assert text.splitlines()[: len(head)] == head


def test_the_ssh_config_shown_resolves_as_the_page_says(tmp_path: Path) -> None:
    (shown,) = [b for b in all_blocks() if b.file == "ssh.rst" and b.language == "text"]
    path = tmp_path / "config"
    path.write_text("\n".join(shown.lines) + "\n", encoding="utf-8")
    entry = paramiko.SSHConfig.from_path(str(path)).lookup("fear")
    assert entry["hostname"] == "fear.example.ac.uk"
    # "User and Port found there win over ssh_user and ssh_port", as the page says.
    params = Deployer("fear", 22, "someone-else", ssh_config=str(path))._resolve()
    assert params["hostname"] == "fear.example.ac.uk"
    assert params["user"] == "ag123"
    assert params["proxyjump"] == "gateway.example.ac.uk"
    assert params["port"] == 22
    # Hosts the entry does not match keep what the config says.
    other = Deployer("elsewhere", 2222, "me", ssh_config=str(path))._resolve()
    assert (other["hostname"], other["user"], other["port"]) == ("elsewhere", "me", 2222)
