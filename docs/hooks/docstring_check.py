"""MkDocs hook: every public name of ``lynx_hf`` documents its parameters in Google-style sections.

For each name in ``lynx_hf.__all__`` (classes: their ``__init__`` and public methods too) it checks that every
parameter appears under ``Args:`` and that a function returning something has a ``Returns:`` (or ``Yields:``)
section. With ``extra.require_docstring_sections: true`` in mkdocs.yml each gap is a warning, so
``mkdocs build --strict`` fails on it; otherwise the build logs how many gaps remain.

Run it directly to list the gaps: ``python docs/hooks/docstring_check.py``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.lynx_docstrings")
ROOT = Path(__file__).resolve().parents[2]
SKIP_PARAMETERS = {"self", "cls"}


def _sections(obj):
    if obj.docstring is None:
        return None
    # parse problems are mkdocstrings' to report, once, while rendering
    return obj.docstring.parse("google", warn_missing_types=False, warn_unknown_params=False)


def _documented(sections, kind: str) -> set[str]:
    return {p.name.lstrip("*") for s in sections if s.kind.value == kind for p in s.value}


def _check_function(func, label: str, gaps: list[str], docstring_owner=None) -> None:
    owner = docstring_owner or func
    sections = _sections(owner)
    if sections is None:
        gaps.append(f"{label}: no docstring")
        return
    wanted = [p.name for p in func.parameters if p.name not in SKIP_PARAMETERS]
    documented = _documented(sections, "parameters") | _documented(sections, "attributes")
    if docstring_owner is not None and docstring_owner is not func and func.docstring is not None:
        documented |= _documented(_sections(func), "parameters")
    missing = [n for n in wanted if n not in documented]
    if missing:
        gaps.append(f"{label}: parameters without an Args entry: {', '.join(missing)}")
    returns = func.returns
    gives = returns is not None and str(returns) not in {"None", "NoReturn"}
    if gives and func.name != "__init__" and not any(s.kind.value in ("returns", "yields") for s in sections):
        gaps.append(f"{label}: no Returns section")


def gaps() -> list[str]:
    import griffe

    sys.path.insert(0, str(ROOT))
    import lynx_hf

    sys.path.insert(0, str(Path(__file__).parent))
    from griffe_examples import SingularExamples

    package = griffe.load("lynx_hf", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False,
                          extensions=griffe.load_extensions(SingularExamples()))
    found: list[str] = []
    for name in sorted(lynx_hf.__all__):
        try:
            value = getattr(lynx_hf, name)
        except AttributeError:  # a subpackage listed in __all__ (lynx_hf.organism)
            value = importlib.import_module(f"lynx_hf.{name}")
        module = getattr(value, "__module__", None)
        if isinstance(value, type(lynx_hf)):
            continue  # a subpackage: its page documents its members
        path = f"{module}.{name}" if module and module.startswith("lynx_hf") else f"lynx_hf.{name}"
        try:
            obj = package[path.removeprefix("lynx_hf.")]
        except KeyError:
            continue  # a constant or a re-exported object griffe cannot place
        obj = obj.final_target if obj.is_alias else obj
        if obj.is_function:
            _check_function(obj, name, found)
        elif obj.is_class:
            if obj.docstring is None:
                found.append(f"{name}: no docstring")
            init = obj.members.get("__init__")
            if init is not None and init.is_function and [p for p in init.parameters if p.name != "self"]:
                # mkdocstrings merges __init__ into the class: its Args may sit in either docstring
                _check_function(init, f"{name}.__init__", found,
                                docstring_owner=init if init.docstring else obj)
            for member_name, member in obj.members.items():
                if member_name.startswith("_") or member.is_alias or not member.is_function:
                    continue
                if "property" in member.labels:
                    continue
                _check_function(member, f"{name}.{member_name}", found)
    return found


def on_post_build(config) -> None:
    found = gaps()
    if config["extra"].get("require_docstring_sections"):
        for gap in found:
            log.warning("docstring: %s", gap)
    elif found:
        log.info("docstrings: %d gaps in Google-style sections (python docs/hooks/docstring_check.py lists them)",
                 len(found))


if __name__ == "__main__":
    listed = gaps()
    print("\n".join(listed))
    print(f"{len(listed)} gaps", file=sys.stderr)
