"""`ThinkingBudgetCriteria`: the thinking budget alone, as a `generate` stopping criterion (no probe, no bundle)."""

from __future__ import annotations

import copy

import torch
from transformers import StoppingCriteria

from ..errors import LynxConfigError
from .bundle import Lynx, _check_budget
from .config import LynxConfig
from .exit import LynxAnswer
from .monitor import ExitRecord
from .plugins import LynxAnswerStopper, LynxExitProcessor, LynxStoppingCriteria, criterion_signature

_NEEDS_BUDGET = ("ThinkingBudgetCriteria needs max_thinking_tokens: the number of thinking tokens to allow, e.g. "
                 "ThinkingBudgetCriteria(4096, tokenizer=tok).")


class ThinkingBudgetCriteria(StoppingCriteria):
    """Caps a reasoning model's thinking at `max_thinking_tokens` tokens, then lets it answer.

    A row still inside its thinking block after `max_thinking_tokens` thinking tokens exits there: the thinking is
    closed with the model's exit text (found from its tokenizer and chat template, `lynx_hf.runtime.thinking`, or
    given by `thinking` / `think_start` / `think_end` / `exit_text`) and the model answers greedily, as in budget
    forcing (s1). Rows that close their thinking within the budget are left alone. It works with any model that
    has a thinking format: there is no probe, no calibration and no guarantee (for a calibrated exit at
    reflection cues with the budget as a cap, use `Lynx(..., max_thinking_tokens=B)`).

    Use it like any stopping criterion: `model.generate(**inputs, stopping_criteria=[budget])` runs exactly as
    `stopping_criteria=[lynx]` does for a `Lynx` (the same plug-ins, without a probe), and `budget.answer(out)` gives
    each row's final answer. `budget.stopper()` is the exact stop mode (each row halted at its budget, then
    `budget.answer(out)` closes the thinking there and answers); `budget.exit_processor()` with
    `budget.answer_stopper()` is the explicit in-stream pair. `last_exits` records each row (`by_budget=True` where
    it exited, `thinking_tokens`).

    Args:
        max_thinking_tokens: the number of thinking tokens a row may write before it is made to answer.
        tokenizer: the model's tokenizer (default: loaded from the model's `name_or_path` on first use).
        model: bind to this model now (default: the model of the first `generate` call it is used in).
        thinking: a thinking-format preset name (`lynx_hf.runtime.thinking.PRESETS`).
        think_start: the text that opens the thinking block (None: the prompt opens it).
        think_end: the text that closes it.
        exit_text: what is appended at the budget: the closing marker and an answer prompt.
        shadow: record where rows would exit, without intervening.

    Example:

    ```python
    >>> from lynx_hf import ThinkingBudgetCriteria, organism
    >>> model, tok = organism.load()
    >>> budget = ThinkingBudgetCriteria(30, tokenizer=tok)
    >>> inputs = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt")
    >>> out = model.generate(**inputs, stopping_criteria=[budget], max_new_tokens=200)
    >>> record = budget.last_exits[0]
    >>> record.by_budget, record.thinking_tokens, budget.answer(out)[0].answer is not None
    (True, 30, True)

    ```
    """

    def __init__(self, max_thinking_tokens: int, *, tokenizer=None, model=None, thinking: str | None = None,
                 think_start: str | None = None, think_end: str | None = None, exit_text: str | None = None,
                 shadow: bool = False):
        if max_thinking_tokens is None:
            raise LynxConfigError(_NEEDS_BUDGET)
        config = LynxConfig(base_model="", layers=[0], hidden_size=0, think_start=think_start, think_end=think_end,
                            exit_text=exit_text, thinking=thinking)
        self._lynx = Lynx(config, None, None, shadow=shadow, max_thinking_tokens=_check_budget(max_thinking_tokens),
                          metadata={"budget_only": True})
        self._lynx._default_tokenizer = tokenizer
        if model is not None:
            self._lynx.attach(model, tokenizer)

    @classmethod
    def _of(cls, lynx: Lynx) -> "ThinkingBudgetCriteria":
        new = cls.__new__(cls)
        new._lynx = lynx
        return new

    # ----- settings ---------------------------------------------------------------------------------------------
    @property
    def max_thinking_tokens(self) -> int:
        """The budget B: thinking tokens a row may write (read when a `generate` call starts)."""
        return self._lynx.max_thinking_tokens

    @max_thinking_tokens.setter
    def max_thinking_tokens(self, value: int) -> None:
        if value is None:
            raise LynxConfigError(_NEEDS_BUDGET)
        self._lynx.max_thinking_tokens = value

    @property
    def shadow(self) -> bool:
        """Record where rows would exit without intervening."""
        return self._lynx.shadow

    @shadow.setter
    def shadow(self, value: bool) -> None:
        self._lynx.shadow = bool(value)

    @property
    def exit_ids(self) -> list[int]:
        """The exit text's token ids (empty before the criterion is bound to a model)."""
        return self._lynx.exit_ids

    @property
    def tokenizer(self):
        """The tokenizer it reads thinking markers with (None before it is bound)."""
        return self._lynx.tokenizer or getattr(self._lynx, "_default_tokenizer", None)

    @property
    def model(self):
        """The model it is bound to (None before its first use or `attach`)."""
        return self._lynx.model

    def attach(self, model, tokenizer=None) -> "ThinkingBudgetCriteria":
        """Bind to `model` (and its tokenizer: by default the one given at construction, else loaded from
        `model.name_or_path`); returns self."""
        self._lynx.attach(model, tokenizer if tokenizer is not None else self._lynx._default_tokenizer)
        return self

    def __repr__(self) -> str:
        model = self._lynx.model
        bound = f"attached to {type(model).__name__}" if model is not None else "not attached"
        mode = ", mode='shadow'" if self.shadow else ""
        return f"ThinkingBudgetCriteria(max_thinking_tokens={self.max_thinking_tokens}{mode}, {bound})"

    # ----- generate -----------------------------------------------------------------------------------------------
    @criterion_signature
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self._lynx(input_ids, scores, **kwargs)  # what `stopping_criteria=[lynx]` runs (it finds the list)

    def stopper(self) -> LynxStoppingCriteria:
        """The stop-mode criterion itself (what `stopping_criteria=[budget]` runs): halts a row at its budget."""
        return self._lynx._stopper

    def exit_processor(self) -> LynxExitProcessor:
        """The in-stream plug-in: forces the exit text at the budget, then the model answers in the same call."""
        return self._lynx.exit_processor()

    def answer_stopper(self) -> LynxAnswerStopper:
        """Ends the rows that `exit_processor()` made exit once their boxed answer closes."""
        return self._lynx.answer_stopper()

    def answer(self, outputs, max_new_tokens: int | None = None) -> list[LynxAnswer]:
        """Final answers after `generate(..., stopping_criteria=[budget])`: each row that reached its budget gets
        the exit text and its greedy answer; the others' answers are read from their own text (see `Lynx.answer`).
        """
        return self._lynx.answer(outputs, max_new_tokens=max_new_tokens)

    @property
    def last_exits(self) -> list[ExitRecord]:
        """Per-row records of the last `generate` call it was used in (in this thread, else in any)."""
        return self._lynx.last_exits

    # ----- copies ---------------------------------------------------------------------------------------------------
    def __copy__(self) -> "ThinkingBudgetCriteria":
        """A new criterion with the same settings and binding, its own call state and records."""
        new = type(self)._of(copy.copy(self._lynx))
        new._lynx._default_tokenizer = self._lynx._default_tokenizer
        return new

    def __deepcopy__(self, memo: dict) -> "ThinkingBudgetCriteria":
        return self.__copy__()

    def __reduce__(self):
        """Pickled: the settings only (not the binding), like a `Lynx`."""
        c = self._lynx.config
        return _unpickle, (type(self), self.max_thinking_tokens,
                           dict(thinking=c.thinking, think_start=c.think_start, think_end=c.think_end,
                                exit_text=c.exit_text, shadow=self.shadow))


def _unpickle(cls, max_thinking_tokens: int, options: dict) -> ThinkingBudgetCriteria:
    return cls(max_thinking_tokens, **options)
