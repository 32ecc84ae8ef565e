"""Programs sheepdog runs elsewhere, kept as files and sent as their text.

Each module here is a whole program for another Python: the relay and the reach probe
run on the head node (``python3 -c TEXT ARGS...``, :mod:`sheepdog.tunnel`), the node
probe is pasted into ``sheepdog doctor``'s probe job (:mod:`sheepdog.doctor`), and the
appliers are compiled under a module name nothing can import so that they ship by value
(:mod:`sheepdog.executor`). So they use the standard library only and run on Python 3.6
(``ci/test`` checks them with vermin, as the worker stub); their types are in type
comments, which every Python parses. Values reach them as arguments, never by editing
their text. Importing one here runs nothing: each program's work is under
``if __name__ == "__main__"`` or in a call its sender appends.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["program_source"]


@functools.cache
def program_source(name: str) -> str:
    """The text of the program ``name`` (``relay`` for ``relay.py``), as it is sent."""
    return resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")
