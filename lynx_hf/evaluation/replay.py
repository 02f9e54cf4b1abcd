"""The replay machinery every exit method shares (`cue_rules`, `text_rules` and `live_rules` hold the methods).

`Replay` is an event table with its per-event probe scores (computed once) and the bundle's calibration; a `Method`
has a `name` and a `run(replay) -> Outcome`; `conformal_exit` is the first exit at a conformal threshold, shared by
`LynxExit` and `TextProbeExit`, so both are compared under the same guarantee machinery.

Replay methods read only the event table and the per-event probe scores (computed once, in `Replay`): no token is
generated. Live methods (`BudgetForcing`, `NoWait`) need the model and run it. Every method returns an `Outcome`:
per trace, whether it exited, at which event, whether the final answer is right, and the tokens it cost.

Token accounting (`Replay.outcome`): an exit at event e uses `start[e] - prompt_length` thinking tokens (the
drop_cue construction cuts before the cue word) plus `len(exit_ids) + answer_length[e]` answer tokens; a trace
that never exits uses its own `think_length` thinking tokens and `length` generated tokens. Trial decodes (DEER)
are `extra_tokens` and are included in `total_tokens`.

Adding a baseline is one class with a `name` and a `run(replay) -> Outcome`, in the module of its family (cue
rules, text rules, live rules):

```python
class LastCue(Method):
    name = "LastCue"
    def run(self, replay):
        last = replay.first_event(torch.ones(len(replay.table), dtype=torch.bool), last=True)
        return replay.outcome(self.name, last)
```
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..runtime.conformal import Calibration, LynxCalibrationWarning, exits, first_exit
from ..pipeline.events import EventTable

__all__ = ["Method", "Outcome", "Replay", "conformal_exit"]


@dataclass
class Outcome:
    """Per-trace result of one method on one event table (tensors of length `n_traces`).

    `event` is the exit event's index into the table (-1: no exit at a cue; budget forcing exits without one).
    `extra_tokens` counts trial decodes (DEER) and is already included in `total_tokens`. `info` holds what the
    metrics and plots need to know about the method (family, knob, confidence, guarantee, threshold, ...).

    Example:
        >>> o = Outcome("Full", torch.tensor([False]), torch.tensor([-1]), torch.tensor([True]), torch.tensor([10]),
        ...             torch.tensor([14]), torch.tensor([0]))
        >>> o.n
        1
    """

    method: str
    exited: torch.Tensor
    event: torch.Tensor
    correct: torch.Tensor
    thinking_tokens: torch.Tensor
    total_tokens: torch.Tensor
    extra_tokens: torch.Tensor
    info: dict = field(default_factory=dict)
    answers: list[str | None] | None = None
    wall_time: float | None = None

    @property
    def n(self) -> int:
        """Number of traces."""
        return int(self.exited.numel())


class Replay:
    """An event table with its probe scores (float32, as the plug-ins compute them) and the bundle's calibration.

    Computes the scores once; every replay method reads them. `exit_length` is `len(exit_ids)`, the tokens of the
    exit text an exit costs on top of the answer.

    Example:
        >>> table = EventTable(settings={}, features=torch.zeros(2, 1), safe=torch.tensor([False, True]),
        ...     trace=torch.tensor([0, 0]), position=torch.tensor([12, 20]), start=torch.tensor([12, 20]),
        ...     cue=torch.tensor([0, 0]), answer_length=torch.tensor([2, 2]), answer_confidence=torch.tensor([.5, .9]),
        ...     answers=["3", "4"], traces=[{"id": "q0", "gold": "4", "answer": "4", "correct": True,
        ...     "prompt_length": 10, "think_length": 30, "length": 40, "token_ids": []}])
        >>> replay = Replay(table, scores=torch.tensor([0.2, 0.9]), exit_length=3)
        >>> replay.outcome("FirstCue", torch.tensor([0])).total_tokens.tolist()  # 2 thinking + 3 exit + 2 answer
        [7]
    """

    def __init__(self, table: EventTable, scores: torch.Tensor, exit_length: int,
                 calibration: Calibration | None = None):
        scores = torch.as_tensor(scores).detach().cpu().reshape(-1)
        if scores.numel() != len(table):
            raise ValueError(f"Got {scores.numel()} probe scores for {len(table)} events: score every event once.")
        if table.n_traces == 0:
            raise ValueError("The event table has no traces: collect some first.")
        self.table = table
        self.scores = scores
        self.exit_length = int(exit_length)
        self.calibration = calibration
        self.n_traces = table.n_traces
        self.prompt_length = torch.tensor([t["prompt_length"] for t in table.traces], dtype=torch.long)
        self.think_length = torch.tensor([t["think_length"] for t in table.traces], dtype=torch.long)
        self.length = torch.tensor([t["length"] for t in table.traces], dtype=torch.long)
        self.correct = torch.tensor([bool(t["correct"]) for t in table.traces], dtype=torch.bool)
        self.gold = [str(t["gold"]) for t in table.traces]

    @classmethod
    def from_bundle(cls, table: EventTable, bundle, tokenizer=None) -> "Replay":
        """Score `table` with `bundle.probe`; `exit_length` from the attached bundle, its config or `tokenizer`.

        Example:
            >>> replay = Replay.from_bundle(EventTable.load("events/test"), lynx)  # doctest: +SKIP
        """
        exit_ids = list(getattr(bundle, "exit_ids", None) or bundle.config.exit_token_ids or [])
        if not exit_ids:
            if tokenizer is None:
                raise ValueError("The bundle is not attached and records no exit_token_ids: pass tokenizer=... "
                                 "so the exit text's length can be counted.")
            from ..runtime.exit import exit_token_ids

            exit_ids = exit_token_ids(tokenizer, bundle.config.exit_text)
        with torch.no_grad():
            if len(table):
                device = next(bundle.probe.parameters()).device
                scores = bundle.probe.predict_proba(table.features.to(device)).float().cpu()
            else:
                scores = torch.zeros(0)
        return cls(table, scores, len(exit_ids), bundle.calibration)

    def first_event(self, mask: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Per trace, the index of its first (or last) event where `mask` holds, else -1.

        Example:
            >>> replay.first_event(torch.tensor([False, True])).tolist()  # doctest: +SKIP
            [1]
        """
        n = len(self.table)
        index = torch.arange(n)
        fill = -1 if last else n
        candidate = torch.where(mask.cpu().bool(), index, torch.full_like(index, fill))
        out = torch.full((self.n_traces,), fill, dtype=torch.long)
        out = out.scatter_reduce(0, self.table.trace, candidate, reduce="amax" if last else "amin", include_self=True)
        return torch.where(out == n, torch.full_like(out, -1), out)

    def outcome(self, method: str, event: torch.Tensor, extra: torch.Tensor | None = None, **info) -> Outcome:
        """Token accounting and correctness for exits at `event` (per trace; -1 = run to the end).

        Example:
            >>> replay.outcome("Full", torch.full((replay.n_traces,), -1)).correct.tolist()  # doctest: +SKIP
            [True]
        """
        event = event.long()
        exited = event >= 0
        e = event.clamp_min(0)
        t = self.table
        if len(t):
            thinking_at_exit = t.start[e] - self.prompt_length
            answer_tokens = self.exit_length + t.answer_length[e]
            safe = t.safe[e]
        else:
            thinking_at_exit = answer_tokens = torch.zeros(self.n_traces, dtype=torch.long)
            safe = torch.zeros(self.n_traces, dtype=torch.bool)
        extra = torch.zeros(self.n_traces, dtype=torch.long) if extra is None else extra.long()
        thinking = torch.where(exited, thinking_at_exit, self.think_length)
        total = torch.where(exited, thinking_at_exit + answer_tokens, self.length) + extra
        correct = torch.where(exited, safe, self.correct)
        answers = [t.answers[i] if i >= 0 else tr.get("answer") for i, tr in zip(event.tolist(), t.traces)]
        return Outcome(method, exited, event, correct, thinking, total, extra, info=info, answers=answers)


class Method:
    """A way to end thinking. Subclasses set `name` and implement `run(replay) -> Outcome`."""

    name: str = "method"

    def run(self, replay: Replay) -> Outcome:  # pragma: no cover - interface
        raise NotImplementedError

def conformal_exit(replay: Replay, scores: torch.Tensor, calibration: Calibration, confidence: float,
                   guarantee: str) -> tuple[torch.Tensor, float, float | None]:
    """Per trace, the first event whose score reaches the conformal threshold at (confidence, guarantee).

    Returns (event per trace, -1 = none; tau; share of the table's unsafe events that would exit). Shared by
    `LynxExit` and `TextProbeExit`, so both are compared under the same guarantee machinery.

    Example:
        >>> event, tau, unsafe = conformal_exit(replay, replay.scores, replay.calibration,  # doctest: +SKIP
        ...                                     0.9, "event")
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        tau = calibration.threshold(confidence, guarantee)
    table = replay.table
    event = torch.full((replay.n_traces,), -1, dtype=torch.long)
    unsafe_rate = None
    if len(table):
        first = first_exit(scores, table.trace, tau)  # one entry per trace that has events, in order
        with_events = torch.unique_consecutive(table.trace)
        event[with_events] = first
        fires = exits(scores, tau)
        unsafe = ~table.safe
        unsafe_rate = float(fires[unsafe].double().mean()) if bool(unsafe.any()) else 0.0
    return event, tau, unsafe_rate
