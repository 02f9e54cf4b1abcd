"""The docs site builds strictly (a broken link, a page missing from the nav or a docstring the reference cannot
render fails), and every public name has its reference entry."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lynx_hf

ROOT = Path(__file__).resolve().parent.parent


def reference_entries() -> set[str]:
    return {line.split()[-1].rsplit(".", 1)[-1]
            for page in (ROOT / "docs" / "reference").glob("*.md")
            for line in page.read_text().splitlines() if line.startswith("::: ")}


def test_every_public_name_has_an_api_reference_entry():
    missing = sorted(set(lynx_hf.__all__) - reference_entries())
    assert not missing, f"add a `::: lynx_hf.<name>` entry under docs/reference/ for: {', '.join(missing)}"


@pytest.mark.slow
def test_mkdocs_build_strict_passes(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").read_text().count("lynx-hf build") > 0
