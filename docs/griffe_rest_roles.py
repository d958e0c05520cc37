"""A griffe extension for the API reference: the docstrings' reST roles written as Markdown.

The docstrings follow torch.optim's style (Google sections with reST roles such as ``:math:`\\theta``` and
``:class:`~pathlib.Path```), which mkdocstrings would print raw. Each role becomes a code span of its content
(the last component for ``~`` references, as Sphinx shows them), and a ``.. math::`` line a code span too.
Paragraphs of a numbered list item indented by 3 spaces (reST) get the 4 that Markdown needs to stay in the item,
and a blank line before the next item.
Loaded by mkdocs.yml (``extensions``); changes nothing in the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:math|meth|class|func|mod|data|attr|obj|exc|ref):`(?P<tilde>~?)(?P<text>[^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math:: (?P<formula>.+)$", re.MULTILINE)


def markdown_roles(text: str) -> str:
    """``text`` with reST roles and one-line ``.. math::`` directives as Markdown code spans."""

    def role(match: re.Match) -> str:
        content = match.group("text")
        return f"`{content.rsplit('.', 1)[-1] if match.group('tilde') else content}`"

    text = MATH_DIRECTIVE.sub(lambda m: f"{m.group('indent')}`{m.group('formula').strip()}`", text)
    return ROLE.sub(role, list_indentation(text))


def list_indentation(text: str) -> str:
    """Indent the 3-space continuation lines of numbered list items (``1. ...``) by 4 spaces; a blank line before
    an item that follows an indented paragraph."""
    lines, in_item = [], False
    for line in text.split("\n"):
        if NUMBERED_ITEM.match(line):
            if lines and lines[-1].startswith("    "):
                lines.append("")  # else Markdown reads the item as the end of the indented paragraph before it
            in_item = True
        elif line and not line.startswith(" "):
            in_item = False
        lines.append(" " + line if in_item and line.startswith("   ") and not line.startswith("    ") else line)
    return "\n".join(lines)


NUMBERED_ITEM = re.compile(r"^\d+\. ")


class RestRoles(griffe.Extension):
    """Rewrite every docstring's reST roles as Markdown when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_roles(obj.docstring.value)
