"""The guarantee on the organism's real cue events: over many random calibration/test splits of the shipped
bundle's held-out events, the realised premature-exit rate stays within binomial tolerance of delta."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from lynx_hf.runtime.conformal import Calibration, LynxCalibrationWarning, exits, first_exit

FIXTURE = Path(__file__).parent / "fixtures" / "organism_test_events.json"
SPLITS = 200

pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="run scripts/build_organism_bundle.py first")


@pytest.fixture(scope="module")
def events():
    data = json.loads(FIXTURE.read_text())
    return (torch.tensor(data["scores"], dtype=torch.float64), torch.tensor(data["safe"]),
            torch.tensor(data["question"]))


def _split(question, generator):
    n = int(question.max()) + 1
    order = torch.randperm(n, generator=generator)
    cal = torch.zeros(n, dtype=torch.bool)
    cal[order[: n // 2]] = True
    return cal[question]


def _reindex(question):
    return torch.unique_consecutive(question, return_inverse=True)[1]


@pytest.mark.parametrize("delta", [0.05, 0.1, 0.2])
def test_realised_premature_rates_stay_within_binomial_tolerance(events, delta):
    scores, safe, question = events
    generator = torch.Generator().manual_seed(0)
    per_event, per_question, exited_safe = [], [], []
    unsafe_counts, question_counts = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        for _ in range(SPLITS):
            cal = _split(question, generator)
            calibration = Calibration(scores=scores[cal], safe=safe[cal], question=_reindex(question[cal]))
            test_scores, test_safe, test_q = scores[~cal], safe[~cal], _reindex(question[~cal])
            tau = calibration.threshold(1 - delta, "event")
            ex = exits(test_scores, tau)
            per_event.append(float(ex[~test_safe].double().mean()))
            exited_safe.append(float(ex[test_safe].double().mean()))
            unsafe_counts.append(int((~test_safe).sum()))
            tau_q = calibration.threshold(1 - delta, "question")
            first = first_exit(test_scores, test_q, tau_q)
            premature = (first >= 0) & ~test_safe[first.clamp_min(0)]
            per_question.append(float(premature.double().mean()))
            question_counts.append(int(test_q.max()) + 1)
    # The mean over splits estimates the expected rate, which the guarantee bounds by delta. A single split's rate
    # has binomial s.d. sqrt(d(1-d)/n); splits of one pool are correlated, so count them as only 10 independent
    # ones and allow 3 standard errors.
    tol_event = 3 * math.sqrt(delta * (1 - delta) / min(unsafe_counts)) / math.sqrt(10)
    tol_question = 3 * math.sqrt(delta * (1 - delta) / min(question_counts)) / math.sqrt(10)
    print(f"delta={delta}: mean realised rate per event {sum(per_event) / SPLITS:.3f}, "
          f"per question {sum(per_question) / SPLITS:.3f} over {SPLITS} splits")  # shown with `pytest -s`
    assert sum(per_event) / SPLITS <= delta + tol_event
    assert sum(per_question) / SPLITS <= delta + tol_question
    if delta == 0.2:
        assert sum(exited_safe) / SPLITS > 0.05, "the guarantee must not be vacuous: safe cues should exit"


def test_delta_below_one_over_n_plus_one_never_exits(events):
    scores, safe, question = events
    calibration = Calibration(scores=scores, safe=safe, question=question)
    tiny = 0.5 / (calibration.n_unsafe + 1)
    with pytest.warns(LynxCalibrationWarning):
        assert calibration.threshold(1 - tiny, "event") == math.inf
    assert not bool(exits(scores, math.inf).any())


# --- the two per-event rules: same guarantee, the default never exits less when c is lowered -------------------------

def test_envelope_rule_is_monotone_and_keeps_the_guarantee(events):
    scores, safe, question = events
    generator = torch.Generator().manual_seed(1)
    grid = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    realised = {(rule, c): [] for rule in ("envelope", "paper") for c in grid}
    n_unsafe = []
    non_monotone_paper = 0
    for _ in range(100):
        cal = _split(question, generator)
        calibration = Calibration(scores=scores[cal], safe=safe[cal], question=_reindex(question[cal]))
        test_scores, test_safe = scores[~cal], safe[~cal]
        n_unsafe.append(int((~test_safe).sum()))
        taus = {rule: [calibration.threshold(c, rule=rule) for c in grid] for rule in ("envelope", "paper")}
        assert taus["envelope"] == sorted(taus["envelope"])  # lower c never exits less
        assert all(e <= p for e, p in zip(taus["envelope"], taus["paper"]))
        non_monotone_paper += taus["paper"] != sorted(taus["paper"])
        for rule, values in taus.items():
            for c, tau in zip(grid, values):
                realised[rule, c].append(float(exits(test_scores[~test_safe], tau).double().mean()))
    for (rule, c), rates in realised.items():
        delta = 1 - c
        tol = 3 * math.sqrt(delta * (1 - delta) / min(n_unsafe)) / math.sqrt(10)
        assert sum(rates) / len(rates) <= delta + tol, (rule, c, sum(rates) / len(rates))
    assert non_monotone_paper > 0, "the organism's paper-rule thresholds should show the non-monotonicity"


# --- PAC (risk_level=alpha): the guarantee holds for the calibration set at hand, with probability >= 1 - alpha ------

PAC_PAIRS = [(0.05, 0.1), (0.1, 0.05)]  # (delta, alpha)
PAC_DRAWS = 300


def _population(events):
    """The held-out pool as a population: per-question event slices, so calibration sets can be drawn i.i.d."""
    scores, safe, question = events
    n = int(question.max()) + 1
    starts = torch.searchsorted(question, torch.arange(n))
    sizes = torch.searchsorted(question, torch.arange(n), right=True) - starts
    return n, starts, sizes


def _draw(events, population, n_cal, generator, unit):
    """A calibration set drawn i.i.d. from the pool: `n_cal` questions (unit="question") or events (unit="event")."""
    scores, safe, question = events
    n, starts, sizes = population
    if unit == "event":
        idx = torch.randint(0, len(scores), (int(sizes[:n_cal].sum()),), generator=generator)
        return Calibration(scores=scores[idx], safe=safe[idx], question=torch.arange(len(idx)))
    pick = torch.randint(0, n, (n_cal,), generator=generator)
    idx = torch.cat([torch.arange(int(starts[i]), int(starts[i] + sizes[i])) for i in pick.tolist()])
    return Calibration(scores=scores[idx], safe=safe[idx],
                       question=torch.repeat_interleave(torch.arange(n_cal), sizes[pick]))


def _population_rates(events, calibration, delta, alpha, guarantee):
    scores, safe, question = events
    tau = calibration.threshold(1 - delta, guarantee, risk_level=alpha)
    if guarantee == "event":
        return float(exits(scores[~safe], tau).double().mean())
    first = first_exit(scores, question, tau)
    return float(((first >= 0) & ~safe[first.clamp_min(0)]).double().mean())


def _exceedance(events, guarantee, unit, seed):
    """Share of calibration draws (250 questions each) whose rate on the whole pool exceeds delta, per (delta, alpha),
    for PAC and for the marginal threshold."""
    population = _population(events)
    generator = torch.Generator().manual_seed(seed)
    shares = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        draws = [_draw(events, population, 250, generator, unit) for _ in range(PAC_DRAWS)]
        for delta, alpha in PAC_PAIRS:
            for level in (alpha, None):
                rates = [_population_rates(events, cal, delta, level, guarantee) for cal in draws]
                shares[delta, level] = sum(r > delta for r in rates) / PAC_DRAWS
    return shares


def _binomial_tolerance(alpha):
    return 2.33 * math.sqrt(alpha * (1 - alpha) / PAC_DRAWS)  # one-sided 99%


def test_pac_per_question_holds_for_the_calibration_set_at_hand(events):
    # The pool of held-out questions is the population: a calibration set is 250 questions drawn i.i.d. from it, and
    # the realised rate is computed exactly on the whole pool (no test-sample noise).
    shares = _exceedance(events, "question", "question", seed=2)
    print("per question, share of calibration draws above delta:", shares)
    for delta, alpha in PAC_PAIRS:
        assert shares[delta, alpha] <= alpha + _binomial_tolerance(alpha), (delta, alpha, shares)
        assert shares[delta, None] > alpha + _binomial_tolerance(alpha), "marginal thresholds should exceed delta often"


def test_pac_per_event_holds_when_unsafe_events_are_independent(events):
    # Events drawn i.i.d. from the pool: one unsafe cue per "question", so the exact binomial bound applies.
    shares = _exceedance(events, "event", "event", seed=3)
    print("per event (i.i.d. events), share of calibration draws above delta:", shares)
    for delta, alpha in PAC_PAIRS:
        assert shares[delta, alpha] <= alpha + _binomial_tolerance(alpha), (delta, alpha, shares)


def test_pac_per_event_holds_when_calibration_is_drawn_by_question(events):
    # Calibration sets drawn by question, as in practice: a trace's unsafe cues are correlated. Treating them as
    # independent binomial draws was optimistic here (0.11-0.15 of the draws above delta=0.05 at alpha=0.1); the bound
    # on question-level sums keeps the promise.
    for seed in (4, 5):
        shares = _exceedance(events, "event", "question", seed=seed)
        print(f"per event (questions drawn, seed {seed}), share of calibration draws above delta:", shares)
        for delta, alpha in PAC_PAIRS:
            assert shares[delta, alpha] <= alpha + _binomial_tolerance(alpha), (delta, alpha, shares)


def test_pac_thresholds_are_at_least_as_conservative_as_marginal(events):
    scores, safe, question = events
    calibration = Calibration(scores=scores, safe=safe, question=question)
    for guarantee in ("event", "question"):
        for c in (0.8, 0.9, 0.95):
            taus = [calibration.threshold(c, guarantee, risk_level=a) for a in (None, 0.1, 0.05, 0.01)]
            assert taus == sorted(taus), (guarantee, c, taus)


def test_split_rates_show_the_distribution_over_splits_and_the_plot_draws_it(events, tmp_path):
    from lynx_hf.evaluation.plots import calibration_plot
    from lynx_hf.evaluation.splits import split_rates

    scores, safe, question = events
    deltas = (0.05, 0.1, 0.2)
    rows = split_rates(scores, safe, question, deltas=deltas, n_splits=100, seed=5)
    by = {(r["guarantee"], r["risk_level"], r["rule"], r["delta"]): r for r in rows}
    for d in deltas:
        marginal, pac = by["question", None, "envelope", d], by["question", 0.1, "envelope", d]
        assert marginal["p05"] <= marginal["mean"] <= marginal["p95"] and marginal["n_splits"] == 100
        assert pac["mean"] < marginal["mean"] and pac["exceed_share"] < marginal["exceed_share"]
        # the envelope never exits less than the paper's rule
        assert by["event", None, "envelope", d]["mean"] >= by["event", None, "paper", d]["mean"]
    path = calibration_plot(rows, tmp_path / "calibration.png", "organism")
    assert path.stat().st_size > 10_000
