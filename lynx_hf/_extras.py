"""Optional dependencies: `import lynx_hf` and the `generate` plug-ins need only the runtime ones; the pipeline,
the evaluation and the docs site import theirs through `require`, which names the extra to install when one is
missing.

| extra   | brings                                   | needed by                                              |
| ------- | ---------------------------------------- | ------------------------------------------------------ |
| `build` | datasets, tqdm                           | `lynx-hf collect / build`, benchmark loaders           |
| `eval`  | matplotlib, evaluate, datasets           | `lynx-hf eval / demo`, the `lynx_exit` metric, plots   |
| `vllm`  | vllm                                     | `rollout="vllm"` sampling on a GPU                     |
| `docs`  | mkdocs, mkdocs-material, mkdocstrings    | building the documentation site                        |
| `test`  | all of the above but vllm, plus pytest   | the test suite (`make test`)                           |
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

# the pip distribution of each importable module, where the two names differ
_DISTRIBUTIONS = {"math_verify": "math-verify", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import `module`, or raise a `MissingExtraError` that names the extra bringing it.

    Args:
        module: The module to import (e.g. `"matplotlib.pyplot"`).
        extra: The `lynx-hf` extra that installs it (`"build"`, `"eval"`, `"docs"`, `"vllm"`).
        purpose: What needs it, for the message (e.g. `"the evaluation plots"`).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: `module` (or one of its own dependencies) is not installed. It is an `ImportError` too.

    Example:
        >>> require("json", extra="eval").dumps([1])
        '[1]'
        >>> try:
        ...     require("no_such_module_here", extra="eval", purpose="the plots")
        ... except ImportError as error:
        ...     print(error)
        the plots needs no_such_module_here, which is not installed: pip install "lynx-hf[eval]"
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or module
        top = missing.split(".")[0]
        distribution = _DISTRIBUTIONS.get(top, top)
        what = purpose or f"lynx-hf's `{module}` import"
        raise MissingExtraError(
            f'{what} needs {distribution}, which is not installed: pip install "lynx-hf[{extra}]"'
        ) from error
