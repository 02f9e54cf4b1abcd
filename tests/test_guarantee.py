"""The guarantee on the organism's real cue events: over many random calibration/test splits of the shipped
bundle's held-out events, the realised premature-exit rate stays within binomial tolerance of delta."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from lynx_hf.conformal import Calibration, LynxCalibrationWarning, exits, first_exit

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
