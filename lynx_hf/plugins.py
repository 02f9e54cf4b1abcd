"""The two `generate` plug-ins: `LynxStoppingCriteria` (stop mode) and `LynxExitProcessor` (in-stream exit)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .monitor import ExitMonitor, ExitRecord

if TYPE_CHECKING:
    from .bundle import Lynx


class LynxStoppingCriteria(StoppingCriteria):
    """Halts a row at the first reflection cue where the probe is confident that exiting is safe.

    At each cue inside the thinking block the probe scores the hidden state of the cue token; a row stops when the
    score reaches the conformal threshold for the bundle's confidence. The trace then ends just after the cue
    (stop mode); `Lynx.answer(...)` drops the cue, closes the thinking block and lets the model answer, reusing
    the KV cache. In shadow mode nothing stops and `last_exits` records where it would have.

    Examples:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9)
    >>> inputs = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt")
    >>> out = model.generate(**inputs, stopping_criteria=[lynx.stopping_criteria()], max_new_tokens=200)
    >>> len(lynx.last_exits)
    1

    ```
    """

    def __init__(self, lynx: "Lynx"):
        self.lynx = lynx
        self.monitor = ExitMonitor(lynx, mode="stop")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        decide = self.monitor.observe(input_ids)
        if self.lynx.shadow:
            return torch.zeros_like(decide)
        return decide

    @property
    def last_exits(self) -> list[ExitRecord]:
        """Per-row telemetry of the last `generate` call."""
        return self.monitor.records(self.lynx.shadow)


class LynxExitProcessor(LogitsProcessor):
    """At a confident cue, forces the exit text (e.g. `</think> ... \\boxed{`) token by token, then lets the model answer.

    The cue was already sampled when its hidden state becomes available, so this processor keeps the cue and
    forces the exit text right after it (`keep_cue` construction); pair it with `lynx.answer_stopper()` to end each
    row once its boxed answer closes. In shadow mode it never forces anything.

    Examples:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    >>> inputs = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt")
    >>> out = model.generate(**inputs, logits_processor=[lynx.exit_processor()],
    ...                      stopping_criteria=[lynx.answer_stopper()], max_new_tokens=200)
    >>> "Final Answer" in tok.decode(out[0])
    True

    ```
    """

    def __init__(self, lynx: "Lynx"):
        self.lynx = lynx
        self.monitor = ExitMonitor(lynx, mode="stream")
        self._exit_ids: torch.Tensor | None = None
        self.forcing: torch.Tensor | None = None
        self.answering: torch.Tensor | None = None
        self.depth: torch.Tensor | None = None
        self._generation = -1

    def _ensure_state(self, input_ids: torch.LongTensor) -> None:
        if self.monitor._generation != self._generation or self.forcing is None:
            device = input_ids.device
            batch = input_ids.shape[0]
            self._exit_ids = torch.tensor(self.lynx.exit_ids, dtype=torch.long, device=device)
            self.forcing = torch.full((batch,), -1, dtype=torch.long, device=device)
            self.answering = torch.zeros(batch, dtype=torch.bool, device=device)
            self.depth = torch.zeros(batch, dtype=torch.long, device=device)
            self._generation = self.monitor._generation

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        decide = self.monitor.observe(input_ids)
        self._ensure_state(input_ids)
        # Rows that finished forcing are answering: track the box's brace depth for the answer stopper.
        delta = self.lynx.brace_delta.to(input_ids.device)[input_ids[:, -1]]
        self.depth = torch.where(self.answering, self.depth + delta, self.depth)
        if self.lynx.shadow:
            return scores
        self.forcing = torch.where(decide, torch.zeros_like(self.forcing), self.forcing)
        forcing = self.forcing >= 0
        target = self._exit_ids[self.forcing.clamp(0, self._exit_ids.numel() - 1)]
        forced = torch.full_like(scores, -float("inf")).scatter_(1, target[:, None], 0.0)
        scores = torch.where(forcing[:, None], forced, scores)
        advanced = self.forcing + 1
        finished = forcing & (advanced >= self._exit_ids.numel())
        self.answering = self.answering | finished
        # The last exit token (holding the box's `{`) is counted on the next call: start from minus its delta.
        self.depth = torch.where(finished, -self.lynx.brace_delta.to(target.device)[target], self.depth)
        self.forcing = torch.where(forcing & ~finished, advanced, torch.where(finished, -1, self.forcing))
        return scores

    @property
    def last_exits(self) -> list[ExitRecord]:
        """Per-row telemetry of the last `generate` call."""
        return self.monitor.records(self.lynx.shadow)


class LynxAnswerStopper(StoppingCriteria):
    """Ends a row that `LynxExitProcessor` made exit once the model has closed its `\\boxed{...}` answer.

    Example:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    >>> stopper = lynx.answer_stopper()
    >>> stopper.processor is lynx.exit_processor()
    True

    ```
    """

    def __init__(self, processor: LynxExitProcessor):
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        processor = self.processor
        if processor.answering is None or processor.answering.shape[0] != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        delta = processor.lynx.brace_delta.to(input_ids.device)[input_ids[:, -1]]
        return processor.answering & (processor.depth + delta < 0)
