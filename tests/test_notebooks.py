"""Every notebook in examples/ runs top to bottom on the shipped organism, is stored with its outputs (so GitHub and
Colab show them; `scripts/execute_notebooks.py` refreshes them), installs from where the README says, and uses the
public API only."""

import ast
import re
from pathlib import Path

import nbformat
import pytest

import lynx_hf
from lynx_hf import organism

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))
INSTALL = "git+https://github.com/lynx-hf/lynx-hf"


def code_cells(book):
    return [cell for cell in book.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_is_stored_with_its_outputs_in_order_and_without_errors(path):
    cells = code_cells(nbformat.read(path, as_version=4))
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), \
        "run `PYTHONPATH=. python scripts/execute_notebooks.py` to store the outputs"
    assert not [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert sum(bool(cell.outputs) for cell in cells) >= len(cells) - 1  # the install cell prints nothing


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_opens_in_colab_and_installs_from_where_the_readme_says(path):
    book = nbformat.read(path, as_version=4)
    assert "colab.research.google.com" in book.cells[0].source
    assert INSTALL in code_cells(book)[0].source
    assert INSTALL in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_imports_only_the_public_api(path):
    allowed_modules = {"lynx_hf", "lynx_hf.metrics"}  # lynx_hf.metrics.LYNX_EXIT is the documented metric path
    for cell in code_cells(nbformat.read(path, as_version=4)):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("!", "%")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lynx_hf"):
                assert node.module == "lynx_hf", f"private import: from {node.module} import ..."
                for alias in node.names:
                    assert alias.name in lynx_hf.__all__ or alias.name == "organism", alias.name
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("lynx_hf"):
                        assert alias.name in allowed_modules, f"private import: import {alias.name}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_has_one_honest_real_model_section(path):
    sections = [cell.source for cell in nbformat.read(path, as_version=4).cells
                if cell.cell_type == "markdown" and re.match(r"## With a real model on a GPU", cell.source)]
    assert len(sections) == 1
    assert "the rest is unchanged" not in sections[0].lower()


@pytest.mark.slow
@pytest.mark.skipif(not (organism.BUNDLE_DIR / "config.json").exists(), reason="organism bundle not built")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
