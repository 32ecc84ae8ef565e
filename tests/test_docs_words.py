"""The docs read right for a Slurm user, and their tables and pictures render as meant."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import docutils.core
import docutils.nodes
import pytest

from sheepdog.config import Config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["index.rst", "quickstart.rst", "cluster.rst"])
def test_the_first_pages_say_grid_engine_or_slurm(name: str) -> None:
    text = " ".join(page(name).split())
    assert "Grid Engine or Slurm" in text, name
    assert "needs a Grid Engine cluster" not in text


def test_getting_started_tells_a_slurm_user_what_to_try_by_hand() -> None:
    text = " ".join(page("getting-started.rst").split())
    assert "squeue" in text
    assert "must print Grid Engine's job list" not in text


def test_debugging_points_nat_users_to_the_tunnel() -> None:
    text = " ".join(page("debugging.rst").split())
    nat = text[text.index("Behind NAT"):][:400]
    assert 'connect="tunnel"' in nat and ":doc:`connecting`" in nat


def test_host_is_not_marked_required_for_local() -> None:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from config_keys import default_text
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    host = next(f for f in dataclasses.fields(Config) if f.name == "host")
    assert default_text(host) == 'required (not for ``scheduler="local"``)'


def test_the_api_page_has_the_executor_and_get_output() -> None:
    text = page("api.rst")
    assert ".. autoclass:: sheepdog.Executor" in text
    assert ".. autofunction:: sheepdog.get_output" in text


def _rows(text: str) -> list[list[str]]:
    tree = docutils.core.publish_doctree(
        text, settings_overrides={"report_level": 5, "halt_level": 5}
    )
    return [[entry.astext() for entry in row.findall(docutils.nodes.entry)]
            for row in tree.findall(docutils.nodes.row)]


def test_the_benchmark_tables_have_no_bogus_rows_or_dashes() -> None:
    rows = _rows(page("benchmarks.rst"))
    assert len(rows) > 20
    # A row with only its first cell filled is a wrapped line read as a new row.
    bogus = [row for row in rows if len(row) > 2 and row[0] and not any(row[1:])]
    assert not bogus, bogus
    # Outside ``literals`` Sphinx turns -- into an en dash.
    for line in page("benchmarks.rst").splitlines():
        if re.match(r"^\S.*\s{2,}\S", line) and not line.startswith(".."):
            assert not re.search(r"(?<!`)--[a-z]", re.sub(r"``.*?``", "", line)), line


def test_the_bogus_row_check_finds_a_wrapped_line() -> None:
    table = "=====  =====\na      b\n=====  =====\nx y    1\nwrap\n=====  =====\n"
    rows = _rows(table)
    assert ["wrap", ""] in rows


@pytest.mark.parametrize(("name", "diagram"), [("connecting.rst", "connect.dot"),
                                                ("failures.rst", "task-states.dot")])
def test_the_pictures_are_there(name: str, diagram: str) -> None:
    assert f".. graphviz:: _diagrams/{diagram}" in page(name)
    dot = (DOCS / "_diagrams" / diagram).read_text(encoding="utf-8")
    if diagram == "task-states.dot":
        for state in ("pending", "leased", "done", "error", "cancelled"):
            assert re.search(rf"\b{state}\b", dot), state
    else:
        assert "direct" in dot and "tunnel" in dot and "relay" in dot
