"""Config: the original's dict and defaults, validation that names the key."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from sheepdog.config import Config, as_config
from sheepdog.errors import ConfigError
from sheepdog.scheduler import GridEngine, check_options

ORIGINAL_KEYS = {
    "host", "ssh_port", "ssh_user", "ssh_keyfile", "ssh_dir", "dbfile", "port",
    "localhost", "shell", "ge_opts",
}


def test_original_keys_and_defaults() -> None:
    config = as_config({"host": "fear"})
    names = {f.name for f in dataclasses.fields(Config)}
    assert ORIGINAL_KEYS <= names
    assert config.ssh_port == 22
    assert config.ssh_dir == ".sheepdog"
    assert config.dbfile == "./sheepdog.sqlite"
    assert config.port is None
    assert config.shell == "/usr/bin/python3"
    assert config.ge_opts is None
    assert config.ssh_keyfile is None


def test_dict_and_object_are_the_same() -> None:
    as_dict = as_config({"host": "fear", "ge_opts": ["-l ubuntu=1", "-l lr=0"], "port": 7676})
    as_obj = Config(host="fear", ge_opts=("-l ubuntu=1", "-l lr=0"), port=7676)
    assert as_dict == as_obj


def test_frozen() -> None:
    config = Config(host="fear")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.host = "other"  # type: ignore[misc]


@pytest.mark.skipif(sys.version_info < (3, 10), reason="kw_only dataclasses need 3.10")
def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        Config("fear")  # type: ignore[misc]


def test_unknown_key_names_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        as_config({"host": "fear", "sshport": 22})
    message = str(info.value)
    assert "'sshport'" in message
    for key in ORIGINAL_KEYS:
        assert key in message
    assert info.value.key == "sshport"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({}, "host"),
        ({"host": ""}, "host"),
        ({"host": 3}, "host"),
        ({"host": "-oProxyCommand=evil"}, "host"),
        ({"host": "a b"}, "host"),
        ({"host": "h; rm -rf ~"}, "host"),
        ({"host": "h", "ssh_port": "22"}, "ssh_port"),
        ({"host": "h", "ssh_port": True}, "ssh_port"),
        ({"host": "h", "ssh_port": 0}, "ssh_port"),
        ({"host": "h", "ssh_port": 70000}, "ssh_port"),
        ({"host": "h", "ssh_user": "-l root"}, "ssh_user"),
        ({"host": "h", "ssh_user": "a b"}, "ssh_user"),
        ({"host": "h", "ssh_dir": ""}, "ssh_dir"),
        ({"host": "h", "ssh_dir": "x\ny"}, "ssh_dir"),
        ({"host": "h", "ssh_dir": 5}, "ssh_dir"),
        ({"host": "h", "dbfile": None}, "dbfile"),
        ({"host": "h", "port": -1}, "port"),
        ({"host": "h", "port": 1.5}, "port"),
        ({"host": "h", "localhost": "x$(id)"}, "localhost"),
        ({"host": "h", "shell": "python3"}, "shell"),
        ({"host": "h", "shell": "/usr/bin/python3 -c evil"}, "shell"),
        ({"host": "h", "shell": "/usr/bin/python3\n#$ -l x"}, "shell"),
        ({"host": "h", "ge_opts": "-l a=1"}, "ge_opts"),
        ({"host": "h", "ge_opts": [3]}, "ge_opts[0]"),
        ({"host": "h", "ge_opts": ["-l a=1\n#$ -q evil"]}, "ge_opts[0]"),
        ({"host": "h", "ge_opts": ["l a=1"]}, "ge_opts"),
        ({"host": "h", "ge_opts": ["-t 1-5"]}, "ge_opts"),
        ({"host": "h", "ge_opts": ["-S /bin/sh"]}, "ge_opts"),
        ({"host": "h", "workers": 0}, "workers"),
        ({"host": "h", "mem_gb": -1}, "mem_gb"),
        ({"host": "h", "mem_gb": float("nan")}, "mem_gb"),
        ({"host": "h", "h_rt": "an hour"}, "h_rt"),
        ({"host": "h", "queue": "all.q -l evil"}, "queue"),
        ({"host": "h", "pe": ["smp"]}, "pe"),
        ({"host": "h", "pe": ["smp; x", 2]}, "pe"),
        ({"host": "h", "mem_resource": "h_vmem=1G"}, "mem_resource"),
        ({"host": "h", "retries": -1}, "retries"),
        ({"host": "h", "keep_jobs_on_interrupt": "yes"}, "keep_jobs_on_interrupt"),
        ({"host": "h", "mode": "pickle"}, "mode"),
        ({"host": "h", "lease_s": 0}, "lease_s"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_options(as_config(values))  # -t, -S: Grid Engine's rule, when it is opened
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_grid_engine_resource_options() -> None:
    config = Config(
        host="h", mem_gb=2, h_rt="1:00:00", queue="all.q", pe=("smp", 4), max_running=5,
        mem_resource="mem_free",
    )
    assert GridEngine.resource_options(config) == [
        "-l mem_free=2G", "-l h_rt=1:00:00", "-q all.q", "-pe smp 4", "-tc 5",
    ]
    assert GridEngine.resource_options(Config(host="h", mem_gb=0.5)) == ["-l h_vmem=512M"]


def test_from_file_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    original = Config(host="127.0.0.1", ssh_port=2222, ssh_user="sheep", pe=("smp", 2))
    path.write_text(json.dumps(original.as_dict()))
    assert as_config(str(path)) == original
    assert as_config(path) == original
    assert original.replace(ssh_port=2223).ssh_port == 2223


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        as_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        as_config(str(bad))
    with pytest.raises(ConfigError, match="must be a dict"):
        as_config(42)  # type: ignore[arg-type]


def test_a_misspelt_key_says_which_key_was_meant_first() -> None:
    with pytest.raises(ConfigError) as info:
        as_config({"host": "fear", "ssh_prot": 2222})
    message = str(info.value)
    assert message.startswith(
        "unknown config key 'ssh_prot' (did you mean 'ssh_port'?); the valid keys are:\n"
    )
    # Every valid key is named, on lines that fit a terminal.
    lines = message.splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    named = " ".join(lines[1:]).replace(",", " ").split()
    assert set(named) == {f.name for f in dataclasses.fields(Config)}, lines
    with pytest.raises(ConfigError) as info:
        as_config({"host": "fear", "workres": 2, "qqqq": 1})
    assert str(info.value).startswith(
        "unknown config keys 'qqqq', 'workres' (did you mean 'workers'?); "
    )
