"""Exit methods on synthetic event tables: token accounting, who exits where, and how to add a baseline."""

from __future__ import annotations

import torch

from lynx_hf.baselines import (
    BudgetForcing, CueSuppressor, DeerStyle, FirstCue, Full, LynxExit, Method, Oracle, Replay, cue_token_ids,
    matched_budget, shard_batches,
)
from lynx_hf.conformal import Calibration
from lynx_hf.cues import _example_tokenizer
from lynx_hf.evaluate import evaluate
from lynx_hf.events import EventTable

EXIT_LENGTH = 5


def synthetic_table(n_traces: int = 200, seed: int = 0, events_per_trace: int = 4, settings: dict | None = None):
    """Traces of 300 thinking tokens with cues every ~50 tokens; the answer becomes known at a random cue (safe from
    there on, with rare slips), the full trace is right unless it 'talks itself out of' the answer; probe scores
    grow noisily with safety. Returns (table, scores)."""
    g = torch.Generator().manual_seed(seed)
    rows = {k: [] for k in ("safe", "trace", "position", "start", "answer_length", "answer_confidence", "score")}
    traces, answers = [], []
    for t in range(n_traces):
        k = int(torch.randint(0, events_per_trace + 1, (1,), generator=g))
        known = int(torch.randint(0, events_per_trace + 1, (1,), generator=g))
        prompt = 20 + int(torch.randint(0, 10, (1,), generator=g))
        for i in range(k):
            start = prompt + 50 * (i + 1) + int(torch.randint(0, 10, (1,), generator=g))
            safe = i >= known and bool(torch.rand(1, generator=g) > 0.05)
            rows["safe"].append(safe)
            rows["trace"].append(t)
            rows["start"].append(start)
            rows["position"].append(start + 1)
            rows["answer_length"].append(2 + i % 2)
            rows["answer_confidence"].append(float(0.6 + 0.35 * safe + 0.05 * torch.rand(1, generator=g)))
            rows["score"].append(float((0.35 + 0.4 * safe + 0.25 * torch.randn(1, generator=g)).clamp(0, 1)))
            answers.append("7" if safe else "3")
        correct = bool(torch.rand(1, generator=g) > 0.15)
        traces.append({"id": f"q{seed}-{t}", "gold": "7", "answer": "7" if correct else "3", "correct": correct,
                       "prompt_length": prompt, "think_length": 300, "length": 310, "token_ids": []})
    table = EventTable(
        settings=settings or {"cues": ["wait"]}, features=torch.zeros(len(rows["safe"]), 2),
        safe=torch.tensor(rows["safe"], dtype=torch.bool), trace=torch.tensor(rows["trace"], dtype=torch.long),
        position=torch.tensor(rows["position"], dtype=torch.long), start=torch.tensor(rows["start"], dtype=torch.long),
        cue=torch.zeros(len(rows["safe"]), dtype=torch.long),
        answer_length=torch.tensor(rows["answer_length"], dtype=torch.long),
        answer_confidence=torch.tensor(rows["answer_confidence"]), answers=answers, traces=traces,
    )
    return table, torch.tensor(rows["score"], dtype=torch.float32)


def synthetic_replay(n_traces: int = 200, seed: int = 0) -> Replay:
    table, scores = synthetic_table(n_traces, seed)
    cal_table, cal_scores = synthetic_table(400, seed + 1000)
    calibration = Calibration(scores=cal_scores.double(), safe=cal_table.safe, question=cal_table.trace)
    return Replay(table, scores, EXIT_LENGTH, calibration)


def tiny_table() -> Replay:
    """Two traces: q0 has cues at tokens 30 (unsafe) and 60 (safe); q1 has none."""
    table = EventTable(
        settings={}, features=torch.zeros(2, 1), safe=torch.tensor([False, True]), trace=torch.tensor([0, 0]),
        position=torch.tensor([31, 61]), start=torch.tensor([30, 60]), cue=torch.tensor([0, 0]),
        answer_length=torch.tensor([2, 3]), answer_confidence=torch.tensor([0.5, 0.97]), answers=["3", "7"],
        traces=[
            {"id": "q0", "gold": "7", "answer": "7", "correct": True, "prompt_length": 10, "think_length": 100,
             "length": 110, "token_ids": []},
            {"id": "q1", "gold": "2", "answer": "5", "correct": False, "prompt_length": 12, "think_length": 40,
             "length": 45, "token_ids": []},
        ],
    )
    return Replay(table, torch.tensor([0.2, 0.9]), EXIT_LENGTH)


def test_exit_costs_thinking_up_to_the_cue_word_plus_exit_text_and_answer():
    replay = tiny_table()
    first = FirstCue().run(replay)
    assert first.exited.tolist() == [True, False]
    assert first.thinking_tokens.tolist() == [30 - 10, 40]  # cut before the cue word; q1 thinks to its end
    assert first.total_tokens.tolist() == [20 + EXIT_LENGTH + 2, 45]
    assert first.correct.tolist() == [False, False]
    full = Full().run(replay)
    assert full.thinking_tokens.tolist() == [100, 40] and full.total_tokens.tolist() == [110, 45]
    assert full.correct.tolist() == [True, False] and not full.exited.any()


def test_oracle_exits_at_the_first_safe_cue():
    oracle = Oracle().run(tiny_table())
    assert oracle.event.tolist() == [1, -1] and oracle.correct.tolist() == [True, False]
    assert oracle.thinking_tokens.tolist() == [50, 40]


def test_deer_total_tokens_include_the_trial_decodes_before_the_exit():
    replay = tiny_table()
    deer = DeerStyle(0.95).run(replay)
    assert deer.event.tolist() == [1, -1]
    # one trial at the unsafe cue (exit text + 2 answer tokens); the trial at the exit cue is the answer itself
    assert deer.extra_tokens.tolist() == [EXIT_LENGTH + 2, 0]
    assert deer.total_tokens.tolist() == [50 + EXIT_LENGTH + 3 + EXIT_LENGTH + 2, 45]
    never = DeerStyle(0.999).run(replay)
    assert never.extra_tokens.tolist() == [2 * EXIT_LENGTH + 5, 0]  # paid for a trial at every cue, never exited
    assert never.total_tokens.tolist() == [110 + 2 * EXIT_LENGTH + 5, 45]


def test_lynx_exits_at_the_first_event_over_the_threshold():
    replay = tiny_table()
    replay.calibration = Calibration(scores=[0.1, 0.3, 0.5, 0.5, 0.6, 0.9], safe=[False] * 3 + [True] * 3,
                                     question=[0, 1, 2, 3, 4, 5])
    out = LynxExit(0.5, "event").run(replay)
    assert 0.2 < out.info["tau"] <= 0.9
    assert out.event.tolist() == [1, -1] and out.correct.tolist() == [True, False]


def test_oracle_thinks_no_longer_than_any_cue_exit_that_is_not_premature():
    replay = synthetic_replay()
    outcomes = evaluate(replay, [Full(), LynxExit(0.8), LynxExit(0.9, "question"), Oracle(), FirstCue()])[1]
    by = {o.method: o for o in outcomes}
    oracle = by["Oracle"]
    for name in ("Lynx c=0.8 (event)", "Lynx c=0.9 (question)"):
        lynx = by[name]
        assert lynx.exited.any() and (lynx.thinking_tokens < by["Full"].thinking_tokens).any()
        not_premature = ~lynx.exited | lynx.correct
        # the oracle exits at the first safe cue: every safe exit of lynx's is at that cue or later
        assert (oracle.thinking_tokens[not_premature] <= lynx.thinking_tokens[not_premature]).all()
        # so the oracle's savings bound lynx's savings from exits that do not harm
        safe_savings = (by["Full"].thinking_tokens - lynx.thinking_tokens)[not_premature].sum()
        assert (by["Full"].thinking_tokens - oracle.thinking_tokens).sum() >= safe_savings
    assert (by["FirstCue"].thinking_tokens <= oracle.thinking_tokens).all()
    assert not (oracle.exited & ~oracle.correct).any()


def test_a_new_baseline_is_one_small_class_and_appears_in_the_table():
    class LastCue(Method):
        name = "LastCue"

        def run(self, replay):
            return replay.outcome(self.name, replay.first_event(torch.ones(len(replay.table), dtype=torch.bool),
                                                                last=True))

    replay = tiny_table()
    rows, outcomes = evaluate(replay, [LastCue()])
    assert [r["method"] for r in rows] == ["Full", "LastCue"]  # Full is added as the reference
    assert outcomes[1].event.tolist() == [1, -1] and rows[1]["accuracy"] == 0.5


def test_matched_budget_reaches_the_target_mean_with_the_smallest_budget():
    lengths = torch.tensor([10, 100, 200])
    b = matched_budget(lengths, 60.0)
    assert lengths.clamp_max(b).double().mean() >= 60.0 > lengths.clamp_max(b - 1).double().mean()


def test_shard_batches_reproduce_the_collection_seeds():
    table, _ = synthetic_table(5, settings={"seed": 2, "batch_size": 2})
    assert list(shard_batches(table)) == [([0, 1], 2_000_006), ([2, 3], 2_000_007), ([4], 2_000_008)]
    assert list(shard_batches(table, 3)) == [([0, 1], 2_000_006), ([2, 3], 2_000_007)]  # whole batches


def test_cue_suppressor_bans_cue_words_with_punctuation_but_not_other_words():
    tok = _example_tokenizer()
    ids = cue_token_ids(tok, ["hmm", "wait"])
    assert sorted(tok.convert_ids_to_tokens(ids)) == ["Hmm", "Ġwait"]  # not "Ġawait", "Ġwa", "ing"
    scores = CueSuppressor(ids)(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, len(tok)))
    assert torch.isinf(scores[:, ids]).all() and torch.isfinite(scores).sum() == 2 * (len(tok) - 2)


def test_budget_forcing_cuts_thinking_at_the_budget_and_answers(monkeypatch):
    import lynx_hf.baselines as baselines
    from lynx_hf.exit import ExitAnswer

    calls = []

    def fake_answer(model, tok, ids, cuts, exit_ids, attention_mask=None, max_new_tokens=16):
        calls.append((ids.shape, list(cuts), attention_mask.sum(-1).tolist()))
        return [ExitAnswer(token_ids=[1, 2], text="7}", answer="7") for _ in cuts]

    monkeypatch.setattr(baselines, "answer_after_exit", fake_answer)
    replay = tiny_table()
    for t in replay.table.traces:
        t["token_ids"] = list(range(t["prompt_length"] + t["length"]))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    class Tok:
        pad_token_id = 0

    out = BudgetForcing(50, Model(), Tok(), [9] * EXIT_LENGTH).run(replay)
    assert out.exited.tolist() == [True, False]  # q1 thought only 40 tokens
    assert out.thinking_tokens.tolist() == [50, 40]
    assert out.total_tokens.tolist() == [50 + EXIT_LENGTH + 2, 45]
    assert out.correct.tolist() == [True, False]
    assert calls == [(torch.Size([1, 60]), [60], [60])]  # prompt (10) + 50 thinking tokens
