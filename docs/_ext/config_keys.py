"""A Sphinx directive that renders the keys of :class:`sheepdog.Config` as tables.

``.. config-keys:: SSH`` renders the fields under the ``# --- SSH ---`` comment
of the class: key, default and meaning (the field's ``#:`` comment). The tables
are made from the dataclass itself, so the page cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

_SECTION = re.compile(r"^\s*# --- (.+?) -+\s*$")
_FIELD = re.compile(r"^\s{4}(\w+): ")


def config_sections() -> dict[str, list[str]]:
    """The field names of Config under each ``# --- name ---`` comment, in order."""
    from sheepdog.config import Config

    sections: dict[str, list[str]] = {}
    current = None
    names = {f.name for f in dataclasses.fields(Config)}
    for line in inspect.getsource(Config).splitlines():
        heading = _SECTION.match(line)
        if heading:
            current = heading.group(1)
            sections[current] = []
            continue
        field = _FIELD.match(line)
        if field and field.group(1) in names:
            if current is None:
                raise ValueError(f"Config.{field.group(1)} is above every section comment")
            sections[current].append(field.group(1))
    return sections


def default_text(field: dataclasses.Field[Any]) -> str:
    """The default as the table shows it: a literal, "required", or what a factory gives."""
    if field.default_factory is not dataclasses.MISSING:
        doc = inspect.getdoc(field.default_factory) or field.default_factory.__name__
        return doc.splitlines()[0].rstrip(".")
    if field.name == "host":
        return 'required (not for ``scheduler="local"``)'
    if field.default == "":
        return "required"
    value = field.default
    return f"``{value!r}``".replace("'", '"') if isinstance(value, str) else f"``{value!r}``"


class ConfigKeys(SphinxDirective):
    """``.. config-keys:: SECTION``: a key, default, meaning table of one section."""

    required_arguments = 1
    final_argument_whitespace = True

    def run(self) -> list[nodes.Node]:
        from sheepdog.config import Config

        section = self.arguments[0]
        sections = config_sections()
        if section not in sections:
            raise self.error(f"no section {section!r} in Config; there are {list(sections)}")
        self.env.note_dependency(inspect.getsourcefile(Config) or "")
        docs = ModuleAnalyzer.for_module("sheepdog.config").find_attr_docs()
        fields = {f.name: f for f in dataclasses.fields(Config)}
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 22 22 56", "",
                 "   * - key", "     - default", "     - meaning"]
        for name in sections[section]:
            meaning = [line for line in docs.get(("Config", name), []) if line.strip()]
            if not meaning:
                raise self.error(f"Config.{name} has no #: comment to show")
            lines += [f"   * - ``{name}``", f"     - {default_text(fields[name])}",
                      f"     - {meaning[0]}"]
            lines += [f"       {line}" for line in meaning[1:]]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="sheepdog/config.py"), 0, container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("config-keys", ConfigKeys)
    return {"parallel_read_safe": True, "version": "1"}
