"""Sphinx configuration for the sheepdog documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "sheepdog"
author = "sheepdog developers"
copyright = "2026, sheepdog developers"
release = "0.3.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
