"""The str enums of states, failure kinds and ``errors=``: the very words stored and written."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import pytest
from store_helpers import Storage

from sheepdog.connect import ConnectMode
from sheepdog.error_policy import ErrorPolicy
from sheepdog.store import OPEN_STATES, FailureKind, RequestState, TaskState

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = (ROOT / "sheepdog" / "store" / "schema.sql").read_text()
STUB = (ROOT / "worker_stub" / "sheepdog_worker.py").read_text()

ENUMS: list[type[Enum]] = [TaskState, RequestState, FailureKind, ErrorPolicy, ConnectMode]
MEMBERS = [member for enum in ENUMS for member in enum]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Storage]:
    with Storage(str(tmp_path / "db.sqlite")) as storage:
        yield storage


def _checked(column_table: str) -> list[str]:
    """The words the schema's CHECK allows for ``state`` in the table named."""
    table = SCHEMA[SCHEMA.index(f"CREATE TABLE IF NOT EXISTS {column_table}"):]
    allowed = re.search(r"CHECK \(state IN \(([^)]*)\)\)", table)
    assert allowed is not None
    return re.findall(r"'(\w+)'", allowed.group(1))


def test_the_values_are_the_schemas_words() -> None:
    assert [state.value for state in TaskState] == _checked("tasks")
    assert [state.value for state in RequestState] == _checked("requests")
    assert OPEN_STATES == ("pending", "leased")


def test_the_kinds_the_stub_writes_are_failure_kinds() -> None:
    # The stub imports nothing of the library: its own strings must stay these.
    assert '"kind": "load"' in STUB
    assert FailureKind.LOAD == "load"
    assert FailureKind("exception") is FailureKind.EXCEPTION


@pytest.mark.parametrize("member", MEMBERS, ids=str)
def test_a_member_is_written_as_its_plain_value(member: Enum) -> None:
    value = member.value
    assert member == value
    assert hash(member) == hash(value)
    assert str(member) == value
    assert f"{member}" == value
    assert f"[{member:>10}]" == f"[{value:>10}]"
    assert "%s" % member == value  # noqa: UP031 - the %-formatting logging uses
    assert format(member) == value
    assert json.dumps({member: member}) == json.dumps({value: value})
    assert pickle.loads(pickle.dumps(member)) is member


def test_messages_name_the_plain_words() -> None:
    line = f"task 3 is {TaskState.DONE}; request {RequestState.CANCELLED}, kind {FailureKind.LOST}"
    assert line == "task 3 is done; request cancelled, kind lost"
    assert "errors=%s" % ErrorPolicy.RAISE == "errors=raise"  # noqa: UP031


def test_rows_read_back_compare_equal_to_the_members(db: Storage) -> None:
    rid = db.new_request(b"FUNC", b"", [b"a", b"b", b"c"])
    counts = db.task_counts(rid)
    assert list(counts) == [state.value for state in TaskState]
    assert all(type(key) is str for key in counts)
    assert counts[TaskState.PENDING] == 3 and counts.get(TaskState.DONE) == 0
    assert db.task_states(rid) == [TaskState.PENDING] * 3
    assert db.get_request_state(rid) == RequestState.OPEN
    db.fail_tasks(rid, [1], FailureKind.JOB_LOST, "its job went away")
    db.cancel(rid)
    assert db.get_request_state(rid) == RequestState.CANCELLED
    assert db.task_states(rid) == [TaskState.ERROR, TaskState.CANCELLED, TaskState.CANCELLED]
    kinds = [error["kind"] for _, _, error in db.get_task_errors(rid)]
    assert kinds == [FailureKind.JOB_LOST, FailureKind.CANCELLED, FailureKind.CANCELLED]
    # Stored as the plain text, as a database written before the enums holds it.
    assert db.conn.execute(
        "SELECT count(*) FROM tasks WHERE json_extract(error, '$.kind') = 'job_lost'"
    ).fetchone() == (1,)


@pytest.mark.parametrize("given", ["none", "raise", ErrorPolicy.NONE, ErrorPolicy.RAISE])
def test_errors_takes_the_plain_strings(given: str) -> None:
    assert ErrorPolicy.parse(given) == given


@pytest.mark.parametrize("given", ["Raise", "", None, True, 1, "ErrorPolicy.RAISE"])
def test_errors_refuses_other_values_naming_the_valid_ones(given: object) -> None:
    with pytest.raises(ValueError) as caught:
        ErrorPolicy.parse(given)
    assert str(caught.value) == f"errors must be 'none' or 'raise', got {given!r}"
