"""Griffe extension: reads a Google-style ``Example:`` heading as the ``Examples:`` section.

The project's docstrings use ``Example:`` (singular), which griffe's Google parser would otherwise render as a plain
admonition, turning ``>>>`` lines into block quotes. With this extension they render as code, with their output.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class SingularExamples(griffe.Extension):
    """Rename ``Example:`` headings to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
