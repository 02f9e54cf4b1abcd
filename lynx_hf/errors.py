"""The errors lynx-hf raises. Each message names the problem and the fix."""


class LynxError(Exception):
    """Base class of every lynx-hf error."""


class LynxConfigError(LynxError, ValueError):
    """A setting that cannot work: a layer out of range, a confidence outside (0, 1), a cue the tokenizer can't spell."""


class BaseModelMismatchError(LynxError, ValueError):
    """A probe bundle loaded onto a base model other than the one it was trained for."""


class CorruptedBundleError(LynxError, OSError):
    """A bundle folder with a missing, unreadable or inconsistent file."""


class UnsupportedGenerationError(LynxError, ValueError):
    """A decoding mode that the plug-ins cannot follow (beam search, assisted decoding, ...)."""


class NotAttachedError(LynxError, RuntimeError):
    """A plug-in used before `Lynx` was attached to a model."""


class MissingExtraError(LynxError, ImportError):
    """A feature whose optional dependencies are not installed; the message names the extra that brings them
    (`pip install "lynx-hf[eval]"`)."""
