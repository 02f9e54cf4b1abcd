"""`python -m lynx_hf ...`: the `lynx-hf` command, for environments where its script is not on PATH."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
