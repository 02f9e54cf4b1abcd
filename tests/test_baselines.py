"""Exit methods on synthetic event tables: token accounting, who exits where, how to add a baseline, and the
text-only baselines (a rule on the decoded thinking, a probe on text features) on tables with real token ids."""

from __future__ import annotations

import pytest
import torch

from lynx_hf.evaluation.cue_rules import DeerStyle, FirstCue, Full, LynxExit, Oracle
from lynx_hf.evaluation.live_rules import (
    BudgetForcing, CueSuppressor, cue_token_ids, matched_budget, regenerate, shard_batches,
)
from lynx_hf.evaluation.replay import Method, Replay
from lynx_hf.evaluation.text_rules import (
    DEFAULT_ANSWER_PATTERNS, AnswerStated, TextProbe, TextProbeExit, answer_stated_rules, text_features,
)
from lynx_hf.runtime.conformal import Calibration
from lynx_hf.runtime.cues import _example_tokenizer
from lynx_hf.evaluation.evaluate import evaluate
from lynx_hf.pipeline.events import EventTable

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
    outcomes = evaluate(replay, [Full(), LynxExit(0.8, "event"), LynxExit(0.9), Oracle(), FirstCue()])[1]
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
    import lynx_hf.evaluation.live_rules as live_rules
    from lynx_hf.runtime.exit import ExitAnswer

    calls = []

    def fake_answer(model, tok, ids, cuts, exit_ids, attention_mask=None, max_new_tokens=16):
        calls.append((ids.shape, list(cuts), attention_mask.sum(-1).tolist()))
        return [ExitAnswer(token_ids=[1, 2], text="7}", answer="7") for _ in cuts]

    monkeypatch.setattr(live_rules, "answer_after_exit", fake_answer)
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


# ----- text-only baselines ----------------------------------------------------------------------------------------
def _organism_tokenizer():
    from transformers import AutoTokenizer

    from lynx_hf import organism

    return AutoTokenizer.from_pretrained(organism.MODEL_DIR, local_files_only=True)


def text_table(tok, traces: list[tuple[str, list[str], list[bool]]], settings: dict | None = None,
               prefix: str = "t") -> EventTable:
    """An event table with real token ids: per trace (question, thinking lines, safe label per cue line); a line
    that starts with a cue word ("Wait", "Hmm") is a cue event at its first token."""
    from lynx_hf import organism

    rows = {k: [] for k in ("safe", "trace", "start")}
    records = []
    for t, (question, lines, labels) in enumerate(traces):
        ids = tok(organism.prompt(tok, question), add_special_tokens=False)["input_ids"]
        prompt = len(ids)
        cues = 0
        for line in lines:
            if line.startswith(("Wait", "Hmm")):
                rows["start"].append(len(ids))
                rows["safe"].append(labels[cues])
                rows["trace"].append(t)
                cues += 1
            ids = ids + tok(line + "\n", add_special_tokens=False)["input_ids"]
        assert cues == len(labels)
        records.append({"id": f"{prefix}{t}", "gold": "7", "answer": "7", "correct": True, "prompt_length": prompt,
                        "think_length": len(ids) - prompt, "length": len(ids) - prompt + 4, "token_ids": ids})
    n = len(rows["safe"])
    start = torch.tensor(rows["start"], dtype=torch.long)
    return EventTable(settings=settings or {}, features=torch.zeros(n, 1), safe=torch.tensor(rows["safe"]),
                      trace=torch.tensor(rows["trace"], dtype=torch.long), position=start, start=start.clone(),
                      cue=torch.zeros(n, dtype=torch.long), answer_length=torch.full((n,), 2),
                      answer_confidence=torch.full((n,), 0.9), answers=["7"] * n, traces=records)


def test_answer_stated_exits_at_the_first_cue_after_the_thinking_states_an_answer():
    tok = _organism_tokenizer()
    table = text_table(tok, [
        ("What is 3 + 4?", ["Start with 3.", "Wait, one step at a time.", "3 + 4 = 7", "So the answer is 7.",
                            "Hmm, let me check.", "Wait, is the last step right?"], [False, True, True]),
        # "answer is" only after the last cue, and "\boxed{}" only in the prompt: never read, never exits
        ("What is 5 + 2?", ["Start with 5.", "Hmm, what comes next?", "5 + 2 = 7", "So the answer is 7."], [False]),
    ])
    replay = Replay(table, torch.zeros(len(table)), EXIT_LENGTH)
    phrases = AnswerStated(tok, {"answer is": DEFAULT_ANSWER_PATTERNS["answer is"]})
    out = phrases.run(replay)
    assert out.event.tolist() == [1, -1] and out.correct.tolist() == [True, True]
    assert out.info["family"] == "AnswerStated"
    # the concluding "= number" line: the cue right after "3 + 4 = 7" is the 2nd one of trace 0, none in trace 1
    number_line = AnswerStated(tok, {"= number line": DEFAULT_ANSWER_PATTERNS["= number line"]}).run(replay)
    assert number_line.event.tolist() == [-1, -1]
    lines = ["Start with 3.", "3 + 4 = 7", "Wait, one step at a time.", "Hmm, done."]
    replay2 = Replay(text_table(tok, [("What is 3 + 4?", lines, [True, True])]), torch.zeros(2), EXIT_LENGTH)
    assert AnswerStated(tok, {"n": DEFAULT_ANSWER_PATTERNS["= number line"]}).run(replay2).event.tolist() == [0]
    assert phrases.run(replay2).event.tolist() == [-1]


def test_answer_stated_reads_only_the_text_before_the_cue():
    tok = _organism_tokenizer()
    lines = ["Start with 3.", "Wait, one step at a time.", "3 + 4 = 7", "Hmm, so the answer is 7."]
    table = text_table(tok, [("What is 3 + 4?", lines, [False, True])])
    rule = answer_stated_rules(tok)[1]  # every answer phrase, including "so the answer" and "\boxed{"
    seen = []
    original = rule.stated
    rule.stated = lambda text: seen.append(text) or original(text)
    out = rule.run(Replay(table, torch.zeros(2), EXIT_LENGTH))
    assert out.event.tolist() == [-1]  # the answer is stated only on the cue's own line
    assert seen == ["Start with 3.\n", "Start with 3.\nWait, one step at a time.\n3 + 4 = 7\n"]
    assert all("boxed" not in text and "Please" not in text for text in seen)  # the prompt is never read


def test_answer_stated_patterns_are_configurable_and_validated():
    tok = _organism_tokenizer()
    rule = AnswerStated(tok, [r"\bone step\b"], name="custom")
    table = text_table(tok, [("What is 3 + 4?", ["One step at a time.", "Wait, go on.", "Hmm, go on."], [True, True])])
    assert rule.name == "custom" and rule.run(Replay(table, torch.zeros(2), EXIT_LENGTH)).event.tolist() == [0]
    with pytest.raises(ValueError, match="at least one pattern"):
        AnswerStated(tok, [])
    with pytest.raises(ValueError, match="no token_ids"):
        AnswerStated(tok).run(tiny_table())
    assert [r.name for r in answer_stated_rules(tok)] == [
        "AnswerStated (all defaults)", "AnswerStated (answer phrases)", "AnswerStated (= number line)"]


def test_text_features_see_only_the_last_tokens_up_to_the_cue():
    tok = _organism_tokenizer()
    lines = ["Start with 3.", "3 + 4 = 7", "Wait, one step at a time.", "Hmm, done."]
    table = text_table(tok, [("What is 3 + 4?", lines, [True, True])])
    embeddings = torch.randn(len(tok), 6, generator=torch.Generator().manual_seed(0))
    x = text_features(table, embeddings, window=4)
    assert x.shape == (2, 4 * 6 + 2)
    ids = table.traces[0]["token_ids"]
    position = int(table.position[0])
    assert torch.equal(x[0, :24].reshape(4, 6), embeddings[ids[position - 3:position + 1]])  # ends at the cue token
    assert x[0, -1] == 0 and x[1, -1] == 1  # the cue's index in its trace
    # tokens after the cue and before the window do not change the features; a token inside the window does
    changed = [i + 1 if (j > position or j < position - 3) else i for j, i in enumerate(ids)]
    table.traces[0]["token_ids"] = changed
    assert torch.equal(text_features(table, embeddings, 4)[0], x[0])
    changed[position - 1] = (changed[position - 1] + 1) % len(tok)
    assert not torch.equal(text_features(table, embeddings, 4)[0], x[0])
    with pytest.raises(ValueError, match="outside the embedding matrix"):
        text_features(table, embeddings[:5], 4)


def _stated_tables(tok, n: int, seed: int):
    """Traces where a cue is safe exactly when the line before it states the answer (a text-visible label)."""
    g = torch.Generator().manual_seed(seed)
    traces = []
    for i in range(n):
        k = int(torch.randint(0, 3, (1,), generator=g))
        lines, labels = [f"Start with {i % 9}."], []
        for step in range(3):
            if step == k:
                lines.append("So the answer is 7.")
            lines.append("Wait, let me check." if step % 2 else "Hmm, go on.")
            labels.append(step >= k)
        traces.append((f"What is {i} + {seed}?", lines, labels))
    return text_table(tok, traces, prefix=f"s{seed}-")


def test_text_probe_learns_text_visible_labels_with_lynx_calibration():
    from lynx_hf.runtime.probe import auroc

    tok = _organism_tokenizer()
    train, cal, test = (_stated_tables(tok, n, seed) for n, seed in ((120, 0), (80, 1), (80, 2)))
    embeddings = torch.randn(len(tok), 8, generator=torch.Generator().manual_seed(1))
    text_probe = TextProbe.fit(train, cal, embeddings, windows=(2, 12), seed=0, max_epochs=60)
    assert set(text_probe.reports) == {2, 12} and text_probe.window in (2, 12)
    assert text_probe.calibration.scores.numel() == len(cal) and text_probe.calibration.n_questions == cal.n_traces
    assert auroc(text_probe.scores(test), test.safe) > 0.9
    # the same guarantee machinery as LYNX: equal scores and calibration give the very same exits
    replay = Replay(test, text_probe.scores(test), EXIT_LENGTH, text_probe.calibration)
    for guarantee in ("event", "question"):
        text = TextProbeExit(text_probe, 0.9, guarantee).run(replay)
        lynx = LynxExit(0.9, guarantee).run(replay)
        assert torch.equal(text.event, lynx.event) and text.info["tau"] == lynx.info["tau"]
        assert text.info["family"] == f"TextProbe ({guarantee})" and text.info["target"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="in both the training and calibration"):
        TextProbe.fit(train, train, embeddings, windows=(2,))


def test_answer_stated_live_stops_where_replay_exits_on_the_same_tokens(tmp_path):
    """Regenerate sampled organism traces with the live criteria: every row stops at replay's AnswerStated cue."""
    from lynx_hf import organism
    from lynx_hf.evaluation.text_rules import AnswerStatedCriteria
    from lynx_hf.pipeline.collect import Collector

    model, tok = organism.load()
    table = Collector(model, tok, prompt_fn=organism.prompt, max_new_tokens=400).collect(
        organism.problems("arithmetic", "test", n=12, seed=3), tmp_path, batch_size=12, seed=3, progress=False)
    for rule in answer_stated_rules(tok):
        replay_events = rule.run(Replay(table, torch.zeros(len(table)), EXIT_LENGTH)).event
        criteria = AnswerStatedCriteria(rule, think_start=table.settings["think_start"],
                                        think_end=table.settings["think_end"])
        (indices, seed), = shard_batches(table)
        out, width = regenerate(model, tok, table, indices, seed, stopping_criteria=[criteria])
        assert bool((replay_events >= 0).any())  # each rule exits somewhere on these traces
        for b, t in enumerate(indices):
            e = int(replay_events[t])
            offset = width - table.traces[t]["prompt_length"]
            expected = int(table.start[e]) + offset if e >= 0 else -1
            assert int(criteria.exit_start[b]) == expected, (rule.name, t)
            if e >= 0:  # the row stopped right after the token that confirmed the cue
                generated = out[b, width:].tolist()
                assert generated[: int(table.position[e]) + 2 - table.traces[t]["prompt_length"]] == \
                    table.traces[t]["token_ids"][table.traces[t]["prompt_length"]:int(table.position[e]) + 2]
        assert int((criteria.exit_start >= 0).sum()) == int((replay_events >= 0).sum())
