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

import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from .answers import answers_match, extract_boxed
from .bounds import betting_confidence_sequence, ratio_confidence_sequence
from .conformal import exits

if TYPE_CHECKING:
    from .monitor import GenerateCall

logger = logging.getLogger(__name__)

_FORMAT = "lynx-hf/audit-log"
CONSISTENT, ABOVE, TOO_FEW = "consistent with δ", "above δ: recalibrate", "too few rows"


@dataclass(frozen=True)
class AuditRow:
    """One audited row: the settings its call ran with, its full answer (`reference`, None when the full trace has no
    boxed answer) and what an exit would have done to it. `changed`: the would-exit answer differs from the full one.
    `unsafe_cues`: cues whose forced answer differs from the full one; `unsafe_exits`: of those, the ones scoring at
    or above the threshold. `forwards` / `tokens`: what re-checking the row cost (0 in a replay). `batch`: which
    audited `generate` call (or replayed trace) the row came from; the rows of one batch are one unit of the
    confidence sequence, so their order never matters (rows without one, e.g. built by hand, are one batch).

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

    @property
    def setting(self) -> tuple:
        return self.guarantee, self.confidence, self.risk_level, self.rule


def observe_row(settings: dict, threshold: float, reference: str | None, answers: Sequence[str | None],
                scores: torch.Tensor, exit_index: int, *, forwards: int = 0, tokens: int = 0,
                batch: int | None = None) -> AuditRow:
    """The `AuditRow` of one trace from its cues' forced answers and probe scores (in trace order), its full answer
    and the index of its would-exit cue (-1: none), from batch `batch`. Live and replay audits both build rows here.

    Example:
        >>> import torch
        >>> row = observe_row(dict(guarantee="event", confidence=0.9, risk_level=None, rule="envelope"), 0.5, "4",
        ...                   ["3", "4", "3"], torch.tensor([0.2, 0.7, 0.9]), exit_index=1)
        >>> row.changed, row.unsafe_cues, row.unsafe_exits
        (False, 2, 1)
    """
    differs = [reference is None or not answers_match(a, reference) for a in answers]
    exit_answer = answers[exit_index] if exit_index >= 0 else None
    above = exits(torch.as_tensor(scores).reshape(-1).float(), threshold).tolist() if len(answers) else []
    has_reference = reference is not None
    return AuditRow(
        guarantee=settings["guarantee"], confidence=float(settings["confidence"]), risk_level=settings["risk_level"],
        rule=settings["rule"], threshold=float(threshold), reference=reference, would_exit=exit_index >= 0,
        exit_answer=exit_answer, changed=has_reference and exit_index >= 0 and differs[exit_index], cues=len(answers),
        unsafe_cues=sum(differs) if has_reference else 0,
        unsafe_exits=sum(d and a for d, a in zip(differs, above)) if has_reference else 0,
        forwards=forwards, tokens=tokens, batch=batch,
    )


def check_cs_level(cs_level: float = 0.95, alpha: float | None = None, *, stacklevel: int = 3) -> float:
    """The audit's confidence-sequence level, from `cs_level` or the deprecated `alpha` (its miscoverage, 1 -
    cs_level; renamed because `alpha` is the PAC risk level, `risk_level`, everywhere else).

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


@lru_cache(maxsize=64)
def rows_needed(delta: float, alpha: float) -> int:
    """Fewest rows with which the confidence sequence's lower bound can exceed δ at all (every row disagreeing):
    below it the verdict is "too few rows".

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
    """What `Lynx.audit()` (or `lynx-hf audit`) found: one `AuditGroup` per setting the audited calls used, the
    confidence level of the sequences, rows still waiting for their call to end, and the audit's cost.

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
        return sum(g.rows for g in self.groups)

    def to_dict(self) -> dict:
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
        k))`, so the same calls in the same order audit the same rows (never touching torch's random state)."""
        with self._lock:
            k = self._draws
            self._draws += 1
        return (np.random.default_rng((int(seed), k)).random(batch) < rate).tolist()

    def track(self, call: GenerateCall) -> None:
        """Remember a call with audited rows until it is checked."""
        with self._lock:
            self._pending.append(call)

    def settle(self, call: GenerateCall | None = None) -> None:
        """Check `call` (one whose output exists), or every tracked call whose `generate` has returned."""
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
        """The `AuditReport` of the settled rows (see `audit_report`), with `cs_level` confidence sequences."""
        return audit_report(self.rows, cs_level=check_cs_level(cs_level, alpha, stacklevel=3), max_unsafe=max_unsafe,
                            pending_rows=self.pending_rows)

    def save(self, path: str | os.PathLike) -> None:
        """Write the settled rows as JSON (calls still running are not saved)."""
        payload = {"format": _FORMAT, "version": 1, "rows": [asdict(r) for r in self.rows]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AuditLog":
        """A log holding the rows `save` wrote (assign it to `lynx.audit_log` to keep auditing into it)."""
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an audit log written by AuditLog.save: give the file lynx.audit_log.save "
                             "wrote.")
        return cls(AuditRow(**row) for row in payload["rows"])


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
                               exit_index, forwards=counter.forwards, tokens=counter.tokens))
    return out
