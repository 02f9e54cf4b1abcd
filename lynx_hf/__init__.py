"""lynx-hf: reasoning models stop overthinking, with a conformal guarantee, in one line of `transformers` code.

```python
from lynx_hf import Lynx
# no real-model probe is published yet: `lynx-hf build --push you/lynx-deepseek-r1-distill-qwen-1.5b` creates one
lynx = Lynx.from_pretrained("lynx/deepseek-r1-distill-qwen-1.5b", model=model, confidence=0.9)
out = model.generate(**inputs, stopping_criteria=[lynx])
```
"""

from .answers import answers_match, extract_boxed
from .audit import AuditLog, AuditReport, AuditRow
from .bundle import Lynx
from .capture import HiddenStateCapture
from .config import LynxConfig
from .conformal import Calibration, LynxCalibrationWarning
from .cues import CueDetector, CueEvent
from .errors import (
    BaseModelMismatchError,
    CorruptedBundleError,
    LynxConfigError,
    LynxError,
    NotAttachedError,
    UnsupportedGenerationError,
)
from .events import EventTable
from .exit import DEFAULT_EXIT_TEXT, answer_after_exit
from .monitor import ExitRecord
from .plugins import LynxAnswerStopper, LynxExitProcessor, LynxStoppingCriteria
from .probe import LynxProbe, train_probe
from .thinking import ThinkingFormat, detect_thinking

__version__ = "0.1.0"

# evaluation-side names, imported on first use so `import lynx_hf` stays the small runtime
_LAZY = {"AnswerStated": "baselines", "AnswerStatedCriteria": "baselines", "TextProbe": "baselines",
         "TextProbeExit": "baselines"}


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
    "CorruptedBundleError",
    "CueDetector",
    "CueEvent",
    "DEFAULT_EXIT_TEXT",
    "EventTable",
    "ExitRecord",
    "HiddenStateCapture",
    "Lynx",
    "LynxAnswerStopper",
    "LynxCalibrationWarning",
    "LynxConfig",
    "LynxConfigError",
    "LynxError",
    "LynxExitProcessor",
    "LynxProbe",
    "LynxStoppingCriteria",
    "NotAttachedError",
    "TextProbe",
    "TextProbeExit",
    "ThinkingFormat",
    "UnsupportedGenerationError",
    "answer_after_exit",
    "answers_match",
    "detect_thinking",
    "extract_boxed",
    "train_probe",
]
