"""`lynx-hf audit`: the live audit (`lynx_hf.runtime.audit`) replayed on a collected event table, its traces in
table order as if they were the audited rows of live traffic, with the gold-labelled rate beside it (a table has
labels; live traffic does not)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..pipeline.events import EventTable
from ..runtime.audit import AuditRow, audit_report, check_cs_level, observe_row
from ..runtime.bundle import Lynx
from ..runtime.conformal import check_guarantee, check_risk_level, exits
from .replay import Replay


def replay_rows(table: EventTable, scores: torch.Tensor, threshold: float, settings: dict) -> list[AuditRow]:
    """The audit's rows for a collected event table, in table order, each trace its own batch (one look per trace):
    would-exit = first cue scoring at or above `threshold`, forced answers from the table, reference = each trace's
    full answer.

    Example:
        >>> from lynx_hf.pipeline.events import EventTable
        >>> table = EventTable(settings={}, features=torch.zeros(2, 1), safe=torch.tensor([False, True]),
        ...     trace=torch.tensor([0, 0]), position=torch.tensor([12, 20]), start=torch.tensor([12, 20]),
        ...     cue=torch.tensor([0, 0]), answer_length=torch.tensor([2, 2]), answer_confidence=torch.tensor([.5, .9]),
        ...     answers=["3", "4"], traces=[{"id": "q0", "gold": "4", "answer": "4", "correct": True,
        ...     "prompt_length": 10, "think_length": 30, "length": 40, "token_ids": []}])
        >>> settings = dict(guarantee="question", confidence=0.9, risk_level=None, rule="envelope")
        >>> [r.changed for r in replay_rows(table, torch.tensor([0.95, 0.99]), 0.9, settings)]
        [True]
    """
    table.check_order()
    scores = torch.as_tensor(scores).reshape(-1).float()
    above = exits(scores, threshold)
    counts = torch.bincount(table.trace, minlength=table.n_traces).tolist()
    out, start = [], 0
    for t, trace in enumerate(table.traces):
        stop = start + counts[t]
        hits = torch.nonzero(above[start:stop]).flatten()
        out.append(observe_row(settings, threshold, trace["answer"], table.answers[start:stop], scores[start:stop],
                               int(hits[0]) if len(hits) else -1, batch=t))  # one trace per look
        start = stop
    return out


def gold_rate(table: EventTable, scores: torch.Tensor, threshold: float, guarantee: str) -> tuple[int, int]:
    """The gold-labelled premature exits of a table, as (count, denominator): per question, traces whose first exit
    is at an unsafe cue over all traces; per event, unsafe cues at or above the threshold over unsafe cues."""
    above = exits(torch.as_tensor(scores).reshape(-1).float(), threshold)
    unsafe = ~table.safe
    if guarantee == "event":
        return int((unsafe & above).sum()), int(unsafe.sum())
    counts = torch.bincount(table.trace, minlength=table.n_traces).tolist()
    harmed, start = 0, 0
    for n in counts:
        hits = torch.nonzero(above[start:start + n]).flatten()
        harmed += int(len(hits) > 0 and bool(unsafe[start + int(hits[0])]))
        start += n
    return harmed, table.n_traces


def replay_audit(bundle, events, *, confidence: float = 0.9, guarantee: str = "question",
                 risk_level: float | None = None, cs_level: float = 0.95, step: int = 25,
                 alpha: float | None = None) -> Iterable[str]:
    """`lynx-hf audit`: the live audit replayed on a collected event table, traces in table order as if they were
    the audited rows of live traffic. Yields the report after every `step` rows (the repeated looks the confidence
    sequence is valid under), then the final one followed by the gold-labelled premature rate for comparison.

    Example:
        >>> from lynx_hf import organism
        >>> texts = list(replay_audit(organism.BUNDLE_DIR, "events/test", step=50))  # doctest: +SKIP
    """
    cs_level = check_cs_level(cs_level, alpha)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r}: give the number of rows between two looks, e.g. 25.")
    if bundle is None:
        from .. import organism  # the default bundle

        bundle = organism.BUNDLE_DIR
    lynx = Lynx.from_pretrained(bundle, confidence=confidence, guarantee=check_guarantee(guarantee),
                                risk_level=check_risk_level(risk_level))
    table = EventTable.load(events)
    scores = Replay.from_bundle(table, lynx).scores
    settings = dict(guarantee=lynx.guarantee, confidence=lynx.confidence, risk_level=lynx.risk_level, rule=lynx.rule)
    rows = replay_rows(table, scores, lynx.threshold, settings)
    bound = lynx.calibration.max_unsafe_per_question
    for n in range(step, len(rows), step):
        yield f"after {n} rows\n{audit_report(rows[:n], cs_level=cs_level, max_unsafe=bound)}"
    count, total = gold_rate(table, scores, lynx.threshold, lynx.guarantee)
    unit = "traces whose first exit is at an unsafe cue" if lynx.guarantee == "question" else \
        "unsafe cues at or above tau"
    yield (f"all {len(rows)} rows (threshold tau = {lynx.threshold:.4f})\n{audit_report(rows, cs_level=cs_level, max_unsafe=bound)}"
           f"\ngold-labelled premature rate: {count}/{total} = {count / max(total, 1):.3f} ({unit}; "
           f"delta = {1 - lynx.confidence:.3f})")
