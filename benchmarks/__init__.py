"""Benchmarks for sheepdog: run them all with ``ci/bench`` (``--quick`` for a short version).

Each module has a ``main(argv)`` that prints a table and writes its figures as
JSON under ``bench-results/``; docs/benchmarks.rst holds the latest table.
"""
