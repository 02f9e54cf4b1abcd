"""Specification of lynx_hf.runtime.conformal: exact finite-sample thresholds and a statistically tested guarantee."""

from __future__ import annotations

import json
import math
import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from lynx_hf.runtime.conformal import Calibration, LynxCalibrationWarning, exits, first_exit

INF = math.inf


def one_event_per_question(safe_scores, unsafe_scores) -> Calibration:
    scores = list(safe_scores) + list(unsafe_scores)
    safe = [True] * len(safe_scores) + [False] * len(unsafe_scores)
    return Calibration(scores=scores, safe=safe, question=list(range(len(scores))))


def reference_quantile(values, confidence: float) -> float:
    """Textbook split-conformal quantile, written independently of the library."""
    values = sorted(values)
    rank = math.ceil((len(values) + 1) * Fraction(str(confidence)))
    return INF if rank > len(values) else values[rank - 1]


# --- per-event rule: exact finite-sample correction ------------------------------------------------------------------

def test_event_threshold_uses_n_plus_one_correction_on_hand_example():
    # Dyadic scores, so 1 - p is exact and every quantile can be read off by hand.
    cal = one_event_per_question([0.875, 0.75, 0.625, 0.5], [0.125, 0.25, 0.375, 0.5, 0.5625])
    # c = 0.8: unsafe rank ceil(6 * 0.8) = 5 of 5 -> q_neg = 0.5625; safe rank ceil(5 * 0.8) = 4 of 4 -> q_pos = 0.5
    # (1 - p <= 0.5 <=> p >= 0.5). Exit iff p >= 0.5 and p > 0.5625. Without the (n+1) correction the unsafe rank
    # would be ceil(5 * 0.8) = 4 -> q_neg = 0.5 and the threshold would drop to just above 0.5.
    assert cal.event_quantiles(0.8) == (0.5, 0.5625)
    assert cal.threshold(0.8) == math.nextafter(0.5625, INF)
    # c = 0.6: unsafe rank ceil(6 * 0.6) = 4 -> q_neg = 0.5; safe rank ceil(5 * 0.6) = 3 -> q_pos = 0.375, i.e. p >= 0.625.
    assert cal.event_quantiles(0.6) == (0.375, 0.5)
    assert cal.threshold(0.6, rule="paper") == 0.625
    # At c' = 0.65 the paper's rule gives exit iff p > 0.5 (safe rank ceil(5 * 0.65) = 4 -> p >= 0.5, unsafe rank
    # still 4): a *higher* confidence exits *more*. The default envelope takes that lower threshold at c = 0.6 too.
    assert cal.threshold(0.65, rule="paper") == math.nextafter(0.5, INF)
    assert cal.threshold(0.6) == math.nextafter(0.5, INF)
    assert cal.threshold(0.8) == cal.threshold(0.8, rule="paper")  # the unsafe side binds: both rules agree
    # The score 0.5625 of an unsafe calibration event is exactly at q_neg: it must not exit at c = 0.8.
    assert not exits(torch.tensor([0.5625], dtype=torch.float64), cal.threshold(0.8)).item()


def test_confidence_is_read_as_its_decimal_value():
    # 20 * 0.55 == 11.000000000000002 in float arithmetic, which would round the rank up to 12; the exact rank is 11.
    unsafe = [i / 32 for i in range(1, 20)]
    cal = one_event_per_question([1.0], unsafe)
    assert cal.event_quantiles(0.55)[1] == sorted(unsafe)[10]


def test_event_threshold_is_inf_and_warns_when_too_few_unsafe_events():
    cal = one_event_per_question([0.875, 0.75, 0.625, 0.5], [0.125, 0.25, 0.375, 0.5, 0.5625])
    # c = 0.9 needs ceil((n + 1) * 0.9) <= n, i.e. n >= 9 unsafe events; there are 5.
    with pytest.warns(LynxCalibrationWarning, match=r"5 unsafe events .* at least 9"):
        assert cal.threshold(0.9) == INF
    assert cal.threshold(0.5) < INF  # lower confidences are still certified
    nine = one_event_per_question([0.9], [i / 16 for i in range(1, 10)])
    eight = one_event_per_question([0.9], [i / 16 for i in range(1, 9)])
    assert nine.threshold(0.9) < INF
    with pytest.warns(LynxCalibrationWarning):
        assert eight.threshold(0.9) == INF


def test_event_rule_equals_prediction_set_exactly_safe():
    rng = np.random.default_rng(7)
    scores = np.concatenate([rng.uniform(size=300), rng.uniform(size=20) ** 8, 1 - rng.uniform(size=20) ** 8])
    scores = np.concatenate([scores, scores.astype(np.float32).astype(np.float64)])
    safe = rng.uniform(size=scores.size) < scores  # overlapping classes
    cal = Calibration(scores=torch.from_numpy(scores), safe=torch.from_numpy(safe), question=torch.arange(scores.size))
    probe_points = [scores, np.nextafter(scores, 2.0), np.nextafter(scores, -1.0), 1.0 - scores,
                    rng.uniform(size=2000), np.array([0.0, 1.0, 5e-324, 1e-17, 1 - 1e-16])]
    sweep64 = np.clip(np.concatenate(probe_points), 0.0, 1.0)
    sweep32 = sweep64.astype(np.float32)
    for c in (0.5, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99):
        q_pos = reference_quantile((1.0 - scores[safe]).tolist(), c)
        q_neg = reference_quantile(scores[~safe].tolist(), c)
        assert cal.event_quantiles(c) == (q_pos, q_neg)
        tau = cal.threshold(c, rule="paper")
        for sweep in (sweep64, sweep32):
            p = sweep.astype(np.float64)
            in_set_exactly_safe = (1.0 - p <= q_pos) & (p > q_neg)
            got = exits(torch.from_numpy(sweep), tau).numpy()
            assert (got == in_set_exactly_safe).all(), (c, sweep.dtype)
        assert in_set_exactly_safe.any()  # the sweep exercises both outcomes


def test_exits_on_float32_and_bfloat16_matches_float64_comparison():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(5000, generator=g, dtype=torch.float64)
    for tau in (0.5, 0.7, 0.1 + 1e-12, math.nextafter(0.3, INF), float(np.float32(0.9)), 0.0, 1.0, INF):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            s = torch.cat([base.to(dtype), torch.tensor([tau if tau < INF else 1.0]).to(dtype)])
            assert torch.equal(exits(s, tau), s.double() >= tau), (tau, dtype)


# --- per-question rule: conformal risk control on the first exit -----------------------------------------------------

HAND_QUESTIONS = [  # (score, safe) in trace order
    [(0.3, False), (0.6, True)],  # harmed iff 0.3 is its first exit: tau <= 0.3
    [(0.8, False)],  # harmed for tau <= 0.8
    [(0.9, True), (0.95, False)],  # harmed for 0.9 < tau <= 0.95 (first exit skips 0.9, lands on unsafe 0.95)
    [(0.2, True)],  # never harmed
    [(0.7, False), (0.5, False)],  # harmed for tau <= 0.7; 0.5 is never a first exit on its own
]


def calibration_from_questions(questions) -> Calibration:
    scores = [p for q in questions for p, _ in q]
    safe = [s for q in questions for _, s in q]
    question = [i for i, q in enumerate(questions) for _ in q]
    return Calibration(scores=scores, safe=safe, question=question)


def test_question_threshold_on_hand_example():
    cal = calibration_from_questions(HAND_QUESTIONS)
    # Envelope thresholds T_i (harmed for some tau' >= tau iff tau <= T_i): 0.3, 0.8, 0.95, -inf, 0.7; n = 5.
    # Allowed harmed calibration questions: floor((n + 1) * delta) - 1.
    assert cal.threshold(0.5, "question") == math.nextafter(0.7, INF)  # 6 * 0.5 = 3 -> 2 allowed: tau > 0.7
    assert cal.threshold(0.66, "question") == math.nextafter(0.8, INF)  # 6 * 0.34 = 2.04 -> 1 allowed
    assert cal.threshold(0.8, "question") == math.nextafter(0.95, INF)  # 6 * 0.2 = 1.2 -> 0 allowed
    with pytest.warns(LynxCalibrationWarning, match=r"5 questions .* at least 9"):
        assert cal.threshold(0.9, "question") == INF  # 6 * 0.1 < 1: not even tau = inf passes the bound
    assert cal.threshold(0.1, "question") == 0.0  # 6 * 0.9 = 5.4 -> 4 allowed, all of them: exit at the first cue


def brute_force_question_threshold(questions, confidence: float) -> float:
    """CRC over every float that can matter, by direct evaluation of the first-exit loss and its envelope."""
    scores = sorted({p for q in questions for p, _ in q})
    grid = sorted({0.0, INF, *scores, *(math.nextafter(p, INF) for p in scores)})

    def loss(q, tau):
        for p, safe in q:
            if p >= tau:
                return 0 if safe else 1
        return 0

    n = len(questions)
    delta = 1 - Fraction(str(confidence))
    for k, tau in enumerate(grid):
        envelope = sum(max(loss(q, t) for t in grid[k:]) for q in questions)
        if Fraction(n, n + 1) * Fraction(envelope, n) + Fraction(1, n + 1) <= delta:
            return tau
    return INF


def test_question_threshold_matches_brute_force_risk_control():
    rng = np.random.default_rng(3)
    for _ in range(40):
        questions = []
        for _ in range(int(rng.integers(3, 12))):
            m = int(rng.integers(1, 5))
            questions.append([(float(rng.integers(0, 12)) / 11, bool(rng.uniform() < 0.5)) for _ in range(m)])
        cal = calibration_from_questions(questions)
        for c in (0.5, 0.7, 0.8, 0.9):
            with pytest.warns(LynxCalibrationWarning) if (len(questions) + 1) * (1 - c) < 1 - 1e-12 else _nothing():
                got = cal.threshold(c, "question")
            assert got == brute_force_question_threshold(questions, c), (questions, c)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_first_exit_returns_first_event_at_or_above_tau_per_question():
    scores = torch.tensor([0.2, 0.8, 0.9, 0.1, 0.3, 0.5], dtype=torch.float64)
    question = torch.tensor([4, 4, 4, 1, 1, 7])
    assert first_exit(scores, question, 0.5).tolist() == [1, -1, 5]
    assert first_exit(scores, question, 0.85).tolist() == [2, -1, -1]
    assert first_exit(scores, question, INF).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="contiguous"):
        first_exit(scores, torch.tensor([0, 1, 0, 2, 2, 2]), 0.5)


# --- the guarantee, tested statistically -----------------------------------------------------------------------------

def synthetic_population(n_questions: int, rng: np.random.Generator):
    """Questions of 1-8 cue events; a trace becomes safe from a random cue on (or never); scores ~ Beta by label."""
    sizes = rng.integers(1, 9, size=n_questions)
    question = np.repeat(np.arange(n_questions), sizes)
    position = np.concatenate([np.arange(m) for m in sizes])
    solved_at = np.where(rng.uniform(size=n_questions) < 0.25, 99, rng.integers(0, sizes + 1))
    safe = position >= solved_at[question]
    scores = np.where(safe, rng.beta(3, 2, size=safe.size), rng.beta(2, 3, size=safe.size))
    scores = scores.astype(np.float32).astype(np.float64)  # probe scores are float32
    return torch.from_numpy(scores), torch.from_numpy(safe), torch.from_numpy(question)


def test_threshold_guarantees_premature_rate_over_random_splits():
    rng = np.random.default_rng(2024)
    n_questions, n_cal, n_splits = 1000, 40, 400  # a small calibration set makes the (n + 1) correction matter
    scores, safe, question = synthetic_population(n_questions, rng)
    deltas = (0.05, 0.1, 0.2)
    realised = {(g, d): [] for g in ("event", "question") for d in deltas}
    safe_exit_rate = []
    for _ in range(n_splits):
        is_cal_question = torch.zeros(n_questions, dtype=torch.bool)
        is_cal_question[torch.from_numpy(rng.permutation(n_questions)[:n_cal])] = True
        cal_mask = is_cal_question[question]
        cal = Calibration(scores=scores[cal_mask], safe=safe[cal_mask], question=question[cal_mask])
        t_scores, t_safe, t_question = scores[~cal_mask], safe[~cal_mask], question[~cal_mask]
        for d in deltas:
            tau = cal.threshold(1 - d, "event")
            realised["event", d].append(exits(t_scores[~t_safe], tau).double().mean().item())
            if d == 0.2:
                safe_exit_rate.append(exits(t_scores[t_safe], tau).double().mean().item())
            tau = cal.threshold(1 - d, "question")
            first = first_exit(t_scores, t_question, tau)
            harmed = (first >= 0) & ~t_safe[first.clamp_min(0)]
            realised["question", d].append(harmed.double().mean().item())
    summary = {}
    for (g, d), rates in realised.items():
        rates = np.array(rates)
        mean, sem = rates.mean(), rates.std(ddof=1) / math.sqrt(len(rates))
        summary[g, d] = (round(mean, 4), round(sem, 4))
        assert mean <= d + 3 * sem, f"{g}-level premature rate {mean:.4f} exceeds delta={d} (+3 SE = {3 * sem:.4f})"
        assert mean >= 0.5 * d, f"{g}-level guarantee is needlessly conservative at delta={d}: {mean:.4f}"
    print("realised premature rates (mean, SE over splits):", summary, "safe-event exit rate at delta=0.2:",
          round(float(np.mean(safe_exit_rate)), 4))
    # Not vacuous: at delta = 0.2 most safe cues exit.
    assert np.mean(safe_exit_rate) > 0.3, np.mean(safe_exit_rate)


def test_naive_thresholds_violate_what_the_corrected_one_guarantees():
    """With 10 unsafe calibration events and delta = 0.2 (or 0.05), the uncorrected quantile, and the reference
    code's "largest score" fallback, exit more often than delta; the (n + 1)-corrected rule does not."""
    rng = np.random.default_rng(11)
    n_draws, n_cal, n_test = 600, 10, 40
    rates = {"naive": [], "ours_0.2": [], "reference_max": [], "ours_0.05": []}
    for _ in range(n_draws):
        cal_scores = rng.uniform(size=n_cal)
        test_scores = torch.from_numpy(rng.uniform(size=n_test))
        cal = one_event_per_question([], cal_scores.tolist())
        naive_q = np.sort(cal_scores)[math.ceil(n_cal * 0.8) - 1]  # no (n + 1) correction
        rates["naive"].append((test_scores > naive_q).double().mean().item())
        rates["ours_0.2"].append(exits(test_scores, cal.threshold(0.8)).double().mean().item())
        rates["reference_max"].append((test_scores >= cal_scores.max()).double().mean().item())
        with pytest.warns(LynxCalibrationWarning):
            rates["ours_0.05"].append(exits(test_scores, cal.threshold(0.95)).double().mean().item())
    mean = {k: float(np.mean(v)) for k, v in rates.items()}
    sem = {k: float(np.std(v, ddof=1) / math.sqrt(n_draws)) for k, v in rates.items()}
    assert mean["naive"] > 0.2 + 3 * sem["naive"]  # about 3/11
    assert mean["ours_0.2"] <= 0.2 + 3 * sem["ours_0.2"]  # about 2/11
    assert mean["reference_max"] > 0.05 + 3 * sem["reference_max"]  # about 1/11
    assert mean["ours_0.05"] == 0.0  # never exits, and warned


# --- API: errors, table, serialisation -------------------------------------------------------------------------------

@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_threshold_rejects_confidence_outside_open_unit_interval(confidence):
    cal = one_event_per_question([0.9], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        cal.threshold(confidence)


def test_threshold_rejects_unknown_guarantee():
    with pytest.raises(ValueError, match="guarantee"):
        one_event_per_question([0.9], [0.1]).threshold(0.5, guarantee="trace")


def test_calibration_rejects_bad_events():
    with pytest.raises(ValueError, match="contiguous"):
        Calibration(scores=[0.1, 0.2, 0.3], safe=[True, False, True], question=[0, 1, 0])
    with pytest.raises(ValueError, match="probabilities"):
        Calibration(scores=[0.1, 1.2], safe=[True, False], question=[0, 1])
    with pytest.raises(ValueError, match="one entry per event"):
        Calibration(scores=[0.1, 0.2], safe=[True], question=[0, 1])


def test_table_lists_thresholds_and_in_sample_rates():
    rng = np.random.default_rng(5)
    scores, safe, question = synthetic_population(300, rng)
    cal = Calibration(scores=scores, safe=safe, question=question)
    assert (cal.n_events, cal.n_questions) == (len(scores), 300)
    assert cal.n_safe + cal.n_unsafe == cal.n_events
    for guarantee in ("event", "question"):
        rows = cal.table(guarantee=guarantee)
        assert [r["confidence"] for r in rows] == [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99]
        if guarantee == "question":
            taus = [r["tau"] for r in rows]
            assert taus == sorted(taus)  # more confidence, later exits
        else:
            # The unsafe-side bound tightens with confidence; tau itself need not be monotone, because at low
            # confidence the safe-class condition "1 - p <= q_pos" of the paper's rule can be the binding one.
            q_neg = [cal.event_quantiles(r["confidence"])[1] for r in rows]
            assert q_neg == sorted(q_neg) and all(r["tau"] > q for r, q in zip(rows, q_neg))
        for r in rows:
            assert r["tau"] == cal.threshold(r["confidence"], guarantee)
            assert math.isclose(r["delta"], 1 - r["confidence"])
            assert 0 <= r["question_premature_rate"] <= r["question_exit_rate"] <= 1
            assert 0 <= r["unsafe_event_exit_rate"] <= 1 and 0 <= r["event_exit_rate"] <= 1
        # In-sample, both rules keep their own premature rate below delta: at most n - ceil((n + 1) c) unsafe events
        # lie above q_neg, and (harmed + 1) / (n + 1) <= delta implies harmed / n < delta.
        assert all(r["premature_rate"] < r["delta"] for r in rows)
        json.dumps(rows)


def test_to_dict_round_trip_gives_bit_identical_thresholds():
    rng = np.random.default_rng(9)
    scores, safe, question = synthetic_population(200, rng)
    scores = scores + torch.from_numpy(rng.uniform(0, 1e-9, size=len(scores)))  # full float64 mantissas
    cal = Calibration(scores=scores.clamp(0, 1), safe=safe, question=question)
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert torch.equal(again.scores, cal.scores) and torch.equal(again.safe, cal.safe)
    assert torch.equal(again.question, cal.question)
    for guarantee in ("event", "question"):
        for c in (0.5, 0.8, 0.9, 0.95, 0.99):
            a, b = cal.threshold(c, guarantee), again.threshold(c, guarantee)
            assert a == b and math.copysign(1, a) == math.copysign(1, b) and a.hex() == b.hex()


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("scores"), "scores"),
        (lambda d: d.pop("question"), "question"),
        (lambda d: d.__setitem__("safe", "yes"), "safe"),
        (lambda d: d["scores"].__setitem__(1, 1.5), "scores"),
        (lambda d: d["scores"].__setitem__(0, "0.3"), "scores"),
        (lambda d: d["safe"].__setitem__(0, 1), "safe"),
        (lambda d: d["question"].__setitem__(0, 0.5), "question"),
        (lambda d: d["question"].append(3), "lengths"),
        (lambda d: d.__setitem__("version", 99), "version"),
        (lambda d: d.__setitem__("question", [0, 1, 0]), "contiguous"),
    ],
)
def test_from_dict_rejects_corrupted_calibration(mutate, field):
    d = Calibration(scores=[0.2, 0.7, 0.9], safe=[False, True, True], question=[0, 1, 2]).to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=rf"calibration.json is corrupted: .*{field}"):
        Calibration.from_dict(d)
    with pytest.raises(ValueError, match="calibration.json is corrupted"):
        Calibration.from_dict([1, 2, 3])


# --- PAC thresholds (risk_level=alpha) and the monotone per-event rule ----------------------------------------------

def exact_binomial_cdf(n, k, p):
    p = Fraction(str(p))
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_pac_allowance_is_the_clopper_pearson_count():
    from lynx_hf.runtime.bounds import pac_allowance, pac_needed

    for n in (1, 5, 22, 40, 97):
        for delta in (0.05, 0.1, 0.2):
            for alpha in (0.05, 0.1):
                m = pac_allowance(n, delta, alpha)
                expected = max([k for k in range(n + 1) if exact_binomial_cdf(n, k, delta) <= Fraction(str(alpha))],
                               default=-1)
                assert m == expected, (n, delta, alpha)
        assert pac_needed(0.1, 0.1) == 22 and pac_allowance(21, 0.1, 0.1) == -1 and pac_allowance(22, 0.1, 0.1) == 0


def test_pac_event_threshold_is_the_binomial_order_statistic():
    unsafe = [i / 128 for i in range(1, 101)]
    cal = one_event_per_question([0.99], unsafe)
    # 100 unsafe events, delta = 0.1, alpha = 0.05: at most 4 calibration unsafe events may lie above tau.
    assert cal.threshold(0.9, risk_level=0.05, rule="paper") == math.nextafter(sorted(unsafe)[-5], INF)
    with pytest.warns(LynxCalibrationWarning, match=r"100 unsafe events .* at least 299"):
        assert cal.threshold(0.99, risk_level=0.05) == INF


def brute_force_ltt(questions, confidence, alpha):
    """Fixed-sequence Learn-then-Test from tau = inf down, by direct evaluation and exact rational p-values."""
    scores = sorted({p for q in questions for p, _ in q}, reverse=True)
    n, delta = len(questions), float(1 - Fraction(str(confidence)))

    def harmed(tau):
        total = 0
        for q in questions:
            for p, safe in q:
                if p >= tau:
                    total += not safe
                    break
        return total

    tau = INF
    for v in scores:
        if exact_binomial_cdf(n, harmed(v), delta) > Fraction(str(alpha)):
            return tau
        tau = v
    return 0.0 if tau != INF else INF


def test_question_pac_threshold_matches_brute_force_learn_then_test():
    rng = np.random.default_rng(4)
    for _ in range(30):
        questions = []
        for _ in range(int(rng.integers(25, 60))):
            m = int(rng.integers(1, 5))
            questions.append([(float(rng.integers(0, 40)) / 39, bool(rng.uniform() < 0.6)) for _ in range(m)])
        cal = calibration_from_questions(questions)
        for c, alpha in ((0.8, 0.1), (0.9, 0.05), (0.7, 0.2)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LynxCalibrationWarning)
                got = cal.threshold(c, "question", risk_level=alpha)
            expected = brute_force_ltt(questions, c, alpha)
            # the library returns the next float above the score where the walk stops, the brute force the last
            # score that passed: the same exits at every calibration score
            every = [s for q in questions for s, _ in q]
            assert [s >= got for s in every] == [s >= expected for s in every], (c, alpha, got, expected)


def test_betting_p_values_are_valid_under_the_null_and_reject_far_below_it():
    from lynx_hf.runtime.bounds import betting_p_values

    rng = np.random.default_rng(0)
    m0, alpha, runs = 0.1, 0.1, 4000
    for null in (rng.uniform(size=(runs, 200)) < m0, rng.beta(1, 9, size=(runs, 200))):  # both have mean m0
        share = float((betting_p_values(null.astype(float), m0) <= alpha).mean())
        assert share <= alpha + 2.33 * math.sqrt(alpha * (1 - alpha) / runs), share
    below = (rng.uniform(size=(200, 200)) < m0 / 4).astype(float)
    assert float((betting_p_values(below, m0) <= alpha).mean()) > 0.9


def clustered_questions(rng, n, levels=40):
    """Traces of 1-5 cues whose scores share a trace-level offset (correlated, as in real traces), on a grid of
    `levels` values (None: continuous, every score distinct)."""
    questions = []
    for _ in range(n):
        offset = float(rng.uniform(-0.3, 0.3))
        draw = (lambda: float(rng.uniform())) if levels is None else (lambda: float(rng.integers(0, levels)) / (levels - 1))
        questions.append([(min(max(draw() + offset, 0.0), 1.0), bool(rng.uniform() < 0.5))
                          for _ in range(int(rng.integers(1, 6)))])
    return questions


def brute_force_clustered_walk(questions, delta, alpha):
    """Fixed-sequence walk from tau = inf down over the unsafe scores, each null tested on the question-level sums."""
    from lynx_hf.runtime.bounds import betting_p_values

    order = np.random.default_rng(0).permutation(len(questions))
    n_unsafe = [sum(not s for _, s in q) for q in questions]
    big = max(n_unsafe)

    def p_value(tau):
        exited = [sum(p >= tau and not s for p, s in q) for q in questions]
        y = np.array([(exited[i] - delta * n_unsafe[i]) / big + delta for i in order])
        return float(betting_p_values(y[None, :], delta)[0])

    tau = INF
    for v in sorted({p for q in questions for p, s in q if not s}, reverse=True) + [-1.0]:
        if p_value(tau) > alpha:
            return INF if tau == INF else math.nextafter(tau, INF)
        tau = v
    return 0.0


@pytest.mark.parametrize("cells", [2 ** 22, 300])  # 300: the walk holds 2-5 thresholds at a time (chunk edges)
def test_clustered_pac_event_threshold_matches_a_brute_force_walk(monkeypatch, cells):
    monkeypatch.setattr("lynx_hf.runtime.conformal._WALK_CELLS", cells)
    rng = np.random.default_rng(5)
    for questions in [clustered_questions(rng, int(rng.integers(60, 150))) for _ in range(10)]:
        cal = calibration_from_questions(questions)
        for c, alpha in ((0.8, 0.1), (0.9, 0.05)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LynxCalibrationWarning)
                got = cal.threshold(c, risk_level=alpha, rule="paper")
            unsafe_side = brute_force_clustered_walk(questions, float(1 - Fraction(str(c))), alpha)
            q_pos = cal.event_quantiles(c)[0]
            every = [p for q in questions for p, _ in q]
            # the paper's rule: "safe" in the prediction set, and the unsafe side's bound
            expected = [p >= unsafe_side and 1 - p <= q_pos for p in every]
            assert [p >= got for p in every] == expected, (c, alpha, got, unsafe_side)


def test_copying_every_trace_does_not_loosen_the_per_event_pac_bound():
    # Perfectly correlated cues: each trace's events written k times. Counting them as independent events would
    # shrink the bound as if there were k times more data; the question-level bound is unchanged.
    rng = np.random.default_rng(6)
    questions = clustered_questions(rng, 300)
    once = calibration_from_questions(questions)
    thrice = calibration_from_questions([q * 3 for q in questions])
    as_events = Calibration(scores=thrice.scores, safe=thrice.safe, question=torch.arange(thrice.n_events))
    for c, alpha in ((0.8, 0.1), (0.9, 0.1)):
        assert thrice.threshold(c, risk_level=alpha) == once.threshold(c, risk_level=alpha)
        assert as_events.threshold(c, risk_level=alpha) < thrice.threshold(c, risk_level=alpha)


def test_clustered_pac_event_threshold_warns_with_the_questions_needed():
    # 10 questions of 2 unsafe cues each cannot certify delta = 0.05 at alpha = 0.05; the warning says how many would,
    # and that many copies of them do certify it
    unit = [(0.1, False), (0.2, False), (0.9, True)]
    with pytest.warns(LynxCalibrationWarning, match=r"10 questions \(up to 2 unsafe cues each\).*about (\d+) questions") as record:
        assert calibration_from_questions([unit] * 10).threshold(0.95, risk_level=0.05) == INF
    needed = int(re.search(r"about (\d+) questions", str(record[0].message)).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LynxCalibrationWarning)
        assert calibration_from_questions([unit] * needed).threshold(0.95, risk_level=0.05) < INF


def test_envelope_threshold_is_min_of_paper_rule_over_higher_confidences():
    rng = np.random.default_rng(6)
    for _ in range(25):
        n_pos, n_neg = int(rng.integers(3, 30)), int(rng.integers(3, 30))
        cal = one_event_per_question((rng.integers(0, 64, n_pos) / 63).tolist(), (rng.integers(0, 64, n_neg) / 63).tolist())
        breaks = sorted({Fraction(k, n_pos + 1) for k in range(n_pos + 2)} | {Fraction(k, n_neg + 1) for k in range(n_neg + 2)})
        mids = [float((a + b) / 2) for a, b in zip(breaks, breaks[1:])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LynxCalibrationWarning)
            for c in (0.5, 0.6, 0.7, 0.8, 0.9):
                higher = [c] + [m for m in mids if m > c]
                expected = min(cal.threshold(x, rule="paper") for x in higher)
                assert cal.threshold(c) == expected, (c, n_pos, n_neg)
                for alpha in (0.1, 0.3):
                    env, paper = cal.threshold(c, risk_level=alpha), cal.threshold(c, risk_level=alpha, rule="paper")
                    assert env <= paper
                    dense = [c + (1 - c) * k / 400 for k in range(400)]
                    assert env <= min(cal.threshold(x, risk_level=alpha, rule="paper") for x in dense)
            taus = [cal.threshold(c) for c in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)]
            assert taus == sorted(taus)


@pytest.mark.parametrize("risk_level", [0.0, 1.0, -0.1, "0.1", True])
def test_threshold_rejects_bad_risk_level(risk_level):
    with pytest.raises(ValueError, match="risk_level"):
        one_event_per_question([0.9], [0.1]).threshold(0.5, risk_level=risk_level)


def test_threshold_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        one_event_per_question([0.9], [0.1]).threshold(0.5, rule="strict")
