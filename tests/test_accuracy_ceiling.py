"""benchmarks/accuracy_ceiling.py: which unsafe exits cost an answer, and what Lynx, a perfect ranker that orders
unsafe cues at random, and the ideal probe score on a hand-checked table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lynx_hf.evaluation.replay import Replay
from lynx_hf.pipeline.events import EventTable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("accuracy_ceiling", ROOT / "benchmarks" / "accuracy_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ceiling


def replay() -> Replay:
    """Trace 0 ends right, its first cue is unsafe (a harmful position); trace 1 ends right, its unsafe cue comes
    after a safe one (harmless); trace 2 ends wrong, both its cues unsafe (harmless: the answer is lost anyway)."""
    safe = torch.tensor([False, True, True, False, False, False])
    trace = torch.tensor([0, 0, 1, 1, 2, 2])
    position = torch.tensor([12, 20, 12, 20, 12, 20])
    traces = [{"id": f"q{i}", "gold": "4", "answer": "4" if right else "5", "correct": right, "prompt_length": 10,
               "think_length": 30, "length": 40, "token_ids": []} for i, right in enumerate([True, True, False])]
    table = EventTable(settings={}, features=torch.zeros(6, 1), safe=safe, trace=trace, position=position,
                       start=position, cue=torch.zeros(6, dtype=torch.long), answer_length=torch.full((6,), 2),
                       answer_confidence=torch.full((6,), 0.9), answers=["5", "4", "4", "4", "5", "5"], traces=traces)
    return Replay(table, scores=torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1, 0.3]), exit_length=3)


def test_unsafe_exits_are_split_by_whether_they_cost_an_answer_and_each_probe_is_scored(ceiling):
    r = ceiling(replay(), tau=0.5, draws=2000)
    assert (r["unsafe"], r["k"], r["harmful_cues"], r["harmless_cues"]) == (4, 1, 1, 3)
    assert (r["lynx_harmful"], r["lynx_harmless"]) == (1, 0)  # Lynx's one unsafe exit is trace 0's first cue
    assert r["full"] == pytest.approx(2 / 3) and r["lynx"] == pytest.approx(1 / 3)
    assert r["ideal"] == pytest.approx(2 / 3)  # its one unsafe exit goes to a harmless cue
    # at random the one unsafe exit lands on trace 0's first cue in 1 draw of 4: 1/4 * 1/3 + 3/4 * 2/3 = 7/12
    assert r["random"] == pytest.approx(7 / 12, abs=0.03)
