"""How a guarantee behaves over calibration draws: realised premature-exit rates over random calibration/test splits.

One calibration set gives one threshold and one realised rate; the guarantee is a statement about the distribution
of that rate over calibration draws (marginal: its mean is at most delta; PAC: it exceeds delta with probability at
most alpha). :func:`split_rates` splits a table of held-out cue events by question many times, calibrates on one
part and measures on the other, and summarises the realised rates per (guarantee, strength, rule, delta): mean, 5th
and 95th percentiles and the share of splits above delta. :func:`lynx_hf.evaluation.plots.calibration_plot` draws them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..runtime.conformal import Calibration, LynxCalibrationWarning, exits, first_exit

__all__ = ["split_rates", "DEFAULT_DELTAS", "DEFAULT_VARIANTS"]

DEFAULT_DELTAS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3)
# (guarantee, risk_level, rule): what the calibration plot compares
DEFAULT_VARIANTS = (
    ("event", None, "envelope"), ("event", None, "paper"), ("event", 0.1, "envelope"),
    ("question", None, "envelope"), ("question", 0.1, "envelope"),
)


def _reindex(question: torch.Tensor) -> torch.Tensor:
    return torch.unique_consecutive(question, return_inverse=True)[1]


def split_rates(scores, safe, question, *, deltas: Sequence[float] = DEFAULT_DELTAS,
                variants: Sequence[tuple] = DEFAULT_VARIANTS, n_splits: int = 200, calibration_share: float = 0.5,
                seed: int = 0) -> list[dict]:
    """Realised premature-exit rates over `n_splits` random splits of held-out events by question.

    `scores`, `safe`, `question` describe cue events (a question's events contiguous, in trace order). Each split
    puts `calibration_share` of the questions into a calibration set and measures on the rest: per event, the share
    of unsafe test cues that exit; per question, the share of test questions whose first exit is unsafe. One row per
    (guarantee, risk_level, rule, delta) with `mean`, `p05`, `p95`, `exceed_share` (splits whose rate is above delta),
    `n_splits` and the mean `exit_rate` (test questions that exit).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.arange(400).repeat_interleave(2)
        >>> p = torch.rand(800, generator=g, dtype=torch.float64)
        >>> safe = torch.rand(800, generator=g, dtype=torch.float64) < p
        >>> rows = split_rates(p, safe, q, deltas=[0.1], variants=[("event", None, "envelope")], n_splits=20)
        >>> rows[0]["delta"], rows[0]["mean"] <= 0.15
        (0.1, True)
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    safe = torch.as_tensor(safe, dtype=torch.bool).reshape(-1)
    question = _reindex(torch.as_tensor(question).reshape(-1))
    n = int(question.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    rates = {(g, a, r, d): [] for g, a, r in variants for d in deltas}
    exit_rates = {key: [] for key in rates}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        for _ in range(n_splits):
            is_cal = torch.zeros(n, dtype=torch.bool)
            is_cal[torch.randperm(n, generator=generator)[: int(round(n * calibration_share))]] = True
            cal = is_cal[question]
            calibration = Calibration(scores=scores[cal], safe=safe[cal], question=_reindex(question[cal]))
            t_scores, t_safe, t_question = scores[~cal], safe[~cal], _reindex(question[~cal])
            for guarantee, risk_level, rule in variants:
                for delta in deltas:
                    tau = calibration.threshold(1 - delta, guarantee, rule=rule, risk_level=risk_level)
                    first = first_exit(t_scores, t_question, tau)
                    exited = first >= 0
                    if guarantee == "event":
                        rate = float(exits(t_scores[~t_safe], tau).double().mean()) if bool((~t_safe).any()) else 0.0
                    else:
                        rate = float((exited & ~t_safe[first.clamp_min(0)]).double().mean())
                    rates[guarantee, risk_level, rule, delta].append(rate)
                    exit_rates[guarantee, risk_level, rule, delta].append(float(exited.double().mean()))
    rows = []
    for (guarantee, risk_level, rule, delta), values in rates.items():
        values = np.asarray(values)
        rows.append({
            "guarantee": guarantee, "risk_level": risk_level, "rule": rule, "delta": float(delta),
            "mean": float(values.mean()), "p05": float(np.quantile(values, 0.05)),
            "p95": float(np.quantile(values, 0.95)), "exceed_share": float((values > delta).mean()),
            "exit_rate": float(np.mean(exit_rates[guarantee, risk_level, rule, delta])), "n_splits": n_splits,
        })
    return rows


def replay_split_rates(replay, n_splits: int = 100, seed: int = 0, min_questions: int = 20) -> list[dict]:
    """:func:`split_rates` on an evaluation replay's events (its probe scores and labels); ``[]`` when fewer than
    `min_questions` questions have cue events (too few to split). What `lynx-hf eval` and the demo plot.

    Example:
        >>> rows = replay_split_rates(replay)  # doctest: +SKIP
    """
    table = replay.table
    if len(table) == 0 or int(torch.unique(table.trace).numel()) < min_questions:
        return []
    return split_rates(replay.scores.double(), table.safe, table.trace, n_splits=n_splits, seed=seed)
