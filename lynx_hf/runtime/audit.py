"""The live audit: is the guarantee holding on the traffic Lynx actually sees?

Calibration promises a premature-exit rate of at most δ = 1 − c for questions exchangeable with the calibration
questions; a deployment's questions may not be. With `Lynx(..., audit_rate=r)` each row of each `generate` call is
drawn for the audit with probability r. An audited row runs as in shadow mode (it never exits), so its full trace
exists; once the call is over Lynx forces an exit at every cue of that trace exactly as `collect` labels events
(`force_exits`: same cut, exit text and greedy answer), scores the cues with the probe, and compares each forced
answer with the row's own full answer (`extract_boxed` of its generated text, what `collect` records as a trace's
`answer`).

Why the full answer is the right reference, without any gold label: the exit's whole effect on a row is the
difference between two answers of the same model to the same question on the same trace, the one after the exit and
the one after the full thinking. "The exit changed the answer" therefore measures exactly what exiting did, and it
upper-bounds "the exit made the answer wrong" whenever the full answer is right. It also counts exits that *fixed*
a wrong full answer (a change either way is a disagreement), so on a model that is often wrong after full thinking
the audited rate is above the premature rate that gold labels would give; a row whose full trace has no boxed answer
has no reference and is counted as such, never as agreement.

Per question (`guarantee="question"`): an audited row disagrees when its would-exit answer (at the first cue the
probe passes, where the live call would have exited) differs from its full answer; rows that never would exit count
as agreeing. Per event (`guarantee="event"`): a cue is label-free unsafe when its forced answer differs from the full
answer, and the rate is (unsafe cues scoring at or above τ) / (unsafe cues). The cues of one trace are correlated,
so the draws are rows: the per-row counts (X exits among N unsafe cues) go into `ratio_confidence_sequence` with the
bound M = the most unsafe cues any calibration question had (the same range `conformal` uses); a row with more than
M unsafe cues is scaled to M (X·M/N of M: its own rate kept, its weight capped), and the report counts such rows.

The rate comes with an anytime-valid confidence sequence (`bounds.betting_confidence_sequence`: Waudby-Smith &
Ramdas's hedged capital betting, implemented here rather than taken from `confseq`, to keep the runtime free of a
compiled dependency and to reuse the betting code calibration already has): an audit is read after every batch, and
a fixed-n Clopper-Pearson interval read that often would raise false alarms. The rows of one `generate` call are one
unit of the sequence (`AuditRow.batch`): they share one bet and the sequence is updated once per call, so the order
of rows within a batch changes nothing. The sequence is a running intersection (it never widens), so the pooled rate
can lie outside it when early calls disagreed more or less than later ones; the printout says so where it happens. Verdicts: "above δ: recalibrate" once
the sequence's lower bound is above δ; "too few rows" while fewer rows have a reference than the smallest number with
which even all-disagreeing rows could lift the lower bound above δ (`rows_needed`); else "consistent with δ", which
says the data cannot reject the guarantee, not that it is proven (the upper bound says how much is excluded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from .answers import answers_match, extract_boxed
from .bounds import betting_confidence_sequence, pac_needed, ratio_confidence_sequence
from .config import short_digest
from ..errors import LynxConfigError, TooFewAuditedRowsError
from .conformal import Calibration, LynxCalibrationWarning, check_guarantee, check_risk_level, check_rule, exits

if TYPE_CHECKING:
    from .monitor import GenerateCall

logger = logging.getLogger(__name__)

_FORMAT = "lynx-hf/audit-log"
_VERSION = 2  # 2: rows keep their cues' probe scores and agreement labels (what recalibration needs)
CONSISTENT, ABOVE, TOO_FEW = "consistent with δ", "above δ: recalibrate", "too few rows"


@dataclass(frozen=True)
class AuditRow:
    """One audited row: the settings its call ran with, its full answer and what an exit would have done to it.

    The rows of one batch are one unit of the confidence sequence, so their order never matters (rows without a
    batch, e.g. built by hand, are one batch). The per-cue `scores` and `agrees` are what `Lynx.recalibrate` builds
    a calibration from. Logs written before those fields existed load with them as None: they still audit, but
    cannot recalibrate.

    Attributes:
        guarantee: the call's guarantee, ``"question"`` or ``"event"``.
        confidence: the call's confidence c (δ = 1 - c).
        risk_level: the call's PAC risk level (None: marginal).
        rule: the call's per-event threshold rule.
        threshold: the probe-score threshold the call ran with.
        reference: the row's full answer (None when the full trace has no boxed answer: no reference).
        would_exit: the rule fired at some cue of the row (where the live call would have exited).
        exit_answer: the answer after the would-be exit (None when it would not exit).
        changed: the would-exit answer differs from the full one.
        cues: the cues of the trace.
        unsafe_cues: cues whose forced answer differs from the full one (label-free unsafe).
        unsafe_exits: of those, the ones scoring at or above the threshold.
        forwards: model forwards re-checking the row cost (default 0, as in a replay).
        tokens: tokens fed re-checking the row (default 0, as in a replay).
        batch: which audited `generate` call (or replayed trace) the row came from (default None: one batch).
        scores: the probe's score of each cue in trace order, as the plug-ins compute them (default None).
        agrees: per cue, the forced answer matches the full one: the agreement label (default None; None without a
            reference).
        prompt: a digest of the row's prompt token ids: which problem it was (default None).
        probe: a digest of the probe that scored it; rows scored by another probe cannot calibrate this one
            (default None).

    Example:
        >>> AuditRow("question", 0.9, None, "envelope", 0.8, reference="4", would_exit=True, exit_answer="3",
        ...          changed=True, cues=2, unsafe_cues=1, unsafe_exits=1).changed
        True
    """

    guarantee: str
    confidence: float
    risk_level: float | None
    rule: str
    threshold: float
    reference: str | None
    would_exit: bool
    exit_answer: str | None
    changed: bool
    cues: int
    unsafe_cues: int
    unsafe_exits: int
    forwards: int = 0
    tokens: int = 0
    batch: int | None = None
    scores: tuple[float, ...] | None = None
    agrees: tuple[bool, ...] | None = None
    prompt: str | None = None
    probe: str | None = None

    @property
    def setting(self) -> tuple:
        """The setting the row's call ran with, ``(guarantee, confidence, risk_level, rule)``: what reports group by.

        Example:
            >>> AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1).setting
            ('question', 0.9, None, 'envelope')
        """
        return self.guarantee, self.confidence, self.risk_level, self.rule

    def to_dict(self) -> dict:
        """The row as JSON-ready values (what `AuditLog.save` writes).

        Returns:
            A dict of the fields, tuples as lists.

        Example:
            >>> AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1).to_dict()["changed"]
            True
        """
        data = asdict(self)
        for name in ("scores", "agrees"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AuditRow":
        """The row `to_dict` wrote (older logs without the per-cue fields load with them as None).

        Args:
            data: a dict as `to_dict` returns it.

        Returns:
            The `AuditRow`.

        Raises:
            TypeError: `data` has a field `AuditRow` does not know, or lacks a required one.

        Example:
            >>> row = AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1, scores=(0.9,))
            >>> AuditRow.from_dict(row.to_dict()) == row
            True
        """
        data = dict(data)
        for name in ("scores", "agrees"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


def observe_row(settings: dict, threshold: float, reference: str | None, answers: Sequence[str | None],
                scores: torch.Tensor, exit_index: int, *, forwards: int = 0, tokens: int = 0,
                batch: int | None = None, prompt: str | None = None, probe: str | None = None) -> AuditRow:
    """The `AuditRow` of one trace from its cues' forced answers and probe scores (in trace order), its full answer
    and the index of its would-exit cue (-1: none), from batch `batch`. Live and replay audits both build rows here.

    Args:
        settings: the call's ``guarantee``, ``confidence``, ``risk_level`` and ``rule``.
        threshold: the probe-score threshold the call ran with.
        reference: the row's full answer (None: the full trace has no boxed answer).
        answers: each cue's forced answer, in trace order.
        scores: each cue's probe score, in trace order.
        exit_index: the index of the would-exit cue among them (-1: none).
        forwards: model forwards re-checking the row cost (default 0: a replay).
        tokens: tokens fed re-checking the row (default 0: a replay).
        batch: which audited call or replayed trace the row came from (default None).
        prompt: the digest of the row's prompt ids (`prompt_digest`; default None).
        probe: the digest of the probe that scored it (`probe_digest`; default None).

    Returns:
        The `AuditRow`.

    Example:
        >>> import torch
        >>> row = observe_row(dict(guarantee="event", confidence=0.9, risk_level=None, rule="envelope"), 0.5, "4",
        ...                   ["3", "4", "3"], torch.tensor([0.2, 0.7, 0.9]), exit_index=1)
        >>> row.changed, row.unsafe_cues, row.unsafe_exits
        (False, 2, 1)
    """
    differs = [reference is None or not answers_match(a, reference) for a in answers]
    exit_answer = answers[exit_index] if exit_index >= 0 else None
    scores = torch.as_tensor(scores).reshape(-1).float()
    above = exits(scores, threshold).tolist() if len(answers) else []
    has_reference = reference is not None
    return AuditRow(
        guarantee=settings["guarantee"], confidence=float(settings["confidence"]), risk_level=settings["risk_level"],
        rule=settings["rule"], threshold=float(threshold), reference=reference, would_exit=exit_index >= 0,
        exit_answer=exit_answer, changed=has_reference and exit_index >= 0 and differs[exit_index], cues=len(answers),
        unsafe_cues=sum(differs) if has_reference else 0,
        unsafe_exits=sum(d and a for d, a in zip(differs, above)) if has_reference else 0,
        forwards=forwards, tokens=tokens, batch=batch, scores=tuple(float(x) for x in scores.tolist()),
        agrees=tuple(not d for d in differs) if has_reference else None, prompt=prompt, probe=probe,
    )


def check_cs_level(cs_level: float = 0.95, alpha: float | None = None, *, stacklevel: int = 3) -> float:
    """The audit's confidence-sequence level, from `cs_level` or the deprecated `alpha` (its miscoverage, 1 -
    cs_level; renamed because `alpha` is the PAC risk level, `risk_level`, everywhere else).

    Args:
        cs_level: the confidence sequences' coverage in (0, 1) (default 0.95).
        alpha: deprecated: their miscoverage, 1 - cs_level; when given, it wins (FutureWarning).
        stacklevel: where the deprecation warning points (default 3: the caller's caller).

    Returns:
        The coverage, a float in (0, 1).

    Raises:
        ValueError: the level (or `alpha`) is not a number in (0, 1).

    Example:
        >>> check_cs_level(0.9)
        0.9
    """
    if alpha is not None:
        warnings.warn(f"alpha={alpha!r} for the audit is deprecated: pass cs_level={1 - alpha:g} (the confidence "
                      "sequences' coverage, 1 - alpha). `alpha` names the PAC risk level of the threshold elsewhere "
                      "(risk_level).", FutureWarning, stacklevel=stacklevel)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha={alpha!r}: give the confidence sequences' miscoverage in (0, 1), or better "
                             "cs_level=0.95.")
        return round(1.0 - float(alpha), 12)
    if isinstance(cs_level, bool) or not isinstance(cs_level, (int, float)) or not 0.0 < cs_level < 1.0:
        raise ValueError(f"cs_level={cs_level!r}: give the confidence sequences' coverage in (0, 1), e.g. "
                         "cs_level=0.95.")
    return float(cs_level)


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    """The digest of a row's prompt token ids (no padding): the problem's identity in a bundle's `problem_digests`
    (the same digest `pipeline.train.prompt_digests` gives a collected trace).

    Args:
        prompt_ids: the prompt's token ids, without padding.

    Returns:
        A 16-hex-digit digest.

    Example:
        >>> prompt_digest([1, 2, 3])
        'a36b1f2c3f84522d'
    """
    return short_digest([int(t) for t in prompt_ids])


def probe_digest(probe) -> str:
    """A digest of a probe's weights (computed once per probe object and weights version): which probe scored an
    audited row.

    Args:
        probe: the probe (a `torch.nn.Module`, e.g. `LynxProbe`).

    Returns:
        A 16-hex-digit digest of its weights.

    Example:
        >>> from lynx_hf.runtime.probe import LynxProbe
        >>> probe = LynxProbe(4)
        >>> probe_digest(probe) == probe_digest(probe)
        True
    """
    state = probe.state_dict()
    versions = tuple(v._version for v in state.values())
    cached = getattr(probe, "_lynx_digest", None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    digest = hashlib.sha256()
    for name, value in sorted(state.items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    out = digest.hexdigest()[:16]
    probe._lynx_digest = (versions, out)
    return out


@lru_cache(maxsize=64)
def rows_needed(delta: float, alpha: float) -> int:
    """Fewest rows with which the confidence sequence's lower bound can exceed δ at all (every row disagreeing):
    below it the verdict is "too few rows".

    Args:
        delta: the rate bound δ = 1 - c.
        alpha: the confidence sequence's miscoverage, 1 - cs_level.

    Returns:
        The number of rows (4097 when even 4096 are not enough).

    Example:
        >>> rows_needed(0.1, 0.05) >= 2
        True
    """
    for n in (8, 64, 512, 4096):
        lower, _ = betting_confidence_sequence(np.ones(n), alpha, include=(delta,))
        above = np.flatnonzero(lower > delta)
        if len(above):
            return int(above[0]) + 1
    return 4097


@dataclass
class AuditGroup:
    """The audit of the rows that ran with one setting (guarantee, confidence, risk level, rule): counts, the realised
    rate, the last bounds of its confidence sequence and the verdict.

    Attributes:
        guarantee: the setting's guarantee, ``"question"`` or ``"event"``.
        confidence: its confidence c.
        risk_level: its PAC risk level (None: marginal).
        rule: its per-event threshold rule.
        delta: δ = 1 - c, the rate the guarantee bounds.
        rows: audited rows.
        referenced: rows whose full trace has an answer.
        would_exit: referenced rows where the rule fired.
        disagreements: per question: rows whose exit changed the answer; per event: unsafe cues that exit.
        denominator: per question: referenced rows; per event: label-free unsafe cues of referenced rows.
        rate: disagreements / denominator (NaN when the denominator is 0).
        lower: the confidence sequence's last lower bound.
        upper: its last upper bound.
        verdict: "consistent with δ", "above δ: recalibrate" or "too few rows".
        over_range: per event: rows with more unsafe cues than the calibration's maximum (scaled to it; default 0).
        max_unsafe: per event: the range M used (default None; None per question).

    Example:
        >>> rows = [AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "4", False, 1, 0, 0)] * 40
        >>> group = audit_report(rows).groups[0]
        >>> group.rate, group.verdict, group.upper < 0.2
        (0.0, 'consistent with δ', True)
    """

    guarantee: str
    confidence: float
    risk_level: float | None
    rule: str
    delta: float
    rows: int  # audited rows
    referenced: int  # rows whose full trace has an answer
    would_exit: int  # referenced rows where the rule fired
    disagreements: int  # per question: rows whose exit changed the answer; per event: unsafe cues that exit
    denominator: int  # per question: referenced rows; per event: label-free unsafe cues of referenced rows
    rate: float
    lower: float
    upper: float
    verdict: str
    over_range: int = 0  # per event: rows with more unsafe cues than the calibration's maximum (scaled to it)
    max_unsafe: int | None = None


@dataclass
class AuditReport:
    """What `Lynx.audit()` (or `lynx-hf audit`) found: one `AuditGroup` per setting the audited calls used.

    Also the confidence level of the sequences, rows still waiting for their call to end, and the audit's cost.
    `print(report)` gives a table with each group's rate, confidence sequence and verdict.

    Attributes:
        groups: one `AuditGroup` per setting, in order of first appearance.
        cs_level: the coverage of the anytime-valid confidence sequences (e.g. 0.95).
        pending_rows: audited rows whose `generate` call has not been checked yet (default 0).
        forwards: model forwards the audit cost (default 0).
        tokens: tokens the audit fed the model (default 0).

    Example:
        >>> report = audit_report([AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1)])
        >>> report.groups[0].verdict, report.to_dict()["groups"][0]["disagreements"]
        ('too few rows', 1)
    """

    groups: list[AuditGroup]
    cs_level: float
    pending_rows: int = 0
    forwards: int = 0
    tokens: int = 0

    @property
    def alpha(self) -> float:
        """Deprecated: the confidence sequences' miscoverage, `1 - cs_level` (use `cs_level`)."""
        warnings.warn("AuditReport.alpha is deprecated: the confidence sequences' level is AuditReport.cs_level "
                      "(alpha = 1 - cs_level); alpha names the PAC risk level elsewhere (risk_level).",
                      FutureWarning, stacklevel=2)
        return round(1.0 - self.cs_level, 12)

    @property
    def audited_rows(self) -> int:
        """The audited rows in all groups.

        Example:
            >>> audit_report([AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1)]).audited_rows
            1
        """
        return sum(g.rows for g in self.groups)

    def to_dict(self) -> dict:
        """The report as JSON-ready values (`lynx-hf audit --json` prints it).

        Returns:
            A dict with `cs_level`, `pending_rows`, `forwards`, `tokens` and `groups` (each group's fields).

        Example:
            >>> audit_report([AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1)]).to_dict()["cs_level"]
            0.95
        """
        return {"cs_level": self.cs_level, "pending_rows": self.pending_rows, "forwards": self.forwards,
                "tokens": self.tokens, "groups": [asdict(g) for g in self.groups]}

    def __str__(self) -> str:
        level = f"{self.cs_level:.0%}"
        head = ["guarantee", "setting", "δ", "rows", "with ref", "would exit", "disagree", "rate", f"{level} CS",
                "verdict"]
        lines = [head]
        for g in self.groups:
            setting = f"c={g.confidence:g}" + (f", PAC α={g.risk_level:g}" if g.risk_level is not None else "") + \
                (f", rule={g.rule}" if g.rule != "envelope" else "")
            rate = "-" if math.isnan(g.rate) else f"{g.rate:.3f}"
            lines.append([g.guarantee, setting, f"{g.delta:.3f}", str(g.rows), str(g.referenced), str(g.would_exit),
                          f"{g.disagreements}/{g.denominator}", rate, f"[{g.lower:.3f}, {g.upper:.3f}]", g.verdict])
        widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
        text = [f"Lynx audit: label-free (exit answer vs the row's own full answer), anytime-valid {level} "
                "confidence sequences (betting, Waudby-Smith & Ramdas)"]
        text += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
        text.append(f"{level} CS: where the true disagreement rate lies, valid at every look at once; updated once "
                    "per audited generate call (the order of rows within a call does not matter). The verdict reads "
                    "the CS, not the rate.")
        for g in self.groups:
            if not math.isnan(g.rate) and not g.lower <= g.rate <= g.upper:
                text.append(f"note ({g.guarantee}, c={g.confidence:g}): the rate {g.rate:.3f} lies outside its CS "
                            f"[{g.lower:.3f}, {g.upper:.3f}]. The CS is the running intersection of every call's "
                            "sequence so far, so it keeps what earlier calls showed (they disagreed "
                            f"{'more' if g.rate < g.lower else 'less'} than the later ones); that is allowed by its "
                            "coverage, and the verdict stands on the CS.")
        for g in self.groups:
            if g.guarantee == "event":
                text.append(f"per event ({g.confidence:g}): disagree = label-free unsafe cues at or above τ / unsafe "
                            f"cues; range M = {g.max_unsafe} unsafe cues per row"
                            + (f", {g.over_range} row(s) above it scaled to M" if g.over_range else ""))
        rows = self.audited_rows
        if rows and self.forwards:
            text.append(f"audit cost: {self.forwards} forwards ({self.forwards / rows:.1f} per audited row), "
                        f"{self.tokens} tokens fed ({self.tokens / rows:.0f} per row)")
        if self.pending_rows:
            text.append(f"{self.pending_rows} audited row(s) wait for their generate call to end")
        return "\n".join(text)


def audit_report(rows: Iterable[AuditRow], *, cs_level: float = 0.95, max_unsafe: int | None = None,
                 pending_rows: int = 0, alpha: float | None = None) -> AuditReport:
    """Group `rows` by setting (in order of first appearance) and test each group's rate against its δ.

    `max_unsafe` is the per-event range M (default: the most label-free unsafe cues any row of the group has, which
    is only valid if fixed before seeing the data: `Lynx.audit` passes the calibration's maximum). `cs_level` is the
    confidence sequences' coverage (`alpha`, its miscoverage, is the deprecated way to give it).

    Args:
        rows: the audited rows.
        cs_level: the confidence sequences' coverage (default 0.95).
        max_unsafe: the per-event range M (default None: the group's own maximum, see above).
        pending_rows: audited rows not yet checked, reported as such (default 0).
        alpha: deprecated, `1 - cs_level` (FutureWarning).

    Returns:
        The `AuditReport`: per setting the rate, its confidence sequence and the verdict.

    Raises:
        ValueError: `cs_level` (or `alpha`) outside (0, 1).

    Example:
        >>> rows = [AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "4", False, 1, 0, 0)] * 40
        >>> audit_report(rows).groups[0].verdict
        'consistent with δ'
    """
    cs_level = check_cs_level(cs_level, alpha)
    alpha = round(1.0 - cs_level, 12)
    rows = list(rows)
    groups: dict[tuple, list[AuditRow]] = {}
    for row in rows:
        groups.setdefault(row.setting, []).append(row)
    out = []
    for (guarantee, confidence, risk_level, rule), members in groups.items():
        delta = round(1.0 - confidence, 12)
        referenced = [r for r in members if r.reference is not None]
        batches = np.array([-1 if r.batch is None else int(r.batch) for r in referenced], dtype=np.int64)
        over = 0
        bound = None
        if guarantee == "question":
            x = np.array([float(r.changed) for r in referenced])
            n = np.ones_like(x)
            disagreements, denominator = int(x.sum()), len(referenced)
            lower, upper = betting_confidence_sequence(x, alpha, include=(delta,), batches=batches)
        else:
            n = np.array([r.unsafe_cues for r in referenced], dtype=np.float64)
            x = np.array([r.unsafe_exits for r in referenced], dtype=np.float64)
            bound = int(max_unsafe) if max_unsafe is not None else int(max(n.max(initial=0), 1))
            disagreements, denominator = int(x.sum()), int(n.sum())
            over = int((n > bound).sum())
            scale = np.where(n > bound, bound / np.maximum(n, 1), 1.0)
            lower, upper = ratio_confidence_sequence(x * scale, n * scale, alpha, bound=bound, include=(delta,),
                                                     batches=batches)
        low = float(lower[-1]) if len(lower) else 0.0
        high = float(upper[-1]) if len(upper) else 1.0
        if len(referenced) < rows_needed(delta, alpha):
            verdict = TOO_FEW
        elif low > delta:
            verdict = ABOVE
        else:
            verdict = CONSISTENT
        out.append(AuditGroup(
            guarantee=guarantee, confidence=confidence, risk_level=risk_level, rule=rule, delta=delta,
            rows=len(members), referenced=len(referenced), would_exit=sum(r.would_exit for r in referenced),
            disagreements=disagreements, denominator=denominator,
            rate=disagreements / denominator if denominator else math.nan, lower=low, upper=high, verdict=verdict,
            over_range=over, max_unsafe=bound,
        ))
    return AuditReport(out, cs_level, pending_rows=pending_rows, forwards=sum(r.forwards for r in rows),
                       tokens=sum(r.tokens for r in rows))


class AuditLog:
    """The audited rows of every `generate` call of one `Lynx` (all threads), and the calls still to check.

    Thread-safe. `save(path)` / `AuditLog.load(path)` keep the settled rows as JSON; `Lynx.reset_audit()` starts a
    new log.

    Args:
        rows: settled rows to start from (default: none), e.g. those of a saved log; new calls' batch labels
            continue after theirs.

    Example:
        >>> log = AuditLog([AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "4", False, 1, 0, 0)])
        >>> len(log), log.report().groups[0].disagreements
        (1, 0)
    """

    def __init__(self, rows: Iterable[AuditRow] = ()):
        self._rows: list[AuditRow] = list(rows)
        # the next settled call's batch label (after those of the rows given, e.g. a loaded log)
        self._batches = 1 + max((r.batch for r in self._rows if r.batch is not None), default=-1)
        self._pending: list[GenerateCall] = []
        self._draws = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    @property
    def rows(self) -> list[AuditRow]:
        """The settled audited rows, in the order they were checked."""
        with self._lock:
            return list(self._rows)

    @property
    def pending_rows(self) -> int:
        """Audited rows whose call has not been checked yet."""
        with self._lock:
            return sum(int(c.audited.sum()) for c in self._pending)

    def draw(self, batch: int, rate: float, seed: int) -> list[bool]:
        """Which rows of the next call are audited: the k-th draw of this log uses `numpy.random.default_rng((seed,
        k))`, so the same calls in the same order audit the same rows (never touching torch's random state).

        Args:
            batch: the call's number of rows.
            rate: the probability that each row is audited.
            seed: the audit seed (`Lynx.audit_seed`).

        Returns:
            One bool per row: True where the row is audited.

        Example:
            >>> AuditLog().draw(4, 1.0, seed=0)
            [True, True, True, True]
        """
        with self._lock:
            k = self._draws
            self._draws += 1
        return (np.random.default_rng((int(seed), k)).random(batch) < rate).tolist()

    def track(self, call: GenerateCall) -> None:
        """Remember a call with audited rows until it is checked (the plug-ins call it when a call starts).

        Args:
            call: the running `generate` call's state, with its audited rows.
        """
        with self._lock:
            self._pending.append(call)

    def settle(self, call: GenerateCall | None = None) -> None:
        """Check `call` (one whose output exists), or every tracked call whose `generate` has returned.

        Each checked call's rows are appended as one batch (one unit of the confidence sequence).

        Args:
            call: the call to check now (default None: every tracked call whose `generate` has returned).

        Example:
            >>> log = AuditLog()
            >>> log.settle()   # nothing tracked: nothing to check
            >>> len(log)
            0
        """
        with self._lock:
            if call is not None:
                todo = [c for c in self._pending if c is call]
            else:
                todo = [c for c in self._pending if c._released]
            self._pending = [c for c in self._pending if not any(c is t for t in todo)]
        for c in todo:
            rows = audit_call(c)
            with self._lock:  # one batch per call: its rows are one unit of the confidence sequence
                self._rows.extend(replace(r, batch=self._batches) for r in rows)
                self._batches += 1

    def report(self, *, cs_level: float = 0.95, max_unsafe: int | None = None,
               alpha: float | None = None) -> AuditReport:
        """The `AuditReport` of the settled rows (see `audit_report`), with `cs_level` confidence sequences.

        Args:
            cs_level: the coverage of the confidence sequences (default 0.95).
            max_unsafe: the per-event range M (default None: the most unsafe cues of any row of the group;
                `Lynx.audit` passes the calibration's maximum).
            alpha: deprecated, `1 - cs_level` (FutureWarning).

        Returns:
            The `AuditReport`, counting the rows still pending.

        Raises:
            ValueError: `cs_level` (or `alpha`) outside (0, 1).

        Example:
            >>> log = AuditLog([AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1)])
            >>> log.report(cs_level=0.9).groups[0].disagreements
            1
        """
        return audit_report(self.rows, cs_level=check_cs_level(cs_level, alpha, stacklevel=3), max_unsafe=max_unsafe,
                            pending_rows=self.pending_rows)

    def save(self, path: str | os.PathLike) -> None:
        """Write the settled rows as JSON (calls still running are not saved).

        Args:
            path: the file to write.

        Example:
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "audit.json")
            >>> AuditLog([AuditRow("question", 0.9, None, "envelope", 0.8, "4", True, "3", True, 2, 1, 1)]).save(path)
            >>> len(AuditLog.load(path))
            1
        """
        payload = {"format": _FORMAT, "version": _VERSION, "rows": [r.to_dict() for r in self.rows]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AuditLog":
        """A log holding the rows `save` wrote (assign it to `lynx.audit_log` to keep auditing into it).

        Args:
            path: a file `save` wrote.

        Returns:
            The `AuditLog`; new calls' batches continue after the loaded rows'.

        Raises:
            ValueError: the file is not an audit log, or was written by a newer lynx-hf.

        Example:
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "audit.json")
            >>> AuditLog().save(path)
            >>> AuditLog.load(path).rows
            []
        """
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an audit log written by AuditLog.save: give the file lynx.audit_log.save "
                             "wrote.")
        if payload.get("version", 1) > _VERSION:
            raise ValueError(f"{path} is an audit log of version {payload['version']}; this lynx-hf reads versions up "
                             f"to {_VERSION}: upgrade lynx-hf to read it.")
        return cls(AuditRow.from_dict(row) for row in payload["rows"])


def _row_trace(call: GenerateCall, sequences: torch.Tensor, row: int, eos: list[int]) -> tuple[list[int], int]:
    """Row `row`'s trace without padding (prompt without its left padding, generation up to its first EOS) and
    how many padding positions its prompt had."""
    ids = sequences[row].tolist()
    prompt = ids[: call.prompt_length]
    if call.prompt_mask is not None:
        prompt = [t for t, m in zip(prompt, call.prompt_mask[row].tolist()) if m]
    generated = ids[call.prompt_length:]
    for i, token in enumerate(generated):
        if token in eos:
            generated = generated[: i + 1]
            break
    return prompt + generated, call.prompt_length - len(prompt)


class _ForwardCounter:
    """Counts the forwards (and tokens fed) `model` runs in this thread while active."""

    def __init__(self, model):
        self.model, self.forwards, self.tokens = model, 0, 0
        self._thread = threading.get_ident()

    def __enter__(self):
        def hook(module, args, kwargs):
            if threading.get_ident() == self._thread:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.forwards += 1
                self.tokens += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0

        self._handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@torch.no_grad()
def audit_call(call: GenerateCall) -> list[AuditRow]:
    """The `AuditRow`s of a finished call's audited rows: each full trace is re-read with `force_exits` (one forward
    up to its last cue, then its cues' forced answers in about `answer_max_new_tokens` packed forwards).

    The trace is the ids the plug-ins saw last: in stop mode the criterion sees every generated token; in-stream the
    processor sees all but the call's last token, which the answer stopper (when in the call) adds. Without the
    stopper, a row whose box closes on exactly that last token (`max_new_tokens` ended the call there) has no
    reference.

    `AuditLog.settle` runs it; `Lynx.answer(out)` and `Lynx.audit()` settle finished calls.

    Args:
        call: a finished `generate` call's state, with audited rows.

    Returns:
        One `AuditRow` per audited row, in row order.
    """
    from .forced import force_exits
    from .exit import eos_token_ids

    lynx, model, tokenizer = call.lynx, call.model, call.tokenizer
    sequences = call.final_ids if call.final_ids is not None else call.sequences
    eos = eos_token_ids(model, tokenizer)
    records = call.records()
    rows = [i for i, r in enumerate(records) if r.audited]
    traces = [_row_trace(call, sequences, i, eos) for i in rows]
    prompt_lengths = [call.prompt_length - pad for _, pad in traces]
    found = call.detector.find_events_batch([ids for ids, _ in traces], prompt_lengths)
    out = []
    for i, (ids, pad), prompt_length, events in zip(rows, traces, prompt_lengths, found):
        record = records[i]
        reference = extract_boxed(tokenizer.decode(ids[prompt_length:], skip_special_tokens=True))
        with _ForwardCounter(model) as counter:
            features, forced = force_exits(model, tokenizer, lynx.config.layers, ids, events, call.exit_ids,
                                           exit_construction=call.exit_construction,
                                           answer_max_new_tokens=lynx.config.answer_max_new_tokens)
        device = next(lynx.probe.parameters()).device
        scores = lynx.probe.predict_proba(features.to(device)).float().cpu() if len(events) else torch.zeros(0)
        exit_index = -1
        if record.would_exit and not record.by_budget:  # a budget exit is outside the guarantee: no cue exit here
            matches = [k for k, e in enumerate(events) if e.position == record.position - pad]
            if not matches:
                logger.warning("Audited row %d would exit at token %d, which is no cue of its re-read trace; it is "
                               "counted without a reference.", i, record.position)
                reference = None
            else:
                exit_index = matches[0]
        out.append(observe_row(call.audit_settings, call.threshold, reference, [a.answer for a in forced], scores,
                               exit_index, forwards=counter.forwards, tokens=counter.tokens,
                               prompt=prompt_digest(ids[:prompt_length]), probe=probe_digest(lynx.probe)))
    return out


# ----- recalibration from audited rows ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Recalibration:
    """A calibration built from audited rows, and what it rests on (see `recalibrate_rows`).

    Attributes:
        calibration: the `Calibration` built from the rows' cues, labelled by agreement.
        rows: audited rows given.
        used: rows with a reference and per-cue data (the calibration questions; those without a cue never exit and
            add no events).
        without_reference: rows whose full trace had no answer (no label exists for their cues).
        without_scores: rows from a log written before rows kept their cues' scores.
        prompts: the used rows' prompt digests.
    """

    calibration: Calibration
    rows: int
    used: int
    without_reference: int
    without_scores: int
    prompts: tuple[str | None, ...]

    @property
    def agreement(self) -> float:
        """Share of the calibration cues whose forced answer matches the row's full answer."""
        return self.calibration.n_safe / max(self.calibration.n_events, 1)


def _rows_needed_for(calibration: Calibration | None, used: int, confidence: float, guarantee: str,
                     risk_level: float | None) -> tuple[int, str]:
    """(total usable rows needed, what for) to certify `confidence`: exact for the calibration size the guarantee
    counts (questions with a cue, or unsafe cues), scaled to rows by the share seen so far."""
    c = Fraction(repr(float(confidence)))
    delta = float(1 - c)
    marginal = math.ceil(c / (1 - c))  # ceil((n + 1) c) <= n, i.e. delta >= 1 / (n + 1)
    if guarantee == "question":
        need = marginal if risk_level is None else pac_needed(delta, risk_level)
        have = calibration.n_questions if calibration is not None else 0
        what = (f"{need} rows with a cue (per question, {'1/(n+1) <= δ' if risk_level is None else '(1 - δ)^n <= α'})")
    else:
        have = calibration.n_unsafe if calibration is not None else 0
        if risk_level is None:
            need, what = marginal, f"{marginal} cues whose forced answer changes the answer (per event, 1/(n+1) <= δ)"
        elif calibration is None or calibration.max_unsafe_per_question <= 1:
            need = pac_needed(delta, risk_level)
            what = f"{need} cues whose forced answer changes the answer (per event, (1 - δ)^n <= α)"
        else:
            text = calibration._clustered_needed(delta, risk_level)
            questions = int(text.split()[-1])
            per_row = calibration.n_questions / max(used, 1)
            total = max(math.ceil(questions / per_row), used + 1)
            return total, f"{text} rows with a cue (per event at risk level α, counted in rows)"
    if have == 0 or used == 0:
        return max(need, used + 1), what
    return max(math.ceil(need * used / have), used + 1), what


def recalibrate_rows(rows: Iterable[AuditRow], *, confidence: float, guarantee: str, risk_level: float | None = None,
                     rule: str = "envelope", probe: str | None = None) -> Recalibration:
    """A `Calibration` from audited rows, labelled by agreement: each cue of a row with a reference is an event with
    its probe score, "safe" when its forced answer matches the row's own full answer, and the row as its question.

    This is the calibration `pipeline.train.calibrate` builds from an event table, with the full answer in place of
    the gold one, so every guarantee of `Calibration` reads with "changes the final answer" for "makes it wrong":
    at `confidence` c, per question, the share of new rows whose exit changes their answer is at most 1 - c
    (marginal; with `risk_level` α, for this calibration with probability at least 1 - α). It assumes the audited
    rows are a uniform random sample of the traffic the new calibration will serve, and that this traffic does not
    change between them (exchangeability). If it drifts, the guarantee no longer holds, and the new calibration's
    own audit flags it as this one's did.

    Args:
        rows: audited rows (`AuditLog.rows`), any settings: a row's cue scores and labels do not depend on the
            threshold it ran with.
        confidence: the confidence the new calibration must certify.
        guarantee: ``"question"`` or ``"event"``.
        risk_level: None (marginal) or α (PAC).
        rule: the per-event threshold rule.
        probe: `probe_digest` of the probe that will use the calibration; rows scored by another probe are refused.

    Returns:
        A `Recalibration`: the calibration and the counts it rests on.

    Raises:
        TooFewAuditedRowsError: the rows cannot certify `confidence` (the message says how many more rows it needs).
        LynxConfigError: rows were scored by another probe, or none keeps per-cue scores (an old log).

    Example:
        >>> rows = [observe_row(dict(guarantee="question", confidence=0.9, risk_level=None, rule="envelope"), 0.5,
        ...                     "4", ["3", "4"], torch.tensor([0.2 + i / 100, 0.9]), exit_index=1) for i in range(30)]
        >>> result = recalibrate_rows(rows, confidence=0.9, guarantee="question")
        >>> result.used, result.calibration.n_events, result.agreement
        (30, 60, 0.5)
        >>> recalibrate_rows(rows[:5], confidence=0.9, guarantee="question")
        Traceback (most recent call last):
        ...
        lynx_hf.errors.TooFewAuditedRowsError: 5 audited rows with a reference cannot certify c = 0.9 per question (marginal): it needs 9 rows with a cue (per question, 1/(n+1) <= δ), about 9 audited rows like these in all: audit 4 more rows, or lower the confidence.
    """
    check_guarantee(guarantee)
    check_rule(rule)
    risk_level = check_risk_level(risk_level)
    rows = list(rows)
    old = [r for r in rows if r.scores is None]
    others = {r.probe for r in rows if r.probe is not None and probe is not None and r.probe != probe}
    if others:
        raise LynxConfigError(
            f"{sum(r.probe in others for r in rows)} audited row(s) were scored by another probe ({sorted(others)}) "
            "than this bundle's: recalibrate the bundle whose audit log it is, or audit this one.")
    if rows and len(old) == len(rows):
        raise LynxConfigError(
            f"None of the {len(rows)} audited rows keeps its cues' probe scores (a log written by an older lynx-hf): "
            "they still audit, but cannot recalibrate; audit new traffic with this version and recalibrate from that.")
    usable = [r for r in rows if r.scores is not None and r.agrees is not None]
    without_reference = sum(r.scores is not None and r.agrees is None for r in rows)
    scores, safe, question = [], [], []
    for i, row in enumerate(usable):
        scores += row.scores
        safe += row.agrees
        question += [i] * len(row.scores)
    calibration = Calibration(scores=scores, safe=safe, question=question) if scores else None
    setting = f"c = {float(confidence):g} per {guarantee} ({'marginal' if risk_level is None else f'PAC, α = {risk_level:g}'})"
    short = calibration is None
    if calibration is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LynxCalibrationWarning)
            calibration.threshold(confidence, guarantee, rule=rule, risk_level=risk_level)
        short = any(issubclass(w.category, LynxCalibrationWarning) for w in caught)
    if short:
        total, what = _rows_needed_for(calibration, len(usable), confidence, guarantee, risk_level)
        raise TooFewAuditedRowsError(
            f"{len(usable)} audited rows with a reference cannot certify {setting}: it needs {what}, about {total} "
            f"audited rows like these in all: audit {total - len(usable)} more rows, or lower the confidence."
            + (f" ({without_reference} row(s) without a full answer and {len(old)} from an older log do not count.)"
               if without_reference or old else ""))
    return Recalibration(calibration=calibration, rows=len(rows), used=len(usable),
                         without_reference=without_reference, without_scores=len(old),
                         prompts=tuple(r.prompt for r in usable))


# metadata of the old calibration that does not describe the new one
_CALIBRATION_KEYS = ("calibration_auroc", "calibration_data", "sampling", "test", "test_questions", "test_auroc",
                     "test_realised_rates")


def recalibrated_metadata(metadata: dict, result: Recalibration, settings: dict, *, source: str,
                          date: str | None = None) -> dict:
    """A bundle's metadata after `result` replaced its calibration: the probe's own entries kept, the old
    calibration's (data, AUROC, held-out rates) replaced by where the new one came from (`recalibration`: rows,
    labels "agreement", date, settings, source; the old calibration's description kept as `previous_calibration`),
    and `labels` saying that the probe keeps its labels and the calibration's are by agreement.

    Args:
        metadata: the bundle's metadata before.
        result: the `Recalibration` that replaces its calibration.
        settings: the settings it was certified for (confidence, guarantee, risk level, rule).
        source: where the rows came from, in words (e.g. "the live audit").
        date: the date to record (default None: today, UTC).

    Returns:
        A new metadata dict.

    Example:
        >>> rows = [observe_row(dict(guarantee="question", confidence=0.9, risk_level=None, rule="envelope"), 0.5,
        ...                     "4", ["3", "4"], torch.tensor([0.2, 0.9]), exit_index=1, prompt=f"p{i}")
        ...         for i in range(20)]
        >>> result = recalibrate_rows(rows, confidence=0.9, guarantee="question")
        >>> meta = recalibrated_metadata({"calibration_data": "500 traces"}, result, {"confidence": 0.9},
        ...                              source="audit", date="2026-12-07")
        >>> meta["recalibration"]["audited_rows"], meta["labels"]
        (20, {'probe': 'gold', 'calibration': 'agreement'})
    """
    import datetime

    from .probe import auroc

    cal = result.calibration
    meta = {k: v for k, v in metadata.items() if k not in _CALIBRATION_KEYS and k != "recalibration"}
    digests = dict(meta.get("problem_digests") or {})
    digests["calibration"] = [p for p in result.prompts if p is not None]
    meta["problem_digests"] = digests
    defined = 0 < cal.n_safe < cal.n_events
    meta["calibration_auroc"] = auroc(cal.scores, cal.safe) if defined else None
    meta["calibration_data"] = (f"{cal.n_events} cue events from {result.used} audited rows "
                                f"({result.agreement:.1%} agreeing with the row's full answer)")
    previous = metadata.get("labels") if isinstance(metadata.get("labels"), dict) else {}
    meta["labels"] = {"probe": previous.get("probe", "gold"), "calibration": "agreement"}
    meta["recalibration"] = {
        "source": source,
        "audited_rows": result.rows,
        "rows_used": result.used,
        "rows_with_cues": cal.n_questions,
        "rows_without_reference": result.without_reference,
        "rows_without_scores": result.without_scores,
        "events": cal.n_events,
        "labels": "agreement",
        "date": date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "settings": dict(settings),
        "previous_calibration": metadata.get("calibration_data"),
    }
    return meta
