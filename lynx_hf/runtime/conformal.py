"""Conformal calibration: turn a user confidence ``c`` into a probe-score threshold ``tau`` with a guarantee.

Every calibration cue event has a probe score ``p = P(safe)`` and a label ``safe`` (a forced exit at that cue answers
correctly). Decoding exits at the first cue with ``p >= tau``. Exiting at an unsafe event is a *premature exit*.
With ``delta = 1 - c`` three strengths of guarantee are offered, all for new questions exchangeable with the
calibration questions:

* ``guarantee="event"`` (the paper's, class-conditional split conformal): an unsafe cue event exits with
  probability at most ``delta``, on average over calibration draws. It bounds premature exits *per unsafe event*.
* ``guarantee="question"`` (conformal risk control on the first-exit rule): the share of questions whose first exit
  is unsafe is at most ``delta``, on average over calibration draws ("fraction of questions harmed").
* either of them with ``risk_level=alpha`` (PAC, "probably approximately correct"): with probability at least
  ``1 - alpha`` over the calibration draw, the rate is at most ``delta`` for *this* calibration set. Per question:
  Learn-then-Test with fixed-sequence testing from the most conservative threshold down and exact binomial p-values.
  Per event: the unsafe cues of one trace are correlated, so the draws are questions, not events. When no question
  has more than one unsafe cue, they are independent and an exact binomial (Clopper-Pearson) upper bound applies;
  otherwise Learn-then-Test runs on question-level sums (unsafe cues that exit minus ``delta`` times unsafe cues)
  with betting p-values (Waudby-Smith & Ramdas), which are valid for any dependence inside a trace provided no new
  trace has more unsafe cues than the calibration maximum (the bound's range).

The per-event threshold has two rules. The paper's (``rule="paper"``) also asks that "safe" be in the conformal
prediction set, and at low ``c`` that half can bind, so lowering ``c`` can make it exit *less*. The default
(``rule="envelope"``) uses ``tau(c) = min over c' >= c`` of the paper's ``tau(c')``: it only drops that safe-side
condition where it binds, so it keeps the guarantee (the unsafe-side bound only grows with ``c``) and never exits less
when ``c`` is lowered.

Everything is computed from the stored calibration scores, so any ``(c, alpha)`` is exact at run time. When the
calibration set is too small to certify anything, ``tau = inf`` (never exit) and a :class:`LynxCalibrationWarning`
says how much calibration data would be needed; the reference implementation silently used the largest score.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from ..errors import LynxConfigError
from .bounds import _betting_log_wealth, betting_p_values, pac_allowance, pac_needed

logger = logging.getLogger(__name__)

__all__ = ["Calibration", "LynxCalibrationWarning", "exits", "first_exit"]

GUARANTEES = ("event", "question")
DEFAULT_GUARANTEE = "question"  # what `Lynx` uses unless told: "at most 1 - c of the answers get worse"
GUARANTEE_ORDER = (DEFAULT_GUARANTEE, *(g for g in GUARANTEES if g != DEFAULT_GUARANTEE))  # how tables list them
RULES = ("envelope", "paper")
_FORMAT = "lynx-hf/calibration"
_WALK_CELLS = 2 ** 22  # thresholds x questions the clustered PAC walk holds at once (~32 MB of float64)
_VERSION = 1


class LynxCalibrationWarning(UserWarning):
    """The requested confidence cannot be certified with this calibration set; the threshold is ``inf``."""


def _exact_confidence(confidence: float) -> Fraction:
    """``confidence`` as the exact decimal it prints as (0.9 -> 9/10), after validating that it lies in (0, 1).

    Using the shortest decimal rather than the binary float avoids ``ceil(20 * 0.55) == 12`` style off-by-ones.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating, np.integer)):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}.")
    value = float(confidence)
    if not (0.0 < value < 1.0):
        raise ValueError(f"confidence must be in the open interval (0, 1), got {value!r} (delta = 1 - confidence).")
    return Fraction(repr(value))


def check_guarantee(guarantee: str) -> str:
    """Return `guarantee` if it is one of `GUARANTEES`, else raise `LynxConfigError` naming the choices."""
    if guarantee not in GUARANTEES:
        raise LynxConfigError(f"unknown guarantee {guarantee!r}; choose 'event' (per cue event) or 'question' (per question).")
    return guarantee


def check_rule(rule: str) -> str:
    """Return `rule` if it is one of `RULES`, else raise `LynxConfigError` naming the choices."""
    if rule not in RULES:
        raise LynxConfigError(
            f"unknown rule {rule!r}; choose 'envelope' (default, monotone in confidence) or 'paper' (the paper's exact "
            "per-event rule)."
        )
    return rule


def check_risk_level(risk_level: float | None) -> float | None:
    """``None`` (marginal guarantee) or a number ``alpha`` in (0, 1) (PAC: holds with probability >= 1 - alpha).

    Example:
        >>> check_risk_level(0.1), check_risk_level(None)
        (0.1, None)
    """
    if risk_level is None:
        return None
    if isinstance(risk_level, bool) or not isinstance(risk_level, (int, float, np.floating, np.integer)):
        raise LynxConfigError(f"risk_level must be None or a number in (0, 1), got {risk_level!r}.")
    value = float(risk_level)
    if not (0.0 < value < 1.0):
        raise LynxConfigError(
            f"risk_level must be None (marginal guarantee) or in the open interval (0, 1), got {value!r}; e.g. "
            "risk_level=0.1 makes the guarantee hold for 90% of calibration draws."
        )
    return value


def _conformal_quantile(sorted_scores: np.ndarray, confidence: Fraction) -> float:
    """``sorted(s)[ceil((n + 1) * c) - 1]`` with the finite-sample correction; ``inf`` when that rank exceeds ``n``."""
    n = len(sorted_scores)
    rank = math.ceil((n + 1) * confidence)
    if rank > n:
        return math.inf
    return float(sorted_scores[rank - 1])


def _needed_events(confidence: Fraction) -> int:
    """Smallest calibration size ``n`` for which ``ceil((n + 1) c) <= n``, i.e. ``n >= c / (1 - c)``."""
    return math.ceil(confidence / (1 - confidence))


def _float_from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _bits_from_float(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _min_p_with_complement_at_most(q: float) -> float:
    """Smallest float64 ``p`` in [0, 1] with ``1 - p <= q`` in float64 arithmetic (``-inf`` when every p qualifies).

    ``1 - p`` rounds, so ``1 - q`` itself can be off by an ulp or (for small p) map many p to one value; ``fl(1 - p)``
    is monotone in p and non-negative floats order like their bit patterns, so a binary search over bits is exact.
    """
    if q >= 1.0:
        return -math.inf
    if q < 0.0:
        return math.inf
    lo, hi = _bits_from_float(0.0), _bits_from_float(1.0)  # 1 - 0 > q and 1 - 1 <= q
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if 1.0 - _float_from_bits(mid) <= q:
            hi = mid
        else:
            lo = mid
    return _float_from_bits(hi)


def _as_float64_cpu(values, name: str) -> Tensor:
    # Python floats are float64: going through torch's default float32 would round them.
    t = values.detach() if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be float probe scores, got dtype {t.dtype}.")
    return t.to(device="cpu", dtype=torch.float64).reshape(-1).contiguous()


def _block_ids(question: Tensor) -> Tensor:
    """0-based index of each event's contiguous question block; raises if a question id is not contiguous."""
    if question.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=question.device)
    change = torch.ones_like(question, dtype=torch.bool)
    change[1:] = question[1:] != question[:-1]
    blocks = torch.cumsum(change.long(), dim=0) - 1
    n_blocks = int(blocks[-1].item()) + 1
    if torch.unique(question).numel() != n_blocks:
        raise ValueError(
            "the events of each question must be contiguous (and in trace order); sort the event table by "
            "question, keeping each trace's order, before calibrating."
        )
    return blocks


def exits(scores: Tensor, tau: float) -> Tensor:
    """Exit decisions ``p >= tau`` (bool, same shape and device), exactly as if compared in float64.

    float64 scores are compared directly; other float dtypes are widened to float32 (exact) and compared with the
    smallest float32 that is ``>= tau``, which gives the same answer as the float64 comparison for every score and
    also runs on devices without float64.

    Example:
        >>> import torch
        >>> exits(torch.tensor([0.2, 0.7, 0.9], dtype=torch.float64), 0.7).tolist()
        [False, True, True]
        >>> exits(torch.tensor([0.7]), 0.7).tolist()  # float32(0.7) is 0.699999988... < 0.7
        [False]
        >>> exits(torch.tensor([0.99]), float("inf")).tolist()
        [False]
    """
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a float tensor, got {scores.dtype}.")
    tau = float(tau)
    if math.isnan(tau):
        raise ValueError("tau is NaN; use Calibration.threshold to compute it.")
    if scores.dtype == torch.float64:
        return scores >= tau
    return scores.to(torch.float32) >= float32_threshold(tau)


def float32_threshold(tau: float) -> float:
    """The smallest float32 that is ``>= tau``: for float32 scores ``p``, ``p >= float32_threshold(tau)`` iff
    ``p >= tau`` (what the plug-ins compare on device, where float64 may not exist).

    Example:
        >>> float32_threshold(0.7) >= 0.7, float32_threshold(float("inf"))
        (True, inf)
    """
    tau32 = np.float32(tau)  # round to nearest, then step up if that landed below tau
    if float(tau32) < tau:
        tau32 = np.nextafter(tau32, np.float32(np.inf))
    return float(tau32)


def first_exit(scores: Tensor, question: Tensor, tau: float) -> Tensor:
    """For each question, the event index of its first exit (first event in trace order with ``p >= tau``), or -1.

    ``question`` gives each event's question id; the events of a question must be contiguous and in trace order.
    Questions are returned in order of appearance; indices point into ``scores`` (global event indices). This is the
    offline replay of the exit rule.

    Example:
        >>> import torch
        >>> scores = torch.tensor([0.2, 0.8, 0.9, 0.1, 0.3])
        >>> question = torch.tensor([0, 0, 0, 1, 1])
        >>> first_exit(scores, question, 0.5).tolist()
        [1, -1]
    """
    scores = torch.as_tensor(scores)
    question = torch.as_tensor(question, device=scores.device).reshape(-1)
    if scores.dim() != 1 or scores.shape != question.shape:
        raise ValueError(
            f"scores and question must be 1-D with one entry per event, got {tuple(scores.shape)} and "
            f"{tuple(question.shape)}."
        )
    n = scores.numel()
    blocks = _block_ids(question)
    n_blocks = int(blocks[-1].item()) + 1 if n else 0
    index = torch.arange(n, device=scores.device)
    candidate = torch.where(exits(scores, tau), index, torch.full_like(index, n))
    first = torch.full((n_blocks,), n, dtype=torch.long, device=scores.device)
    first = first.scatter_reduce(0, blocks, candidate, reduce="amin", include_self=True)
    return torch.where(first == n, torch.full_like(first, -1), first)


@dataclass(frozen=True, eq=False, repr=False)
class Calibration:
    """Calibration events (probe scores, labels, question ids) and the thresholds they certify.

    Events of a question are contiguous and in trace order. ``threshold(c, guarantee)`` returns ``tau``; decoding
    exits at the first cue with ``p >= tau`` (``tau = inf``: never exit).

    * ``guarantee="event"``: class-conditional split conformal (as in the paper). Nonconformity ``1 - p`` on safe
      events and ``p`` on unsafe events; for a class of ``n`` scores ``q = sorted(s)[ceil((n + 1) c) - 1]``
      (``inf`` when the rank exceeds ``n``). A cue exits iff its prediction set is exactly {safe}: ``1 - p <= q_pos``
      and ``p > q_neg``, i.e. ``p >= tau``. Guarantee: P(an unsafe event exits) <= delta = 1 - c.
    * ``guarantee="question"``: conformal risk control (Angelopoulos et al. 2022). Question i's loss ``L_i(tau)`` is 1
      when its first exit is unsafe; it is not monotone in tau, so it is replaced by the upper envelope
      ``max_{t >= tau} L_i(t)``, which is non-increasing and >= L_i. ``tau`` is the smallest float64 (a fixed,
      data-independent grid containing every calibration score) with
      ``n/(n+1) * mean_i envelope_i(tau) + 1/(n+1) <= delta``. Guarantee: the expected share of new questions whose
      first exit is unsafe is <= delta. Questions without any cue never exit, so the bound also holds over all
      questions. Quote this one for "fraction of questions harmed".

    Confidences are read as the decimal they print as (``0.9`` means 9/10), so ranks are exact.

    Example:
        >>> cal = Calibration(scores=[0.3, 0.9, 0.8, 0.7, 0.2, 0.95], safe=[False, True, False, True, False, True],
        ...                   question=[0, 0, 1, 1, 2, 2])
        >>> cal.n_questions, cal.n_safe, cal.n_unsafe
        (3, 3, 3)
        >>> cal.threshold(0.5)  # exit iff p > 0.8: the paper's rule at c' = 0.75 (envelope)
        0.8000000000000002
        >>> cal.threshold(0.5, rule="paper")  # exit iff p >= 0.9: the paper's rule at c = 0.5 exits less
        0.9
        >>> cal.threshold(0.5, guarantee="question")  # exit iff p > 0.3: harms only question 1 (first exit 0.8)
        0.30000000000000004
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):  # too few events to certify: never exit, with a warning
        ...     cal.threshold(0.9), cal.threshold(0.5, risk_level=0.1)
        (inf, inf)
    """

    scores: Tensor
    safe: Tensor
    question: Tensor
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scores = _as_float64_cpu(self.scores, "scores")
        safe = torch.as_tensor(self.safe).detach().reshape(-1).cpu()
        question = torch.as_tensor(self.question).detach().reshape(-1).cpu()
        if safe.dtype != torch.bool:
            if safe.numel() and not bool(torch.isin(safe.to(torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)).all()):
                raise ValueError("safe must be boolean (True = the forced exit at this cue answers correctly).")
            safe = safe.to(torch.bool)
        if question.is_floating_point() or question.dtype == torch.bool:
            raise ValueError(f"question must hold integer question ids, got dtype {question.dtype}.")
        question = question.to(torch.long)
        if not (scores.numel() == safe.numel() == question.numel()):
            raise ValueError(
                f"scores, safe and question must have one entry per event, got {scores.numel()}, {safe.numel()} "
                f"and {question.numel()}."
            )
        if scores.numel() == 0:
            raise ValueError("a calibration set needs at least one event; run the probe on the calibration problems.")
        if not bool(torch.isfinite(scores).all()) or bool(((scores < 0) | (scores > 1)).any()):
            raise ValueError("scores must be probabilities in [0, 1] (probe.predict_proba), without NaN.")
        _block_ids(question)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "safe", safe.contiguous())
        object.__setattr__(self, "question", question.contiguous())

    def __repr__(self) -> str:
        return (
            f"Calibration(n_events={self.n_events}, n_questions={self.n_questions}, n_safe={self.n_safe}, "
            f"n_unsafe={self.n_unsafe})"
        )

    @property
    def n_events(self) -> int:
        """Number of calibration cue events."""
        return int(self.scores.numel())

    @property
    def n_questions(self) -> int:
        """Number of calibration questions (traces with at least one cue event)."""
        return int(self._stat("n_questions"))

    @property
    def n_safe(self) -> int:
        """Number of safe events (a forced exit there answers correctly)."""
        return int(self.safe.sum().item())

    @property
    def n_unsafe(self) -> int:
        """Number of unsafe events."""
        return self.n_events - self.n_safe

    @property
    def max_unsafe_per_question(self) -> int:
        """The most unsafe events any calibration question has: the range of the per-event betting bounds."""
        return int(self._stat("unsafe_per_question").max(initial=0))

    def _stat(self, name: str):
        """Sorted class scores and per-question envelope thresholds, computed once."""
        if "stats" not in self._cache:
            p = self.scores.numpy()
            safe = self.safe.numpy()
            blocks = _block_ids(self.question).numpy()
            n_q = int(blocks[-1]) + 1
            # Upper envelope of the first-exit loss: question i is harmed for some tau' >= tau iff tau <= T_i, where
            # T_i is the largest unsafe score that beats every earlier score of its trace (a "record").
            _, ranks = np.unique(p, return_inverse=True)
            keyed = blocks.astype(np.int64) * (len(p) + 1) + ranks.astype(np.int64)
            running = np.maximum.accumulate(keyed)
            earlier = np.empty_like(running)
            earlier[0] = -1
            earlier[1:] = running[:-1]
            first_in_block = np.ones(len(p), dtype=bool)
            first_in_block[1:] = blocks[1:] != blocks[:-1]
            record = first_in_block | (keyed > earlier)
            envelope = np.full(n_q, -np.inf)
            harmful = record & ~safe
            np.maximum.at(envelope, blocks[harmful], p[harmful])
            # A harmful record is the first exit of its question exactly for tau in (earlier max, p]: the first-exit
            # loss as a function of tau, for Learn-then-Test.
            values = np.unique(p)
            unsafe_order = np.argsort(-p[~safe], kind="stable")
            earlier_max = np.where(first_in_block, -np.inf, values[np.clip(earlier - blocks * (len(p) + 1), 0, None)])
            self._cache["stats"] = {
                "n_questions": n_q,
                "values_desc": values[::-1].copy(),
                "harm_hi": np.sort(p[harmful]),
                "harm_lo": np.sort(earlier_max[harmful]),
                "s_pos": np.sort(1.0 - p[safe]),
                "s_neg": np.sort(p[~safe]),
                "envelope_desc": np.sort(envelope[np.isfinite(envelope)])[::-1].copy(),
                "unsafe_desc": p[~safe][unsafe_order],
                "unsafe_desc_block": blocks[~safe][unsafe_order],
                "unsafe_per_question": np.bincount(blocks[~safe], minlength=n_q),
                "question_order": np.random.default_rng(0).permutation(n_q),  # the betting walk's: fixed, data-free
            }
        return self._cache["stats"][name]

    def event_quantiles(self, confidence: float) -> tuple[float, float]:
        """The class-conditional conformal quantiles ``(q_pos, q_neg)`` at ``confidence`` (``inf`` = always in the set).

        The prediction set of an event with score p holds "safe" iff ``1 - p <= q_pos`` and "unsafe" iff ``p <= q_neg``.

        Example:
            >>> cal = Calibration(scores=[0.875, 0.75, 0.25, 0.5], safe=[True, True, False, False], question=[0, 1, 2, 3])
            >>> cal.event_quantiles(0.5)
            (0.25, 0.5)
        """
        c = _exact_confidence(confidence)
        return _conformal_quantile(self._stat("s_pos"), c), _conformal_quantile(self._stat("s_neg"), c)

    def threshold(self, confidence: float, guarantee: str = "event", *, rule: str = "envelope",
                  risk_level: float | None = None) -> float:
        """Score threshold ``tau`` for confidence ``c = 1 - delta``: exit at a cue iff ``p >= tau`` (``inf``: never).

        ``guarantee="event"``: P(an unsafe cue event exits) <= delta. ``guarantee="question"``: the share of questions
        whose first exit is unsafe is <= delta. With ``risk_level=None`` these hold in expectation over calibration
        draws; with ``risk_level=alpha`` they hold with probability >= 1 - alpha for this calibration set (PAC).
        Warns (:class:`LynxCalibrationWarning`) and returns ``inf`` when the calibration set is too small to certify
        any exit. Cached per (confidence, guarantee, rule, risk_level).

        Per event, the paper's rule (``rule="paper"``) is ``tau = max(min{p : 1 - p <= q_pos}, U)`` with ``U`` the
        unsafe-side bound (the next float above ``q_neg``, above the order statistic the binomial bound allows, or
        the clustered PAC bound's threshold when some calibration question has several unsafe cues).
        ``U`` grows with ``c``; the first term (the paper's "safe must be in the prediction set") shrinks, and at low
        confidence it can bind, so the paper's ``tau`` is not monotone in ``c``. ``rule="envelope"`` (default) returns
        ``min over c' >= c`` of the paper's ``tau(c')``, which is ``>= U(c)`` (same guarantee) and monotone. Per
        question both rules coincide (the thresholds are monotone by construction).

        Example:
            >>> cal = Calibration(scores=[0.9, 0.4, 0.8, 0.3], safe=[True, False, True, False], question=[0, 0, 1, 1])
            >>> cal.threshold(0.5)
            0.8
            >>> cal.threshold(0.5, guarantee="question")  # no calibration question's first exit can be unsafe
            0.0
        """
        c = _exact_confidence(confidence)
        check_guarantee(guarantee)
        check_rule(rule)
        alpha = check_risk_level(risk_level)
        key = (c, guarantee, rule if guarantee == "event" else None, alpha)
        if key not in self._cache:
            if guarantee == "event":
                self._cache[key] = self._event_threshold(c, rule, alpha)
            else:
                self._cache[key] = self._question_threshold(c) if alpha is None else self._ltt_threshold(c, alpha)
        tau, message = self._cache[key]
        if message is not None:
            warnings.warn(message, LynxCalibrationWarning, stacklevel=2)
        return tau

    def _event_threshold(self, c: Fraction, rule: str, alpha: float | None) -> tuple[float, str | None]:
        s_pos, s_neg = self._stat("s_pos"), self._stat("s_neg")
        n_pos, n_neg = len(s_pos), len(s_neg)
        clustered = alpha is not None and int(self._stat("unsafe_per_question").max(initial=0)) > 1

        def unsafe_tau(x: Fraction, strict: bool) -> float:
            """Lowest threshold the unsafe side allows at confidence x (just above x if strict): every unsafe
            calibration score at or above it counts against the bound."""
            if clustered:
                return self._clustered_unsafe_bound(float(1 - x), alpha)
            if alpha is not None:
                m = pac_allowance(n_neg, float(1 - x), alpha, strict=strict)
            else:
                rank = math.floor((n_neg + 1) * x) + 1 if strict else math.ceil((n_neg + 1) * x)
                m = max(n_neg - rank, -1)
            if m < 0:
                return math.inf
            return 0.0 if m >= n_neg else math.nextafter(float(s_neg[n_neg - m - 1]), math.inf)

        def safe_bound(rank: int) -> float:  # min{p : 1 - p <= q_pos} at the safe-class rank
            return -math.inf if rank > n_pos else _min_p_with_complement_at_most(float(s_pos[rank - 1]))

        u0 = unsafe_tau(c, strict=False)
        if u0 == math.inf:
            delta = float(1 - c)
            if alpha is None:
                how = f"split conformal needs at least {_needed_events(c)} (delta >= 1/(n_unsafe + 1))"
            elif clustered:
                how = (f"at risk_level={alpha:g} the bound on its {self.n_questions} questions (up to "
                       f"{int(self._stat('unsafe_per_question').max())} unsafe cues each) cannot certify even "
                       f"never exiting; {self._clustered_needed(delta, alpha)} questions like these would")
            else:
                how = (f"the binomial bound at risk_level={alpha:g} needs at least {pac_needed(delta, alpha)} "
                       "((1 - delta)^n_unsafe <= risk_level)")
            return math.inf, (
                f"confidence {float(c)} (delta = {delta:.4g}) cannot be certified per event: the calibration set has "
                f"{n_neg} unsafe events and {how}. Never exiting (tau = inf); calibrate on more problems or lower the "
                "confidence."
            )
        r0 = math.ceil((n_pos + 1) * c)

        def unsafe_at(r: int) -> float:
            # the unsafe side on the r-th cell of safe ranks (c' in ((r-1)/(n_pos+1), r/(n_pos+1)] and >= c), lowest
            # at the cell's left end
            return u0 if r == r0 else unsafe_tau(Fraction(r - 1, n_pos + 1), strict=True)

        if rule == "paper":
            return max(safe_bound(r0), u0), None
        # min over r >= r0 of max(safe_bound(r), unsafe_at(r)): a non-increasing and a non-decreasing function, so the
        # minimum sits where they cross; binary-search the first r where the unsafe side is the larger. (The clustered
        # bound is monotone in the confidence only up to its betting noise: max with u0 keeps the guarantee at c.)
        lo, hi = r0, n_pos + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if unsafe_at(mid) >= safe_bound(mid):
                hi = mid
            else:
                lo = mid + 1
        best = max(safe_bound(lo), unsafe_at(lo))
        if lo > r0:
            best = min(best, max(safe_bound(lo - 1), unsafe_at(lo - 1)))
        return max(best, u0), None

    def _clustered_unsafe_bound(self, delta: float, alpha: float) -> float:
        """Smallest ``tau`` certified by Learn-then-Test for "the pooled rate at which unsafe cues exit is <= delta".

        For question ``q`` with ``N_q`` unsafe cues, ``X_q(tau)`` of them at or above ``tau``, and ``M = max N_q``:
        the rate ``E[X] / E[N]`` exceeds delta iff ``E[Y] > delta``, with ``Y = (X - delta N) / M + delta`` in
        [0, 1]. Walking the thresholds from ``inf`` down through the unsafe scores (``X`` only changes there), each
        null "rate > delta" is tested with :func:`betting_p_values` over the questions in a fixed random order; the
        walk stops at the first threshold it cannot reject (fixed-sequence testing needs no multiplicity correction).
        ``inf`` when even never exiting cannot be certified.
        """
        key = ("clustered", delta, alpha)
        if key not in self._cache:
            unsafe, block = self._stat("unsafe_desc"), self._stat("unsafe_desc_block")
            per_question, order = self._stat("unsafe_per_question"), self._stat("question_order")
            grid = np.unique(unsafe)[::-1]
            grid_index = np.searchsorted(-grid, -unsafe)  # unsafe is sorted descending: so is grid_index
            rows_all = np.arange(-1, len(grid))  # row -1: tau above every score, nothing exits; row r: tau = grid[r]
            exited = np.zeros(len(per_question))  # X at the last row of the previous chunk
            tau, start = 0.0, 0
            chunk = max(1, min(512, _WALK_CELLS // len(per_question)))
            for first in range(0, len(rows_all), chunk):
                rows = rows_all[first: first + chunk]
                stop = int(np.searchsorted(grid_index, rows[-1], side="right"))
                counts = np.zeros((len(rows), len(per_question)))
                np.add.at(counts, (grid_index[start:stop] - rows[0], block[start:stop]), 1.0)
                start = stop
                x = exited + np.cumsum(counts, axis=0)
                exited = x[-1]
                y = (x - delta * per_question) / per_question.max() + delta
                failing = np.flatnonzero(betting_p_values(y[:, order], delta) > alpha)
                if len(failing):
                    row = int(rows[failing[0]])
                    tau = math.inf if row < 0 else math.nextafter(float(grid[row]), math.inf)
                    break
            self._cache[key] = tau
        return self._cache[key]

    def _clustered_needed(self, delta: float, alpha: float) -> str:
        """How many questions like the calibration ones certify never exiting (the betting walk's first step), as
        text: the calibration questions repeated in the walk's order until the wealth reaches ``1 / alpha``."""
        per_question, order = self._stat("unsafe_per_question"), self._stat("question_order")
        y = delta * (1.0 - per_question[order] / per_question.max())  # nothing exits: Y = (0 - delta N) / M + delta
        reps = 100
        reached = np.flatnonzero(_betting_log_wealth(np.tile(y, reps)[None, :], delta)[0] >= math.log(1 / alpha))
        return f"about {int(reached[0]) + 1}" if len(reached) else f"more than {reps * len(y)}"

    def _question_threshold(self, c: Fraction) -> tuple[float, str | None]:
        n = self.n_questions
        allowed = math.floor((n + 1) * (1 - c)) - 1  # harmed calibration questions the bound tolerates
        if allowed < 0:
            needed = _needed_events(c)
            return math.inf, (
                f"confidence {float(c)} (delta = {float(1 - c):.4g}) cannot be certified per question: the calibration "
                f"set has {n} questions and conformal risk control needs at least {needed} "
                f"(delta >= 1/(n_questions + 1)). Never exiting (tau = inf); calibrate on more problems or lower the "
                "confidence."
            )
        envelope = self._stat("envelope_desc")
        if len(envelope) <= allowed:
            return 0.0, None
        return math.nextafter(float(envelope[allowed]), math.inf), None

    def _ltt_threshold(self, c: Fraction, alpha: float) -> tuple[float, str | None]:
        """Learn-then-Test with fixed-sequence testing over every float64 threshold, from ``inf`` down.

        At each threshold the null "risk > delta" is tested with the exact binomial p-value
        ``P(Binomial(n, delta) <= harmed)``; the walk stops at the first threshold it cannot reject. A fixed sequence
        needs no multiplicity correction, so the grid can be every float. The harmed count only changes at
        calibration scores, so the walk visits those.
        """
        n, delta = self.n_questions, float(1 - c)
        allowed = pac_allowance(n, delta, alpha)
        if allowed < 0:
            return math.inf, (
                f"confidence {float(c)} (delta = {delta:.4g}) cannot be certified per question at risk_level={alpha:g}: "
                f"the calibration set has {n} questions and Learn-then-Test needs at least {pac_needed(delta, alpha)} "
                "((1 - delta)^n_questions <= risk_level). Never exiting (tau = inf); calibrate on more problems, lower "
                "the confidence or raise risk_level."
            )
        values = self._stat("values_desc")
        hi, lo = self._stat("harm_hi"), self._stat("harm_lo")
        # harmed(tau) = #{lo < tau <= hi}; constant for tau in (next lower score, v], so evaluate at tau = v
        harmed = (len(hi) - np.searchsorted(hi, values, side="left")) - (len(lo) - np.searchsorted(lo, values, side="left"))
        failing = np.flatnonzero(harmed > allowed)
        if len(failing) == 0:
            return 0.0, None
        return math.nextafter(float(values[failing[0]]), math.inf), None

    def table(
        self,
        confidences: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99),
        guarantee: str = "event",
        *,
        rule: str = "envelope",
        risk_level: float | None = None,
    ) -> list[dict]:
        """One row per confidence: the threshold and what it does on the calibration set (in-sample, for display).

        Keys: ``confidence``, ``delta``, ``guarantee``, ``rule``, ``risk_level``, ``tau`` (``inf`` = never exit), ``exit_rate`` and
        ``premature_rate`` in the unit of the guarantee (event: share of events that exit / of unsafe events that
        exit; question: share of questions that exit / whose first exit is unsafe), and all four explicitly:
        ``event_exit_rate``, ``unsafe_event_exit_rate``, ``question_exit_rate``, ``question_premature_rate``.

        Example:
            >>> cal = Calibration(scores=[0.9, 0.4, 0.8, 0.3], safe=[True, False, True, False], question=[0, 0, 1, 1])
            >>> row = cal.table([0.5])[0]
            >>> row["tau"], row["premature_rate"], row["question_exit_rate"]
            (0.8, 0.0, 1.0)
        """
        check_guarantee(guarantee)
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LynxCalibrationWarning)
            for confidence in confidences:
                tau = self.threshold(confidence, guarantee, rule=rule, risk_level=risk_level)
                ex = exits(self.scores, tau)
                first = first_exit(self.scores, self.question, tau)
                exited = first >= 0
                harmed = exited & ~self.safe[first.clamp_min(0)]
                unsafe_rate = float(ex[~self.safe].double().mean()) if self.n_unsafe else 0.0
                event_rate = float(ex.double().mean())
                q_exit, q_harm = float(exited.double().mean()), float(harmed.double().mean())
                rows.append({
                    "confidence": float(confidence),
                    "delta": float(1 - _exact_confidence(confidence)),
                    "guarantee": guarantee,
                    "rule": rule,
                    "risk_level": check_risk_level(risk_level),
                    "tau": tau,
                    "exit_rate": event_rate if guarantee == "event" else q_exit,
                    "premature_rate": unsafe_rate if guarantee == "event" else q_harm,
                    "event_exit_rate": event_rate,
                    "unsafe_event_exit_rate": unsafe_rate,
                    "question_exit_rate": q_exit,
                    "question_premature_rate": q_harm,
                })
        return rows

    def to_dict(self) -> dict:
        """JSON-serialisable form (floats as Python floats, which JSON writes by ``repr``: the round trip is exact).

        Example:
            >>> import json
            >>> cal = Calibration(scores=[0.1, 0.7], safe=[False, True], question=[0, 0])
            >>> again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
            >>> again.threshold(0.5) == cal.threshold(0.5)
            True
        """
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "n_events": self.n_events,
            "scores": [float(x) for x in self.scores.tolist()],
            "safe": [bool(x) for x in self.safe.tolist()],
            "question": [int(x) for x in self.question.tolist()],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Calibration:
        """Rebuild from :meth:`to_dict` output, validating every field (``ValueError`` naming the bad field).

        Example:
            >>> Calibration.from_dict({"scores": [0.2, 0.9], "safe": [False, True], "question": [0, 1]}).n_questions
            2
        """

        def corrupted(problem: str) -> ValueError:
            return ValueError(f"calibration.json is corrupted: {problem}; re-run calibration to regenerate it.")

        if not isinstance(data, Mapping):
            raise corrupted(f"expected a JSON object, got {type(data).__name__}")
        if "format" in data and data["format"] != _FORMAT:
            raise corrupted(f"field 'format' is {data['format']!r}, expected {_FORMAT!r}")
        if "version" in data and data["version"] != _VERSION:
            raise corrupted(f"field 'version' is {data['version']!r}; this lynx-hf reads version {_VERSION}")
        for name in ("scores", "safe", "question"):
            if name not in data:
                raise corrupted(f"missing field {name!r}")
            if not isinstance(data[name], list):
                raise corrupted(f"field {name!r} must be a list, got {type(data[name]).__name__}")
        scores, safe, question = data["scores"], data["safe"], data["question"]
        for i, x in enumerate(scores):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= x <= 1.0):
                raise corrupted(f"field 'scores' entry {i} is {x!r}, expected a probability in [0, 1]")
        for i, x in enumerate(safe):
            if not isinstance(x, bool):
                raise corrupted(f"field 'safe' entry {i} is {x!r}, expected true/false")
        for i, x in enumerate(question):
            if isinstance(x, bool) or not isinstance(x, int):
                raise corrupted(f"field 'question' entry {i} is {x!r}, expected an integer question id")
        if not (len(scores) == len(safe) == len(question)):
            raise corrupted(
                f"fields 'scores', 'safe', 'question' have different lengths ({len(scores)}, {len(safe)}, "
                f"{len(question)})"
            )
        if "n_events" in data and data["n_events"] != len(scores):
            raise corrupted(f"field 'n_events' is {data['n_events']!r} but there are {len(scores)} scores")
        try:
            return cls(
                scores=torch.tensor(scores, dtype=torch.float64),
                safe=torch.tensor(safe, dtype=torch.bool),
                question=torch.tensor(question, dtype=torch.long),
            )
        except ValueError as err:
            raise corrupted(str(err)) from err


# ----- what the labels make the guarantee mean --------------------------------------------------------------------
LABELS = ("gold", "agreement")
"""How a cue's `safe` label was decided: ``"gold"`` (its forced answer matches the problem's gold answer) or
``"agreement"`` (its forced answer matches the trace's own full answer, the live audit's reference: no gold needed)."""
DEFAULT_LABELS = "gold"


def check_labels(labels: str) -> str:
    """Return `labels` if it is one of `LABELS`, else raise `LynxConfigError` naming the choices.

    Example:
        >>> check_labels("agreement")
        'agreement'
    """
    if labels not in LABELS:
        raise LynxConfigError(f"unknown labels {labels!r}; choose 'gold' (forced answer vs the gold answer) or "
                              "'agreement' (forced answer vs the trace's own full answer: needs no gold answers).")
    return labels


def guarantee_statement(labels: str = DEFAULT_LABELS, guarantee: str = DEFAULT_GUARANTEE,
                        confidence: float | None = None, risk_level: float | None = None) -> str:
    """The guarantee of a calibration in words, for the labels it was calibrated with: the one sentence the model
    card, `repr` and the audit use, so they never disagree.

    Gold labels bound how often the exit makes the final answer *wrong*; agreement labels bound how often it
    *changes* the final answer (the model's answer after its full thinking), which needs no gold answer and is what
    the live audit measures.

    Args:
        labels: ``"gold"`` or ``"agreement"`` (see `LABELS`).
        guarantee: ``"question"`` or ``"event"``.
        confidence: c; None writes the bound as ``1 - c``.
        risk_level: None (on average over calibration sets) or alpha (PAC: for this calibration set with
            probability at least 1 - alpha).

    Returns:
        One sentence, without a final full stop.

    Example:
        >>> guarantee_statement("gold", "question", 0.9)
        'the exit makes the final answer wrong in at most 1 - c = 0.1 of questions (on average over calibration sets)'
        >>> guarantee_statement("agreement")
        'the exit changes the final answer in at most 1 - c of questions (on average over calibration sets)'
    """
    check_labels(labels)
    check_guarantee(guarantee)
    bound = "1 - c" if confidence is None else f"1 - c = {1 - float(confidence):.3g}"
    effect = "makes the final answer wrong" if labels == "gold" else "changes the final answer"
    if guarantee == "question":
        claim = f"the exit {effect} in at most {bound} of questions"
    else:
        where = "would make the final answer wrong" if labels == "gold" else "would change the final answer"
        claim = f"at most {bound} of the cues where an exit {where} trigger an exit"
    strength = ("on average over calibration sets" if risk_level is None else
                f"for this calibration set with probability at least 1 - α = {1 - float(risk_level):.3g}")
    return f"{claim} ({strength})"
