"""The package version, in one place (the CLI reads it without importing the package root)."""

__version__ = "0.3.0"
#: ``(0, 3, 0)``, as Sheepdog 0.2 had it.
__version_info__ = tuple(int(part) for part in __version__.split("."))
