"""The `lynx_exit` evaluate metric shipped in the package: loadable offline, and the numbers the harness reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lynx_hf.metrics
from lynx_hf.evaluation.cue_rules import Full, LynxExit, Oracle
from lynx_hf.runtime.conformal import LynxCalibrationWarning
from lynx_hf.evaluation.evaluate import evaluate, exit_metric, metrics
from test_baselines import synthetic_replay

ROOT = Path(__file__).resolve().parent.parent


def test_evaluate_load_of_the_shipped_path_works_offline(tmp_path):
    code = (
        "import evaluate, json, lynx_hf.metrics\n"
        "m = evaluate.load(lynx_hf.metrics.LYNX_EXIT)\n"
        "print(json.dumps(m.compute(predictions=['\\\\frac{1}{2}', '7', ''], references=['0.5', '8', '3'],"
        " exited=[True, True, False], thinking_tokens=[10, 20, 30], full_thinking_tokens=[40, 40, 30],"
        " unsafe_events=[1, 2, 0], unsafe_events_exiting=[0, 1, 0])))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == pytest.approx(1 / 3)  # 1/2 == 0.5 under math-verify; the empty answer is wrong
    assert result["savings"] == pytest.approx(1 - 20 / (110 / 3))
    assert result["exit_rate"] == pytest.approx(2 / 3)
    assert result["premature_per_question"] == pytest.approx(1 / 3) and result["premature_per_exit"] == 0.5
    assert result["premature_per_event"] == pytest.approx(1 / 3)


def _direct(outcome, full) -> dict:
    """The harness's numbers computed straight from the outcome tensors (how lynx_hf.evaluation.evaluate did it before)."""
    exited, wrong = outcome.exited, outcome.exited & ~outcome.correct
    full_think = full.thinking_tokens.double().mean().item()
    return {
        "accuracy": outcome.correct.double().mean().item(),
        "thinking_tokens": outcome.thinking_tokens.double().mean().item(),
        "savings": 1 - outcome.thinking_tokens.double().mean().item() / full_think,
        "exit_rate": exited.double().mean().item(),
        "premature_per_question": wrong.double().mean().item(),
        "premature_per_exit": wrong[exited].double().mean().item() if bool(exited.any()) else 0.0,
    }


def test_harness_rows_come_from_the_metric_and_match_the_direct_computation():
    replay = synthetic_replay()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        methods = [Full(), LynxExit(0.9, "event"), LynxExit(0.8, "question"), Oracle()]
        rows, outcomes = evaluate(replay, methods)
    for row, outcome in zip(rows, outcomes):
        direct = _direct(outcome, outcomes[0])
        for key, value in direct.items():
            assert row[key] == pytest.approx(value, abs=1e-12), (row["method"], key)
        # the checker on the answers agrees with the labels the collector made
        labels_only = metrics(outcome, outcomes[0])
        assert labels_only["accuracy"] == row["accuracy"]
    assert rows[1]["savings"] > 0 and 0 < rows[1]["accuracy"] < 1


def test_metric_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        exit_metric().compute(predictions=["1"], references=["1"], exited=[True], thinking_tokens=[1],
                              full_thinking_tokens=[2], correct=[True, False])
    assert Path(lynx_hf.metrics.LYNX_EXIT, "lynx_exit.py").is_file()
