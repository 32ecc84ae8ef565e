"""Sphinx configuration for the sheepdog documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

project = "sheepdog"
author = "sheepdog developers"
copyright = "2026, sheepdog developers"
from sheepdog.version import __version__ as release  # noqa: E402 - after the path

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.graphviz",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "config_keys",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
# furo's content column shows 79-column code without a scroll bar at 1280 px
# (tests/test_docs_blocks.py keeps every example within that).
html_theme = "furo"
html_title = f"sheepdog {release}"
graphviz_output_format = "svg"
exclude_patterns = ["_build"]
