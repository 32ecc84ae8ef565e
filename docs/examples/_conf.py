"""Shared by the documentation's examples: the config they run against.

The examples print what the documentation says they print; the test suite runs
each of them against a real Grid Engine (SHEEPDOG_CONFIG names its config file).
"""

import os

import sheepdog

conf = sheepdog.Config.from_file(os.environ.get("SHEEPDOG_CONFIG", ".cluster/cluster.json"))
dbfile = conf.dbfile
