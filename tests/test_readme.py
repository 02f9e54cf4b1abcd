"""The README is a front page: its quickstart runs as written and prints what it shows; it names no history."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lynx_hf import organism

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)]


def quickstart(text: str) -> tuple[str, str]:
    """The first Python block and the text block right after it (its printed output)."""
    blocks = fenced_blocks(text)
    index = next(i for i, (lang, _) in enumerate(blocks) if lang == "python")
    assert blocks[index + 1][0] == "text", "the first Python block must be followed by its printed output"
    return blocks[index][1], blocks[index + 1][1]


@pytest.mark.skipif(not (organism.BUNDLE_DIR / "config.json").exists(), reason="organism bundle not built")
def test_readme_quickstart_runs_offline_and_prints_the_output_it_shows(tmp_path):
    code, shown = quickstart(README.read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.rstrip() == shown.rstrip(), f"README shows:\n{shown}\nthe block printed:\n{run.stdout}"


def test_docs_quickstart_is_the_readme_quickstart():
    assert quickstart((ROOT / "docs" / "quickstart.md").read_text()) == quickstart(README.read_text())


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 160
    for heading in ("## Install", "## Quickstart", "## The guarantee", "## Build a probe"):
        assert heading in text
    assert "No probe for a real model is published" in text


@pytest.mark.parametrize("path", [README, *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_user_facing_pages_name_no_issue_numbers_or_session_history(path):
    text = path.read_text()
    assert not re.search(r"\bissues? \d+|\bsessions?\b|#\d{2,}\b", text, re.IGNORECASE), \
        re.search(r".{0,60}(\bissues? \d+|\bsessions?\b|#\d{2,}\b).{0,60}", text, re.IGNORECASE).group(0)
