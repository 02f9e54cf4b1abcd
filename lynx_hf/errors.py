"""The errors lynx-hf raises. Each message names the problem and the fix.

Every error derives from `LynxError` and also from the matching built-in exception (`ValueError`, `OSError`,
`RuntimeError`, `ImportError`), so code that already catches the built-in keeps working.
"""


class LynxError(Exception):
    """Base class of every lynx-hf error.

    Catch it to handle any problem lynx-hf reports, whatever its kind.

    Example:
        >>> from lynx_hf import Calibration, LynxError
        >>> import torch
        >>> calibration = Calibration(torch.tensor([0.9, 0.2]), torch.tensor([True, False]), torch.tensor([0, 1]))
        >>> try:
        ...     calibration.threshold(0.9, guarantee="per-token")
        ... except LynxError as error:
        ...     print(type(error).__name__)
        LynxConfigError
    """


class LynxConfigError(LynxError, ValueError):
    """A setting that cannot work: a layer out of range, a confidence outside (0, 1), a cue the tokenizer can't spell.

    Raised when an object is built or called with options that contradict each other or the model; the message
    says which option to change. It is also a `ValueError`.

    Example:
        >>> from lynx_hf import LynxConfig, LynxConfigError
        >>> try:
        ...     LynxConfig(base_model="m", layers=(), hidden_size=8)
        ... except LynxConfigError as error:
        ...     print(error)
        A LynxConfig needs at least one layer index.
    """


class BaseModelMismatchError(LynxError, ValueError):
    """A probe bundle loaded onto a base model other than the one it was trained for.

    A probe reads one model's hidden states; on another model (other weights, other tokenizer, an active adapter)
    its scores, and so its guarantee, mean nothing. The message names what differs. It is also a `ValueError`.

    Example:
        >>> from lynx_hf import BaseModelMismatchError
        >>> issubclass(BaseModelMismatchError, ValueError)
        True
    """


class CorruptedBundleError(LynxError, OSError):
    """A bundle folder with a missing, unreadable or inconsistent file.

    The fix is to re-download or re-save the bundle; the message names the file. It is also an `OSError`.

    Example:
        >>> from lynx_hf import CorruptedBundleError, Lynx
        >>> import tempfile
        >>> try:
        ...     Lynx.from_pretrained(tempfile.mkdtemp())
        ... except CorruptedBundleError:
        ...     print("not a bundle")
        not a bundle
    """


class UnsupportedGenerationError(LynxError, ValueError):
    """A decoding mode that the plug-ins cannot follow (beam search, assisted decoding, ...).

    The plug-ins follow one sequence per row; decoding modes that reorder or speculate rows would make them score
    the wrong tokens, so they refuse instead. It is also a `ValueError`.

    Example:
        >>> from lynx_hf import UnsupportedGenerationError
        >>> issubclass(UnsupportedGenerationError, ValueError)
        True
    """


class NotAttachedError(LynxError, RuntimeError):
    """A plug-in used before `Lynx` was attached to a model, or with another model than the one it is attached to.

    The plug-ins read the hidden states of the model they are attached to; pass `model=` to `Lynx.from_pretrained`
    or call `lynx.attach(model)` with the model that runs `generate`. It is also a `RuntimeError`.

    Example:
        >>> from lynx_hf import NotAttachedError
        >>> issubclass(NotAttachedError, RuntimeError)
        True
    """


class MissingExtraError(LynxError, ImportError):
    """A feature whose optional dependencies are not installed.

    The message names the extra that brings them (`pip install "lynx-hf[eval]"`). It is also an `ImportError`.

    Example:
        >>> from lynx_hf import MissingExtraError
        >>> issubclass(MissingExtraError, ImportError)
        True
    """


class TooFewAuditedRowsError(LynxError, ValueError):
    """Too few audited rows to certify the requested confidence when recalibrating (the message says how many more).

    Recalibration from audited traffic needs enough rows for the confidence asked; audit more traffic, or ask for a
    lower confidence. It is also a `ValueError`.

    Example:
        >>> from lynx_hf import TooFewAuditedRowsError
        >>> issubclass(TooFewAuditedRowsError, ValueError)
        True
    """
