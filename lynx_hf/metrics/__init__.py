"""`evaluate` metric modules shipped with lynx-hf (load them offline with `evaluate.load(path)`)."""

from pathlib import Path

LYNX_EXIT = str(Path(__file__).parent / "lynx_exit")
"""Path of the `lynx_exit` metric: `evaluate.load(lynx_hf.metrics.LYNX_EXIT)`."""

__all__ = ["LYNX_EXIT"]
