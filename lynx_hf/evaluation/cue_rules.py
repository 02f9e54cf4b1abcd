"""Exit rules replayed at a table's cue events from the probe scores and the labels alone (no text read, no token
generated): `Full` (no exit), `FirstCue`, `Oracle`, `LynxExit` (LYNX at a confidence and guarantee) and
`DeerStyle` (DEER: trial answers' confidence at each cue).
"""

from __future__ import annotations

import torch

from ..runtime.conformal import DEFAULT_GUARANTEE
from .replay import Method, Outcome, Replay, conformal_exit

__all__ = ["DeerStyle", "FirstCue", "Full", "LynxExit", "Oracle"]


class Full(Method):
    """No early exit: every trace thinks to its own end (the reference for savings, helped and harmed).

    Example:
        >>> Full().run(replay).exited.any().item()  # doctest: +SKIP
        False
    """

    name = "Full"

    def run(self, replay: Replay) -> Outcome:
        return replay.outcome(self.name, torch.full((replay.n_traces,), -1, dtype=torch.long), family="Full")


class FirstCue(Method):
    """Always exit at the first cue (no probe): the most aggressive cue-based rule.

    Example:
        >>> FirstCue().run(replay).event.tolist()  # doctest: +SKIP
        [0]
    """

    name = "FirstCue"

    def run(self, replay: Replay) -> Outcome:
        return replay.outcome(self.name, replay.first_event(torch.ones(len(replay.table), dtype=torch.bool)),
                              family="FirstCue")


class Oracle(Method):
    """Exit at the first safe cue (knows the labels): an upper bound on the savings of any cue-based exit.

    Example:
        >>> Oracle().run(replay).correct.all().item()  # doctest: +SKIP
        True
    """

    name = "Oracle"

    def run(self, replay: Replay) -> Outcome:
        return replay.outcome(self.name, replay.first_event(replay.table.safe), family="Oracle")


class LynxExit(Method):
    """LYNX: exit at the first cue whose probe score reaches the conformal threshold for (confidence, guarantee).

    Example:
        >>> LynxExit(0.9, "event").run(replay).info["tau"]  # doctest: +SKIP
        0.83
    """

    def __init__(self, confidence: float, guarantee: str = DEFAULT_GUARANTEE):
        self.confidence = float(confidence)
        self.guarantee = guarantee
        self.name = f"Lynx c={self.confidence:g} ({guarantee})"

    def run(self, replay: Replay) -> Outcome:
        if replay.calibration is None:
            raise ValueError("LynxExit needs a calibration: build the Replay with Replay.from_bundle(table, lynx).")
        event, tau, unsafe_rate = conformal_exit(replay, replay.scores, replay.calibration, self.confidence,
                                                 self.guarantee)
        return replay.outcome(self.name, event, family=f"Lynx ({self.guarantee})", knob=self.confidence,
                              confidence=self.confidence, guarantee=self.guarantee, target=1 - self.confidence,
                              tau=tau, unsafe_event_exit_rate=unsafe_rate)


class DeerStyle(Method):
    """DEER-style: at each cue decode a trial answer; exit at the first whose confidence reaches `lam`.

    Confidence is the forced answer's geometric-mean token probability (`answer_confidence`). Every trial decoded
    before the exit costs `len(exit_ids) + answer_length` extra tokens; the trial at the exit cue is the answer
    itself, so it is counted once, as the answer. A trace that never exits paid for a trial at every cue.

    Example:
        >>> DeerStyle(0.9).run(replay).extra_tokens.tolist()  # doctest: +SKIP
        [5]
    """

    def __init__(self, lam: float):
        self.lam = float(lam)
        self.name = f"DEER λ={self.lam:g}"

    def run(self, replay: Replay) -> Outcome:
        table = replay.table
        confident = torch.nan_to_num(table.answer_confidence.float(), nan=-1.0) >= self.lam
        event = replay.first_event(confident)
        extra = torch.zeros(replay.n_traces, dtype=torch.long)
        if len(table):
            exit_of_trace = event[table.trace]
            index = torch.arange(len(table))
            before_exit = (exit_of_trace < 0) | (index < exit_of_trace)
            cost = (replay.exit_length + table.answer_length) * before_exit
            extra = extra.scatter_add(0, table.trace, cost.long())
        return replay.outcome(self.name, event, extra=extra, family="DEER", knob=self.lam, lam=self.lam)
