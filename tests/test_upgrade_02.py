"""Upgrading from Sheepdog 0.2.3 is drop-in (issue 13): each point, no cluster needed.

The database tests use a real 0.2.3 database made by the published 0.2.3
package itself (``tests/original02.py``), and read the backup back with it.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from original02 import EXPECTED, copy_database, read_with_original
from store_helpers import Storage
from test_docs_blocks import block
from test_integration_local import Setup, finish

import sheepdog
from sheepdog import serialisation
from sheepdog.client import Client, stub
from sheepdog.deployment import Deployer
from sheepdog.errors import (
    ConfigError,
    SerialisationError,
    StorageError,
    UnknownRequestError,
    UnknownTaskError,
)
from sheepdog.scheduler.gridengine import parse_memory
from sheepdog.storage import SCHEMA_VERSION

MIGRATED = "was a Sheepdog 0.2.3 database"


def add(a: int, b: int) -> int:
    return a + b


def double(x: Any) -> Any:
    return x * 2


@pytest.fixture
def old_db(original02_database: Path, tmp_path: Path) -> Path:
    """A fresh copy of the 0.2.3 database, named as both versions name it by default."""
    return copy_database(original02_database, tmp_path / "sheepdog.sqlite")


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def migrate(path: Path) -> Storage:
    with pytest.warns(UserWarning, match=MIGRATED) as caught:
        storage = Storage(path)
    assert len(caught) == 1, [str(w.message) for w in caught]
    return storage


# -- 1. the database is migrated, after a backup ------------------------------------------


def test_a_023_database_is_migrated_in_place_with_a_backup_beside_it(old_db: Path) -> None:
    before = dump(old_db)
    with migrate(old_db) as storage:
        assert storage.schema_version() == SCHEMA_VERSION
        listed = storage.list_requests()
    assert [r["id"] for r in listed] == sorted(EXPECTED)
    assert {r["label"] for r in listed} == {"Sheepdog 0.2.3"}
    (backup,) = old_db.parent.glob("sheepdog.sqlite.sheepdog-0.2.3-backup*")
    assert dump(backup) == before
    assert read_with_original(backup, 1)["results"] == [3, 7, None]  # 0.2.3 still reads it
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    tables = sqlite3.connect(old_db).execute("SELECT name FROM sqlite_master").fetchall()
    assert not [t for (t,) in tables if t.startswith("sheepdog02_") or t in ("results", "errors")]


def test_the_old_results_and_errors_read_as_they_did_under_023(old_db: Path) -> None:
    original = {rid: read_with_original(old_db, rid) for rid in (1, 2)}
    migrate(old_db).close()
    for rid, (args, results) in EXPECTED.items():
        got = sheepdog.get_results(rid, str(old_db), block=False)
        assert got == list(zip(args, results)), rid
    assert original[1]["results"] == [3, 7, None] and original[2]["results"] == [30]
    (arg, error), = sheepdog.get_errors(1, str(old_db))
    assert arg == (5, "x")
    assert isinstance(error, sheepdog.RemoteError)
    assert error.type_name == "TypeError" and "unsupported operand" in error.message
    assert error.task_index == 3
    # The Storage level gives the text back, exactly as 0.2.3 stored and returned it.
    with Storage(old_db) as storage:
        [(blob, text)] = storage.get_errors(1)
    assert pickle.loads(blob) == (5, "x")
    assert [text] == original[1]["errors"]
    assert text.startswith("Traceback (most recent call last):")
    assert str(error).endswith(text.rstrip())


def test_a_task_that_never_ran_under_023_is_an_error_not_a_wait(old_db: Path) -> None:
    migrate(old_db).close()
    started = time.monotonic()
    assert sheepdog.get_results(3, str(old_db), block=True, timeout_s=30) == [((7, 8), None)]
    assert time.monotonic() - started < 10
    (arg, error), = sheepdog.get_errors(3, str(old_db))
    assert arg == (7, 8) and error.kind == "migrated"
    assert "map it again" in error.message


def test_new_requests_go_into_the_same_file_after_the_old_ones(old_db: Path) -> None:
    with migrate(old_db) as storage:
        rid = storage.new_request(serialisation.serialise_function(add), b"",
                                  serialisation.serialise_args([(1, 1)]))
    assert rid == max(EXPECTED) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: opening it again is silent
        with Storage(old_db) as storage:
            assert storage.count_tasks(rid) == 1
            assert [r["id"] for r in storage.list_requests()] == [*sorted(EXPECTED), rid]
    assert len(list(old_db.parent.glob("*backup*"))) == 1


def test_a_second_migration_never_overwrites_a_backup(old_db: Path, tmp_path: Path) -> None:
    pristine = copy_database(old_db, tmp_path / "pristine.sqlite")
    migrate(old_db).close()
    for suffix in ("-wal", "-shm", "-writers"):
        Path(f"{old_db}{suffix}").unlink(missing_ok=True)
    copy_database(pristine, old_db)
    migrate(old_db).close()
    backups = sorted(p.name for p in tmp_path.glob("sheepdog.sqlite.sheepdog-0.2.3-backup*"))
    assert backups == ["sheepdog.sqlite.sheepdog-0.2.3-backup",
                       "sheepdog.sqlite.sheepdog-0.2.3-backup.1"]


# -- 2. lists are unpacked, as 0.2.3 did ------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    try:
        yield setup
    finally:
        setup.close()


def test_lists_and_tuples_are_unpacked_anything_else_is_one_argument(local: Setup) -> None:
    assert stub.is_unpacked([1, 2]) and stub.is_unpacked((1, 2))
    assert not any(stub.is_unpacked(v) for v in ("ab", {"a": 1}, 3, range(2), b"xy"))
    rid = local.request(add, [[1, 2], [3, 4], (5, 6)])
    code, out, err = finish(local.start(local.job(rid, 3), 1))
    assert code == 0, f"{out}\n{err}"
    assert local.results(rid) == [3, 7, 11]
    rid = local.request(double, [*range(3), "ab", {"a": 1}])
    code, out, err = finish(local.start(local.job(rid, 5), 1))
    assert code == 0, f"{out}\n{err}"
    assert local.results(rid)[:4] == [0, 2, 4, "abab"]
    assert local.storage.get_task_errors(rid)[0][2]["type"] == "TypeError"  # dict * 2


# -- 3. lookup errors are ValueErrors ------------------------------------------------------


def test_storage_lookup_errors_are_value_errors_as_in_023(tmp_path: Path) -> None:
    with Storage(tmp_path / "db.sqlite") as storage:
        rid = storage.new_request(b"F", b"", [b"a"])
        for call in (
            lambda: storage.get_details(rid + 1, 1),
            lambda: storage.get_details(rid, 2),
            lambda: storage.store_result(rid, 5, b"r"),
            lambda: storage.store_error(rid + 1, 1, "e"),
        ):
            with pytest.raises(ValueError) as caught:
                call()
            assert isinstance(caught.value, (UnknownRequestError, UnknownTaskError))
            assert isinstance(caught.value, (LookupError, StorageError, sheepdog.SheepdogError))
        with pytest.raises(UnknownTaskError, match="has tasks 1..1, not 2") as task:
            storage.get_details(rid, 2)
        assert (task.value.request_id, task.value.task_index, task.value.n_tasks) == (rid, 2, 1)


# -- 4. Storage.get_errors gives (args, text) ---------------------------------------------


def test_storage_get_errors_gives_args_and_text(tmp_path: Path) -> None:
    with Storage(tmp_path / "db.sqlite") as storage:
        rid = storage.new_request(b"F", b"", [b"a", b"b", b"c"])
        storage.store_error(rid, 1, "MemoryError text")
        storage.store_error(rid, 2, {"type": "KeyError", "message": "'k'",
                                     "traceback": "Traceback ...\nKeyError: 'k'\n"})
        storage.cancel(rid, "no longer needed")
        errors = storage.get_errors(rid)
    assert errors == [
        (b"a", "MemoryError text"),
        (b"b", "Traceback ...\nKeyError: 'k'\n"),
        (b"c", "Cancelled: no longer needed"),
    ]
    assert "MemoryError" in errors[0][1]


# -- 5. serialise_namespace says what to call ----------------------------------------------


def test_serialise_namespace_refuses_a_namespace_it_would_lose() -> None:
    assert serialisation.serialise_namespace({}) == b""
    with pytest.raises(SerialisationError, match=r"serialise_function\(f, ns\)") as caught:
        serialisation.serialise_namespace({"constant": 12})
    assert "constant" in str(caught.value)
    # What it says to do works: the namespace reaches the function.
    f = serialisation.deserialise_function(
        serialisation.serialise_function(lambda x: x + constant, {"constant": 12})  # type: ignore[name-defined]  # noqa: F821
    )
    assert f(1) == 13


# -- 6. Client.run() before get_details() touches nothing ---------------------------------


def test_run_before_get_details_refuses_before_leasing(local: Setup) -> None:
    rid = local.request(add, [(1, 2), (3, 4)])
    client = Client(local.server.url_for("127.0.0.1") + "/", local.storage.get_secret(rid),
                    rid, 1, retry_s=5.0)
    with pytest.raises(RuntimeError, match="get_details"):
        client.run()
    assert local.storage.task_counts(rid)["pending"] == 2


# -- 7. a missing ssh_keyfile is a ConfigError naming it -----------------------------------


def test_a_missing_ssh_keyfile_is_named_before_anything_is_stored(tmp_path: Path) -> None:
    missing = str(tmp_path / "no such key")
    with pytest.raises(ConfigError, match="no such key") as caught:
        Deployer("headnode", 22, "me", missing)
    assert caught.value.key == "ssh_keyfile"
    dbfile = tmp_path / "sheepdog.sqlite"
    config = {"host": "headnode", "ssh_keyfile": missing, "dbfile": str(dbfile)}
    with pytest.raises(ConfigError, match="no such key"):
        sheepdog.map_async(add, [(1, 2)], config)
    assert not dbfile.exists()
    key = tmp_path / "id_rsa"
    key.write_text("not checked until connecting")
    assert Deployer("headnode", 22, "me", str(key)).keyfile == str(key)


# -- 8. the 0.2.3 names ------------------------------------------------------------------


def test_the_023_names_are_back() -> None:
    keys_023 = {"ssh_port", "ssh_user", "ssh_keyfile", "ssh_dir", "dbfile", "port", "ge_opts",
                "shell", "localhost"}
    assert keys_023 <= set(sheepdog.default_config)
    assert "host" not in sheepdog.default_config
    assert sheepdog.default_config["dbfile"] == "./sheepdog.sqlite"
    assert sheepdog.default_config["ssh_dir"] == ".sheepdog"
    assert sheepdog.__version_info__ == tuple(int(p) for p in sheepdog.__version__.split("."))
    assert sheepdog.map_sync is sheepdog.map
    s = serialisation
    assert s.deserialise_arg(s.serialise_arg([1, "a"])) == [1, "a"]
    assert s.deserialise_args(s.serialise_args([(1, 2), "x"])) == [(1, 2), "x"]
    # 0.2.3's base64 blobs still read (this one is 0.2.3's serialise_pickle(3)).
    assert s.deserialise_pickle(b"gARLAy4=") == 3
    assert s.deserialise_pickle("gARLAy4=") == 3
    with pytest.raises(SerialisationError, match="neither a pickle nor"):
        s.deserialise_pickle(b"not base64!")


def test_deserialise_function_takes_023s_namespace_argument() -> None:
    payload = serialisation.serialise_function(lambda x: x * factor)  # type: ignore[name-defined]  # noqa: F821
    f = serialisation.deserialise_function(payload, {"factor": 3})
    assert f(2) == 6
    with pytest.raises(SerialisationError, match="must be a dict"):
        serialisation.deserialise_function(payload, ["factor"])  # type: ignore[arg-type]


def test_deserialise_namespace_says_what_replaced_it() -> None:
    assert serialisation.deserialise_namespace(b"") == {}
    with pytest.raises(SerialisationError, match=r"deserialise_function\(payload\)"):
        serialisation.deserialise_namespace(b"gARLAy4=")


# -- 9. changed on purpose, and said so ---------------------------------------------------


def test_lower_case_memory_units_follow_grid_engine() -> None:
    assert parse_memory("1g") == 10**9
    assert parse_memory("1G") == 2**30
    assert parse_memory("500m") == 500 * 10**6


def test_the_upgrading_page_is_in_the_docs() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs"
    page = (docs / "upgrading.rst").read_text(encoding="utf-8")
    assert page.startswith("Upgrading from 0.2\n")
    assert "upgrading" in (docs / "index.rst").read_text(encoding="utf-8")
    for point in ("backup", "f(*arg)", "ValueError", "get_errors", "serialise_namespace",
                  "get_details", "ssh_keyfile", "default_config", "10\\ :sup:`9`",
                  "submit_results", "HTTP_RETRIES", "sheepdog_032_<tag>.py", "Deployer(",
                  "from sheepdog import job_file", "sheepdog.Server()"):
        assert point in page, point
    assert "still named ``sheepdog_032.py``" not in page  # they are not
    changelog = (docs / "changelog.rst").read_text(encoding="utf-8")
    assert "upgrading" in changelog and "unpack" in changelog
    assert "without ``deploy``" not in changelog  # they are back, as the upgrade notes say
    assert "list" in (docs / "quickstart.rst").read_text(encoding="utf-8")


def test_the_upgrading_page_examples_run(original02_database: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    copy_database(original02_database, tmp_path / "sheepdog.sqlite")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    with pytest.warns(UserWarning, match=MIGRATED):
        exec("\n".join(block("upgrading.rst", "import sheepdog").lines), namespace)
    assert namespace["old"] == [((1, 2), 3), ((3, 4), 7), ((5, "x"), None)]
    exec("\n".join(block("upgrading.rst", "from sheepdog.storage import Storage").lines),
         namespace)
    assert namespace["text"].startswith("Traceback")
    exec("\n".join(block("upgrading.rst", "from sheepdog import Storage").lines), namespace)
    assert namespace["found"] is False
    assert os.path.exists("sheepdog.sqlite.sheepdog-0.2.3-backup")
