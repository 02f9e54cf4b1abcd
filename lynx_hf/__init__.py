"""lynx-hf: reasoning models stop overthinking, with a conformal guarantee, in one line of `transformers` code.

```python
from lynx_hf import Lynx
# no real-model probe is published yet: `lynx-hf build --repo-id you/lynx-deepseek-r1-distill-qwen-1.5b` creates one
lynx = Lynx.from_pretrained("lynx/deepseek-r1-distill-qwen-1.5b", model=model, confidence=0.9)
out = model.generate(**inputs, stopping_criteria=[lynx])
```
"""

from .runtime.answers import answers_match, extract_boxed
from .runtime.audit import AuditLog, AuditReport, AuditRow
from .runtime.budget import ThinkingBudgetCriteria
from .runtime.bundle import Lynx
from .runtime.capture import HiddenStateCapture
from .runtime.config import LynxConfig
from .runtime.bundle_files import bundle_labels
from .runtime.conformal import LABELS, Calibration, LynxCalibrationWarning, guarantee_statement
from .runtime.cues import CueDetector, CueEvent
from .errors import (
    BaseModelMismatchError,
    CorruptedBundleError,
    LynxConfigError,
    LynxError,
    MissingExtraError,
    NotAttachedError,
    UnsupportedGenerationError,
)
from .runtime.exit import DEFAULT_EXIT_TEXT, ExitAnswer, LynxAnswer, answer_after_exit
from .runtime.monitor import ExitRecord
from .runtime.plugins import LynxAnswerStopper, LynxExitProcessor, LynxStoppingCriteria
from .runtime.probe import LynxProbe, train_probe
from .runtime.thinking import ThinkingFormat, detect_thinking

from .runtime.logs import library_logger as _library_logger

__version__ = "0.2.0"

_library_logger()  # lynx_hf's logs follow transformers' verbosity (TRANSFORMERS_VERBOSITY, set_verbosity_info())

# pipeline- and evaluation-side names, imported on first use so that `import lynx_hf` loads the runtime only
_LAZY = {"Collector": "pipeline.collect", "fit": "pipeline.train", "EventTable": "pipeline.events",
         "AnswerStated": "evaluation.text_rules",
         "AnswerStatedCriteria": "evaluation.text_rules", "TextProbe": "evaluation.text_rules",
         "TextProbeExit": "evaluation.text_rules"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnswerStated",
    "AnswerStatedCriteria",
    "AuditLog",
    "AuditReport",
    "AuditRow",
    "BaseModelMismatchError",
    "Calibration",
    "Collector",
    "CorruptedBundleError",
    "CueDetector",
    "CueEvent",
    "DEFAULT_EXIT_TEXT",
    "EventTable",
    "ExitAnswer",
    "ExitRecord",
    "HiddenStateCapture",
    "LABELS",
    "Lynx",
    "LynxAnswer",
    "LynxAnswerStopper",
    "LynxCalibrationWarning",
    "LynxConfig",
    "LynxConfigError",
    "LynxError",
    "LynxExitProcessor",
    "LynxProbe",
    "LynxStoppingCriteria",
    "MissingExtraError",
    "NotAttachedError",
    "TextProbe",
    "TextProbeExit",
    "ThinkingBudgetCriteria",
    "ThinkingFormat",
    "UnsupportedGenerationError",
    "answer_after_exit",
    "answers_match",
    "bundle_labels",
    "detect_thinking",
    "extract_boxed",
    "fit",
    "guarantee_statement",
    "organism",
    "train_probe",
]
