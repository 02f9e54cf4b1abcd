"""Every notebook in examples/ runs top to bottom on the shipped organism, and is stored without outputs."""

from pathlib import Path

import nbformat
import pytest

from lynx_hf import organism

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_is_stored_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in book.cells if cell.cell_type == "code")
    assert "colab.research.google.com" in book.cells[0].source


@pytest.mark.slow
@pytest.mark.skipif(not (organism.BUNDLE_DIR / "config.json").exists(), reason="organism bundle not built")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
