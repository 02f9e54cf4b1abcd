"""lynx-hf's logs follow transformers' logging settings.

Every module logs through `logging.getLogger(__name__)`, under the `lynx_hf` logger. That logger takes its level
from transformers' (`TRANSFORMERS_VERBOSITY=info`, `transformers.logging.set_verbosity_info()`, ...) unless it is
given one of its own (`logging.getLogger("lynx_hf").setLevel(...)`), and propagates to Python's root logger when
transformers' does (`transformers.logging.enable_propagation()`, or `CI=1`). Like transformers, it prints to stderr
through a handler of its own, with the prefix `[lynx_hf]`: `logging.getLogger("lynx_hf").handlers` holds it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY = "lynx_hf"


def _transformers_root() -> logging.Logger:
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # applies TRANSFORMERS_VERBOSITY and installs transformers' handler once
    return logging.getLogger("transformers")


class _FollowsTransformers(logging.Logger):
    """The `lynx_hf` logger: level and propagation are transformers' unless set here."""

    @property
    def level(self) -> int:
        own = self.__dict__.get("_own_level", logging.NOTSET)
        return own or _transformers_root().getEffectiveLevel()

    @level.setter
    def level(self, value: int) -> None:
        self.__dict__["_own_level"] = value

    @property
    def propagate(self) -> bool:
        own = self.__dict__.get("_own_propagate")
        return _transformers_root().propagate if own is None else own

    @propagate.setter
    def propagate(self, value: bool) -> None:
        self.__dict__["_own_propagate"] = bool(value)


def library_logger() -> logging.Logger:
    """The `lynx_hf` logger, set up once to follow transformers' logging settings.

    Example:
        >>> import transformers
        >>> logger = library_logger()
        >>> logger.setLevel(logging.NOTSET)  # no level of its own (the default): follow transformers'
        >>> transformers.logging.set_verbosity_info()
        >>> logger.isEnabledFor(logging.INFO)
        True
        >>> transformers.logging.set_verbosity_warning()
        >>> logger.isEnabledFor(logging.INFO)
        False
    """
    logger = logging.getLogger(LIBRARY)
    if isinstance(logger, _FollowsTransformers):
        return logger
    own_level = logger.__dict__.pop("level", logging.NOTSET)
    logger.__dict__.pop("propagate", None)
    logger.__class__ = _FollowsTransformers  # the same object: loggers created under it keep it as their parent
    logger.__dict__["_own_level"] = own_level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{LIBRARY}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(own_level)  # (clears the loggers' cached levels)
    return logger


@contextmanager
def printing_through_root(level: int) -> Iterator[logging.Logger]:
    """The `lynx_hf` logger at `level`, printing through Python's root logger instead of its own handler, until the
    block ends: the command line's setting, undone afterwards so that `lynx_hf.cli.main()` called in-process (a test,
    a notebook) leaves the library's logging as it found it.

    Args:
        level: The level to log at inside the block (e.g. `logging.INFO`).

    Returns:
        A context manager that yields the `lynx_hf` logger.

    Example:
        >>> with printing_through_root(logging.INFO) as logger:
        ...     logger.isEnabledFor(logging.INFO), logger.propagate
        (True, True)
        >>> library_logger().propagate == logging.getLogger("transformers").propagate
        True
    """
    logger = library_logger()
    saved = {key: logger.__dict__.get(key) for key in ("_own_level", "_own_propagate")}
    handlers = list(logger.handlers)
    logger.setLevel(level)
    logger.propagate = True
    for handler in handlers:
        if isinstance(handler, logging.StreamHandler):
            logger.removeHandler(handler)
    try:
        yield logger
    finally:
        logger.handlers[:] = handlers
        if saved["_own_propagate"] is None:
            logger.__dict__.pop("_own_propagate", None)
        else:
            logger.__dict__["_own_propagate"] = saved["_own_propagate"]
        logger.setLevel(saved["_own_level"] or logging.NOTSET)  # (clears the loggers' cached levels)
