"""MkDocs hook: renders the `lynx-hf` command line's help into docs/reference/cli.md at build time.

The page holds the marker ``<!-- cli-reference -->``; it is replaced by the help of the top-level parser and of
every subcommand, read from ``lynx_hf.cli.build_parser()``, so the reference cannot drift from the parser.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"
PAGE = "reference/cli.md"


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps no public list of subparsers
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip()


def render() -> str:
    from lynx_hf.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps at the terminal width: fix it so builds are reproducible
    try:
        parser = build_parser()
        parts = ["## `lynx-hf`", "", "```text", _help(parser), "```", ""]
        for name, sub in _subcommands(parser):
            parts += [f"## `lynx-hf {name}`", "", "```text", _help(sub), "```", ""]
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its {MARKER} marker: the CLI reference has nowhere to go")
    return markdown.replace(MARKER, render())
