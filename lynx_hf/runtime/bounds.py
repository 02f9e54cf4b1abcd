"""The statistics the PAC guarantees and the live audit rest on: exact binomial (Clopper-Pearson) counts, p-values
from testing by betting, and anytime-valid confidence sequences.

`pac_allowance` and `pac_needed` (how many calibration failures still certify a rate, and how much data that takes)
and `betting_p_values` are what `Calibration` tests its PAC thresholds with (`runtime/conformal.py`);
`betting_confidence_sequence` and `ratio_confidence_sequence` bound the premature-exit rate the live audit sees,
readable after every batch (`runtime/audit.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["betting_confidence_sequence", "betting_p_values", "binomial_cdf", "pac_allowance", "pac_needed",
           "ratio_confidence_sequence"]


def _log_binomial_coefficients(n: int) -> np.ndarray:
    """``log C(n, m)`` for m = 0..n, as a running sum of ``log((n - m + 1) / m)``."""
    m = np.arange(1, n + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.log(n - m + 1) - np.log(m))])


def binomial_cdf(n: int, p: float) -> np.ndarray:
    """``P(Binomial(n, p) <= m)`` for m = 0..n (float64, exact up to rounding).

    Example:
        >>> binomial_cdf(2, 0.5).tolist()
        [0.25, 0.75, 1.0]
    """
    m = np.arange(n + 1, dtype=np.float64)
    if p <= 0.0:
        return np.ones(n + 1)
    if p >= 1.0:
        return (m >= n).astype(np.float64)
    log_pmf = _log_binomial_coefficients(n) + m * math.log(p) + (n - m) * math.log1p(-p)
    return np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)


def pac_allowance(n: int, delta: float, alpha: float, strict: bool = False) -> int:
    """Most calibration failures ``m`` (of ``n``) that still certify a rate ``<= delta`` with probability ``1 - alpha``.

    The largest ``m`` with ``P(Binomial(n, delta) <= m) <= alpha`` (``< alpha`` if `strict`), i.e. the largest count
    whose exact binomial (Clopper-Pearson) upper ``1 - alpha`` confidence bound on the rate is ``<= delta``; ``-1``
    when even ``m = 0`` does not (too little data).

    Example:
        >>> pac_allowance(100, 0.1, 0.05), pac_allowance(10, 0.1, 0.05)
        (4, -1)
    """
    cdf = binomial_cdf(n, delta)
    count = np.searchsorted(cdf, alpha, side="left" if strict else "right")
    return int(min(count, n + 1)) - 1


def pac_needed(delta: float, alpha: float) -> int:
    """Smallest ``n`` with ``(1 - delta)^n <= alpha``: the data a PAC bound needs to certify anything at all.

    Example:
        >>> pac_needed(0.1, 0.1), pac_needed(0.05, 0.05)
        (22, 59)
    """
    n = max(1, math.ceil(math.log(alpha) / math.log1p(-delta)))
    while n > 1 and pac_allowance(n - 1, delta, alpha) >= 0:
        n -= 1
    while pac_allowance(n, delta, alpha) < 0:
        n += 1
    return n


def betting_p_values(y: np.ndarray, m0: float, cap: float = 0.9) -> np.ndarray:
    """One p-value per row of ``y`` for the null "the mean of ``y`` is at least ``m0``", the row's values in [0, 1].

    Testing by betting (Waudby-Smith & Ramdas, JRSS-B 2024): the wealth ``prod_t (1 + lambda_t (m0 - y_t))`` is a
    non-negative supermartingale under the null when the columns are i.i.d. draws taken in a fixed order and
    ``lambda_t`` depends on earlier columns only, so ``p = min(1, 1 / max_t wealth_t)`` is valid (Ville's inequality).
    ``lambda_t`` is the aGRAPA bet ``(m0 - mean) / (variance + (m0 - mean)^2)`` from the earlier columns, truncated to
    ``[0, cap / (1 - m0)]`` so that one draw at 1 cannot take more than the share ``cap`` of the wealth.

    Example:
        >>> import numpy as np
        >>> p = betting_p_values(np.array([[0.0] * 30, [1.0] * 30]), m0=0.2)
        >>> bool(p[0] < 0.01), float(p[1])
        (True, 1.0)
    """
    running = _betting_log_wealth(np.atleast_2d(np.asarray(y, dtype=np.float64)), m0, cap)
    return np.minimum(1.0, np.exp(-np.maximum(running.max(axis=1, initial=0.0), 0.0)))


def _betting_log_wealth(y: np.ndarray, m0: float, cap: float = 0.9) -> np.ndarray:
    """The log-wealth of :func:`betting_p_values` after each column, per row."""
    log_wealth = np.zeros(y.shape)
    current = np.zeros(len(y))
    total, squares = np.full(len(y), 0.5), np.full(len(y), 0.25)  # prior pseudo-draw: mean 1/2, variance 1/4
    for t in range(y.shape[1]):
        gap = m0 - total / (t + 1)
        bet = np.clip(gap / (squares / (t + 1) + gap * gap), 0.0, cap / (1.0 - m0))
        current += np.log1p(bet * (m0 - y[:, t]))
        log_wealth[:, t] = current
        total += y[:, t]
        squares += (y[:, t] - total / (t + 2)) ** 2
    return log_wealth


def betting_confidence_sequence(x, alpha: float = 0.05, *, grid: int = 1000, include: Sequence[float] = (),
                                batches=None) -> tuple[np.ndarray, np.ndarray]:
    """Running lower and upper bounds after each observation (or each batch), an anytime-valid ``1 - alpha``
    confidence sequence for the mean of i.i.d. observations ``x`` in [0, 1].

    Anytime-valid: with probability at least ``1 - alpha`` the mean lies between the bounds at *every* time at once,
    so they can be read after every batch (a fixed-n Clopper-Pearson interval read after every batch excludes the
    true mean far more often than ``alpha``). The construction is Waudby-Smith & Ramdas's hedged capital process
    (JRSS-B 2024, Theorem 3, their recommended default) with predictable plug-in bets; see
    :func:`ratio_confidence_sequence`, of which this is the case ``n = 1`` (see there for ``batches``).

    Example:
        >>> import numpy as np
        >>> lower, upper = betting_confidence_sequence(np.random.default_rng(0).uniform(size=400) < 0.3)
        >>> bool(lower[-1] < 0.3 < upper[-1]), bool(upper[-1] - lower[-1] < upper[9] - lower[9])
        (True, True)
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return ratio_confidence_sequence(x, np.ones_like(x), alpha, grid=grid, include=include, batches=batches)


def _batch_bounds(batches, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first index, last index) of each run of equal labels in `batches` (each observation alone when None)."""
    if batches is None:
        every = np.arange(size)
        return every, every
    labels = np.asarray(batches).reshape(-1)
    if labels.size != size:
        raise ValueError(f"batches must label each of the {size} observations, got {labels.size} labels.")
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    return np.concatenate([[0], change]), np.concatenate([change - 1, [size - 1]])


def ratio_confidence_sequence(x, n, alpha: float = 0.05, *, bound: float = 1.0, grid: int = 1000,
                              include: Sequence[float] = (), batches=None) -> tuple[np.ndarray, np.ndarray]:
    """Anytime-valid ``1 - alpha`` confidence sequence for the pooled rate ``E[x] / E[n]`` of i.i.d. pairs with
    ``0 <= x_t <= n_t <= bound`` (e.g. per question: the unsafe cues that exit and the unsafe cues; the cues of one
    question may depend on each other in any way).

    For a candidate rate ``r`` the draws ``y_t = (x_t - r n_t) / bound + r`` lie in [0, 1] and have mean ``r`` exactly
    when the rate is ``r`` (above it when the rate is higher). Each ``r`` of a grid (``grid + 1`` equally spaced points
    of [0, 1], plus the points in ``include``) is tested by betting on both sides: the hedged capital
    ``max(K+ / 2, K- / 2)`` with ``K+- = prod_t (1 +- lambda_t (y_t - r))``, the predictable plug-in bet
    ``lambda_t = sqrt(2 log(2 / alpha) / (s2_{t-1} t log(1 + t)))`` (``s2`` the variance of the earlier ``y`` with a
    prior pseudo-draw of variance 1/4) truncated to ``1 / (2 r)`` and ``1 / (2 (1 - r))``. It is a non-negative
    martingale under ``r``, so by Ville's inequality it ever reaches ``1 / alpha`` with probability at most
    ``alpha``; once it does, ``r`` is out of the sequence for good (the running intersection). The bounds are grid
    points: the lower one is the largest rejected point below every point still in the set (the true one lies above
    it), the upper one the smallest rejected point above them, so they are conservative by at most one grid step.

    ``batches`` (one label per observation; runs of equal labels are one batch, e.g. the rows of one ``generate``
    call) makes each batch one unit: all its observations get the same bet, computed from the earlier batches only
    (the one its first observation would get), and the sequence is read after each batch only. The capital after a
    batch is then a product over its observations, so the bounds do not depend on their order within the batch,
    and it is still a martingale at batch ends under ``r`` (the same coverage, read once per batch).
    Returns ``(lower, upper)``, one entry per observation (per batch with ``batches``).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> n = rng.integers(1, 4, size=300)
        >>> x = rng.binomial(n, 0.2)
        >>> lower, upper = ratio_confidence_sequence(x, n, bound=3)
        >>> bool(lower[-1] < 0.2 < upper[-1])
        True
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = np.asarray(n, dtype=np.float64).reshape(-1)
    if x.shape != n.shape:
        raise ValueError(f"x and n must have one entry per observation, got {x.size} and {n.size}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r}: give the miscoverage level in (0, 1), e.g. alpha=0.05.")
    if not bound > 0 or bool(((x < 0) | (x > n) | (n > bound)).any()):
        raise ValueError(f"Every observation needs 0 <= x <= n <= bound (bound={bound}): scale them into range, "
                         "or give the largest n the data can have as bound.")
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    rates = np.unique(np.concatenate([np.linspace(0.0, 1.0, grid + 1), np.clip(np.asarray(include, float), 0, 1)]))
    y = (x[None, :] - rates[:, None] * n[None, :]) / bound + rates[:, None]  # [grid, T]
    starts, ends = _batch_bounds(batches, x.size)
    # The bet of each batch, from the observations before it (sums, so their order does not matter): their variance
    # about their mean, with a prior pseudo-draw of variance 1/4.
    zero = np.zeros((len(rates), 1))
    sums = np.concatenate([zero, np.cumsum(y, axis=1)], axis=1)[:, starts]
    squares = np.concatenate([zero, np.cumsum(y * y, axis=1)], axis=1)[:, starts]
    earlier = starts.astype(np.float64)
    spread = np.maximum(squares - sums * sums / np.maximum(earlier, 1.0), 0.0)
    earlier_variance = (0.25 + spread) / (earlier + 1)
    t = earlier + 1  # the batch's first observation
    bet = np.sqrt(2 * math.log(2 / alpha) / (earlier_variance * t * np.log1p(t)))
    r = rates[:, None]
    with np.errstate(divide="ignore"):
        up = np.minimum(bet, 0.5 / r)
        down = np.minimum(bet, 0.5 / (1.0 - r))
    of_batch = np.repeat(np.arange(len(starts)), ends - starts + 1)
    gain = y - r
    log_up = np.cumsum(np.log1p(up[:, of_batch] * gain), axis=1)[:, ends]
    log_down = np.cumsum(np.log1p(-down[:, of_batch] * gain), axis=1)[:, ends]
    rejected = np.maximum.accumulate(np.maximum(log_up, log_down) - math.log(2) >= math.log(1 / alpha), axis=1)
    kept = ~rejected
    any_kept = kept.any(axis=0)
    first = np.argmax(kept, axis=0)
    last = len(rates) - 1 - np.argmax(kept[::-1], axis=0)
    lower = np.where(first > 0, rates[np.maximum(first - 1, 0)], 0.0)
    upper = np.where(last < len(rates) - 1, rates[np.minimum(last + 1, len(rates) - 1)], 1.0)
    # every rate rejected (possible only on a miscovering run): keep the last non-empty bounds
    for i in np.flatnonzero(~any_kept):
        lower[i], upper[i] = (lower[i - 1], upper[i - 1]) if i else (0.0, 1.0)
    return np.maximum.accumulate(lower), np.minimum.accumulate(upper)
