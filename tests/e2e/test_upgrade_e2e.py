"""A Sheepdog 0.2.3 user upgrades: the seed's quickstart, unchanged, on their old database.

The database is made by the published 0.2.3 package (``tests/original02.py``)
and sits where both versions look by default, ``./sheepdog.sqlite``. The
quickstart's sessions are the seed documentation's own (Sheepdog 0.2's
"Synchronous Map", "Namespaces" and "Imports"); only the config line, which
names the author's cluster "fear", becomes our cluster's.
"""

from __future__ import annotations

import doctest
import os
import re
from pathlib import Path
from typing import Any

import pytest
from original02 import EXPECTED, copy_database

import sheepdog
from sheepdog.deployment import Deployer
from sheepdog.job_file import stub_file_name
from sheepdog.poll import poll_until
from sheepdog.storage import Storage

pytestmark = pytest.mark.e2e

#: The seed's quickstart sessions, verbatim (its OCR's "-1" read back as "-l").
SEED_QUICKSTART = '''
>>> import sheepdog
>>> def f(a, b):
...    return a + b
...
>>> args = [(1, 1), (1, 2), (2, 2)]
>>> conf = {"host": "fear", "ge_opts": ["-l ubuntu=1", "-l lr=0"]}
>>> sheepdog.map(f, args, conf)
[2, 3, 4]

>>> import sheepdog
>>> constant = 12
>>> def g(x):
...    return x * 2
...
>>> def f(a, b):
...    return a + g(b) + constant
...
>>> args = [(1, 2), (2, 3), (3, 4)]
>>> conf = {"host": "fear"}
>>> namespace = {"constant": constant, "g": g}
>>> sheepdog.map_sync(f, args, conf)
[17, 20, 23]

>>> def g(x):
...     return np.mean(x)
...
>>> def f(x):
...     import numpy as np
...     global np
...     return g(x)
...
'''

CONFIG_LINE = re.compile(r'^>>> conf = \{"host": "fear".*\}$', re.MULTILINE)


def test_the_seed_quickstart_runs_on_a_migrated_023_database(
    original02_database: Path,
    config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copy_database(original02_database, tmp_path / "sheepdog.sqlite")
    monkeypatch.chdir(tmp_path)
    # The user's own directory and the default dbfile: no dbfile key, as in the seed.
    ours = {key: value for key, value in config.items() if key != "dbfile"}
    assert Path(config["dbfile"]) == tmp_path / "sheepdog.sqlite"  # the fixture cleans up
    text, replaced = CONFIG_LINE.subn(f">>> conf = {ours!r}", SEED_QUICKSTART)
    assert replaced == 2
    test = doctest.DocTestParser().get_doctest(text, {}, "seed quickstart", "seed", 0)
    assert len(test.examples) >= 12
    runner = doctest.DocTestRunner()
    with pytest.warns(UserWarning, match="was a Sheepdog 0.2.3 database") as said:
        result = runner.run(test, out=lambda s: pytest.fail(s))
    assert result.failed == 0 and result.attempted == len(test.examples)
    assert len(said) == 1, "the migration is said once"
    assert (tmp_path / "sheepdog.sqlite.sheepdog-0.2.3-backup").is_file()

    # The old requests are still there, under their ids, and the new ones came after.
    for rid, (args, results) in EXPECTED.items():
        assert sheepdog.get_results(rid, "./sheepdog.sqlite", block=False) == list(
            zip(args, results)
        )
    with Storage("./sheepdog.sqlite") as storage:
        requests = storage.list_requests()
    new = [r["id"] for r in requests if r["label"] != "Sheepdog 0.2.3"]
    assert new == [max(EXPECTED) + 1, max(EXPECTED) + 2]
    assert [r for _, r in sheepdog.get_results(new[1], "./sheepdog.sqlite")] == [17, 20, 23]


@pytest.mark.gridengine("Deployer.submit runs qsub, as 0.2.3's did")
def test_deployer_deploys_and_submits_as_023_did(config: dict[str, Any]) -> None:
    """0.2.3's low-level path: ``Deployer(...).deploy(text, id, dir)``, then ``submit``."""
    directory = f".sheepdog-deployer-e2e-{os.getpid()}"
    d = Deployer(config["host"], config["ssh_port"], config["ssh_user"],
                 config.get("ssh_keyfile"), known_hosts=config.get("known_hosts"))
    try:
        job = ("#!/bin/sh\n#$ -S /bin/sh\n#$ -cwd\n"
               f"echo ran as $JOB_ID > $HOME/{directory}/ran\n")
        d.deploy(job, 23, directory)
        # The job file, and the worker stub that job files run (put once per version).
        assert d.run(f"ls {directory}").stdout.split() == sorted(
            ["sheepdog_023.py", stub_file_name()])
        answer = d.submit(23, directory)
        assert "has been submitted" in answer, answer
        job_id = answer.split()[2]

        def ran() -> bool:
            return d.run(f"cat {directory}/ran", check=False).stdout.strip() == f"ran as {job_id}"

        assert poll_until(ran, timeout_s=300, interval_s=1.0, max_interval_s=5.0)
    finally:
        d.run(f"rm -rf {directory}", check=False)
        d.close()
