"""Execute the notebooks in examples/ top to bottom and save them with their outputs, so GitHub and Colab show them.

    PYTHONPATH=. python scripts/execute_notebooks.py                  # all of them
    PYTHONPATH=. python scripts/execute_notebooks.py examples/01_quickstart.ipynb

Each notebook runs in a fresh kernel inside a temporary folder (what it writes under runs/ is thrown away), with this
checkout first on the kernel's path. Progress bars are left out of the saved outputs and paths into the checkout or
the temporary folder are made relative, so re-running gives small diffs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
# a tqdm line: "label:  40%|████      | 64/160 [01:54<02:42,  1.69s/trace]"
PROGRESS = re.compile(r"\|[^|]*\|\s*\d+/\d+ \[[^\]]*\]\s*$")
NOISE = ("TqdmWarning: IProgress not found", "from .autonotebook import tqdm as notebook_tqdm")


def _without_progress(text: str) -> str:
    """The text without tqdm lines (a bar redrawn with carriage returns counts as one line) and tqdm's notebook
    warning; blank lines left behind by them are dropped too."""
    kept = []
    for line in text.split("\n"):
        parts = [part for part in line.split("\r") if part.strip()]
        rest = [part for part in parts if not PROGRESS.search(part) and not any(n in part for n in NOISE)]
        if rest or not parts:
            kept.append(rest[-1] if rest else "")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).lstrip("\n")


def clean(book, folder: Path) -> None:
    """Drop progress bars and empty streams, make local paths relative, and keep no per-run metadata."""
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        kept = []
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                output.text = _without_progress(output.text).replace(f"{folder}/", "").replace(f"{ROOT}/", "")
                if not output.text.strip():
                    continue
            kept.append(output)
        cell.outputs = kept


def execute(path: Path, timeout: int) -> float:
    book = nbformat.read(path, as_version=4)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp).resolve()
        client = NotebookClient(book, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(folder)}})
        client.execute()
        clean(book, folder)
    nbformat.validate(book)
    nbformat.write(book, path)
    return time.time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every examples/*.ipynb")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a cell may run")
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for path in args.notebooks or sorted((ROOT / "examples").glob("*.ipynb")):
        print(f"{path.name}: {execute(path, args.timeout):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
