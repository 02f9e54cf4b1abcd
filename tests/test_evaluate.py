"""Replay evaluation, metrics, the conformal promise on replay, live-vs-replay agreement and the outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from lynx_hf.evaluation.cue_rules import Full, LynxExit
from lynx_hf.evaluation.live_rules import regenerate, shard_batches
from lynx_hf.evaluation.replay import Replay
from lynx_hf.runtime.conformal import Calibration, LynxCalibrationWarning
from lynx_hf.evaluation.agreement import compare_exits, live_agreement
from lynx_hf.evaluation.evaluate import calibration_curve, evaluate, metrics, probe_aurocs, replay_methods
from lynx_hf.evaluation.tables import format_agreement, format_aurocs, format_compact, format_table, write_results
from lynx_hf.evaluation.plots import calibration_plot, pareto_plot
from test_baselines import _organism_tokenizer, _stated_tables, synthetic_replay, synthetic_table, tiny_table

ROOT = Path(__file__).resolve().parent.parent


def test_metrics_count_helped_harmed_savings_and_premature_exits():
    replay = synthetic_replay()
    rows, outcomes = evaluate(replay, replay_methods([0.9], [0.9]))
    full, row = outcomes[0], rows[1]
    lynx = outcomes[1]
    assert row["method"] == "Lynx c=0.9 (question)" and row["target"] == pytest.approx(0.1)  # the default first
    assert row["helped"] == int((~full.correct & lynx.correct).sum())
    assert row["harmed"] == int((full.correct & ~lynx.correct).sum())
    assert row["accuracy"] == pytest.approx(rows[0]["accuracy"] + (row["helped"] - row["harmed"]) / replay.n_traces)
    assert row["savings"] == pytest.approx(1 - lynx.thinking_tokens.double().mean() / full.thinking_tokens.double().mean())
    wrong = lynx.exited & ~lynx.correct
    assert row["premature_per_exit"] == pytest.approx(wrong.sum().item() / lynx.exited.sum().item())
    assert row["premature_per_question"] == pytest.approx(wrong.double().mean().item())
    assert rows[0]["savings"] == 0.0 and rows[0]["exit_rate"] == 0.0


@pytest.mark.parametrize("guarantee", ["event", "question"])
def test_lynx_realises_at_most_the_target_premature_rate_on_held_out_tables(guarantee):
    """The promise is in expectation over calibration draws: average over 20 independent calibration/test pairs."""
    for confidence in (0.8, 0.9):
        realised = []
        for seed in range(12):
            test, scores = synthetic_table(200, seed=seed)
            cal, cal_scores = synthetic_table(200, seed=10_000 + seed)
            replay = Replay(test, scores, 5, Calibration(scores=cal_scores.double(), safe=cal.safe, question=cal.trace))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LynxCalibrationWarning)
                row = metrics(LynxExit(confidence, guarantee).run(replay), Full().run(replay))
            realised.append(row["unsafe_event_exit_rate"] if guarantee == "event" else row["premature_per_question"])
            assert row["exit_rate"] > 0
        mean = sum(realised) / len(realised)
        # binomial tolerance for the mean of 12 x ~200 draws (unsafe events or questions) around delta, at 3 sigma
        delta = 1 - confidence
        assert mean <= delta + 3 * (delta * (1 - delta) / (12 * 200)) ** 0.5, (confidence, mean)


def test_calibration_curve_follows_the_threshold_per_guarantee():
    replay = synthetic_replay()
    curve = calibration_curve(replay, [0.7, 0.9])
    assert {(p["guarantee"], p["confidence"]) for p in curve} == {(g, c) for g in ("event", "question") for c in (0.7, 0.9)}
    by = {(p["guarantee"], p["confidence"]): p for p in curve}
    for g in ("event", "question"):
        assert by[(g, 0.9)]["exit_rate"] <= by[(g, 0.7)]["exit_rate"]  # higher confidence, fewer exits


def test_compare_exits_agreement_and_reasons_on_constructed_cases():
    replay = tiny_table()  # q0: events at 31 (score 0.2, unsafe) and 61 (score 0.9, safe)
    replay.table.traces[0]["token_ids"] = list(range(110 + 10))
    agree = compare_exits(replay, 0, 0.5, live_position=61, live_score=0.9)
    assert agree["agree"] and agree["reason"] is None and agree["replay_position"] == 61
    near = compare_exits(replay, 0, 0.2000001, live_position=31, live_score=0.2000002)
    assert not near["agree"] and "near the threshold" in near["reason"]
    far = compare_exits(replay, 0, 0.5, live_position=31, live_score=0.7)
    assert not far["agree"] and "unexplained" in far["reason"]
    tokens = list(range(10, 120))
    tokens[5] = -1
    diverged = compare_exits(replay, 0, 0.5, live_position=-1, live_score=None, live_tokens=tokens)
    assert not diverged["agree"] and "diverged at generated token 5" in diverged["reason"]
    elsewhere = compare_exits(replay, 0, 0.5, live_position=40, live_score=0.9)
    assert "not a replay cue event" in elsewhere["reason"]
    assert compare_exits(replay, 1, 0.5, live_position=-1, live_score=None)["agree"]  # no cues, no exit


def test_results_table_json_and_plots_are_written(tmp_path, text_setup):
    tok, text_probe, replay = text_setup
    rows, _ = evaluate(replay, replay_methods([0.8, 0.9, 0.95], [0.8, 0.9], tokenizer=tok, text_probe=text_probe))
    md = write_results(rows, tmp_path, title="synthetic", extra={"calibration_curve": calibration_curve(replay)},
                       notes=["probe AUROC: a note"])
    text = md.read_text()
    assert "| Oracle |" in text and "| DEER λ=0.9 |" in text and "| TextProbe c=0.9 (event) |" in text
    assert "| AnswerStated (answer phrases) |" in text and text.endswith("\nprobe AUROC: a note\n")
    assert text.count("\n") == len(rows) + 4 + 2
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in payload["rows"]] == [r["method"] for r in rows] and payload["calibration_curve"]
    for path in (pareto_plot(rows, tmp_path / "pareto.png", "synthetic"),
                 calibration_plot(payload["calibration_curve"], tmp_path / "cal.png", "synthetic")):
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    assert "–" in format_table(rows[:1])  # no exits: no premature-exit rate


@pytest.fixture(scope="module")
def text_setup():
    """Tables with real token ids whose labels the text shows, a fitted TextProbe and a replay with noisy scores."""
    from lynx_hf.evaluation.text_rules import TextProbe

    tok = _organism_tokenizer()
    train, cal, test = (_stated_tables(tok, n, seed) for n, seed in ((120, 0), (80, 1), (80, 2)))
    embeddings = torch.randn(len(tok), 8, generator=torch.Generator().manual_seed(1))
    text_probe = TextProbe.fit(train, cal, embeddings, windows=(12,), seed=0, max_epochs=60)
    g = torch.Generator().manual_seed(3)
    noisy = (0.3 + 0.4 * test.safe.float() + 0.3 * torch.randn(len(test), generator=g)).clamp(0, 1)
    replay = Replay(test, noisy, 5, text_probe.calibration)
    return tok, text_probe, replay


def test_replay_methods_add_the_text_baselines_when_they_can_read_the_text(text_setup):
    tok, text_probe, replay = text_setup
    plain = [m.name for m in replay_methods([0.9], [0.9])]
    assert not any(n.startswith(("TextProbe", "AnswerStated")) for n in plain)
    names = [m.name for m in replay_methods([0.8, 0.9], [0.9], tokenizer=tok, text_probe=text_probe)]
    for c in (0.8, 0.9):  # the control at each of LYNX's operating points, under both guarantees
        for g in ("event", "question"):
            assert f"Lynx c={c:g} ({g})" in names and f"TextProbe c={c:g} ({g})" in names
    assert [n for n in names if n.startswith("AnswerStated")] == [
        "AnswerStated (all defaults)", "AnswerStated (answer phrases)", "AnswerStated (= number line)"]
    rows, _ = evaluate(replay, replay_methods([0.9], [0.9], tokenizer=tok, text_probe=text_probe))
    by = {r["method"]: r for r in rows}
    assert by["TextProbe c=0.9 (event)"]["guarantee"] == "event" and by["TextProbe c=0.9 (event)"]["target"] == \
        pytest.approx(0.1)
    # the labels here are exactly "an answer was stated": the phrase rule is never premature
    assert by["AnswerStated (answer phrases)"]["premature_per_exit"] == 0.0
    assert by["AnswerStated (answer phrases)"]["exit_rate"] == 1.0


def test_probe_aurocs_compare_the_lynx_probe_with_the_text_probe(text_setup):
    from lynx_hf.runtime.probe import auroc

    _, text_probe, replay = text_setup
    report = probe_aurocs(replay, text_probe)
    assert report["lynx_probe"] == pytest.approx(auroc(replay.scores, replay.table.safe))
    assert report["text_probe"] == pytest.approx(auroc(text_probe.scores(replay.table), replay.table.safe))
    assert report["text_probe"] > report["lynx_probe"]  # the noisy "hidden-state" scores lose to the clean text
    assert report["n_events"] == len(replay.table) and report["text_probe_window"] == 12
    assert "TextProbe (last 12 tokens)" in format_aurocs(report)
    assert "text_probe" not in probe_aurocs(replay)


def test_compact_table_has_five_columns_and_fits_a_terminal(text_setup):
    tok, text_probe, replay = text_setup
    rows, _ = evaluate(replay, replay_methods([0.8, 0.9, 0.95], [0.9], tokenizer=tok, text_probe=text_probe))
    lines = format_compact(rows).splitlines()
    assert len(lines) == len(rows) + 2
    assert all(line.count("|") == 6 for line in lines)
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    by = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert "per unsafe cue (target 0.10)" in by["Lynx c=0.9 (event)"]
    assert "per question (target 0.05)" in by["TextProbe c=0.95 (question)"]
    assert by["Full"].endswith("| – |")
    assert len(format_table(rows).splitlines()[0].split("|")) - 2 == 15  # the full table keeps every column


def test_text_only_margin_compares_with_the_best_mix_of_text_rules():
    from lynx_hf.evaluation.evaluate import text_only_margin
    from lynx_hf.evaluation.tables import format_text_margin

    def row(method, family, accuracy, tokens):
        return {"method": method, "family": family, "accuracy": accuracy, "thinking_tokens": tokens}

    rows = [row("Full", "Full", 0.80, 200.0), row("Rule", "AnswerStated", 0.70, 100.0),
            row("Lynx c=0.9 (event)", "Lynx (event)", 0.80, 100.0), row("DEER λ=0.9", "DEER", 0.95, 10.0)]
    m = text_only_margin(rows, "Lynx c=0.9 (event)")
    # half Rule, half Full per question: 150 tokens at 0.75; reaching 0.80 takes Full alone (200 tokens)
    assert m["text_accuracy_at_equal_tokens"] == pytest.approx(0.70) and m["accuracy_margin"] == pytest.approx(0.10)
    assert m["text_savings_at_equal_accuracy"] == pytest.approx(0.0) and m["savings_margin"] == pytest.approx(0.5)
    assert "DEER λ=0.9" not in m["text_methods"]  # DEER reads the model's answer probabilities, not the text
    assert format_text_margin(m).endswith("met")
    # a better text rule can only shrink the margin: the baseline is never weakened by adding rules
    probe = row("TextProbe c=0.9 (event)", "TextProbe (event)", 0.78, 90.0)
    stronger = text_only_margin(rows + [probe], "Lynx c=0.9 (event)")
    assert stronger["accuracy_margin"] < m["accuracy_margin"] and stronger["savings_margin"] <= m["savings_margin"]
    # mixes: between (90, 0.78) and (200, 0.80), accuracy 0.79 costs 145 tokens on average
    lynx = row("Lynx c=0.9 (event)", "Lynx (event)", 0.79, 100.0)
    mixed = text_only_margin([rows[0], rows[1], probe, lynx], "Lynx c=0.9 (event)")
    assert mixed["text_savings_at_equal_accuracy"] == pytest.approx(1 - 145 / 200)
    assert mixed["text_accuracy_at_equal_tokens"] == pytest.approx(0.78 + 0.02 * 10 / 110)
    ahead = text_only_margin([row("Full", "Full", 0.5, 100.0), row("First", "FirstCue", 0.1, 20.0),
                              row("L", "Lynx (event)", 0.9, 60.0)], "L")
    assert ahead["savings_margin"] is None and ahead["accuracy_margin"] == pytest.approx(0.9 - 0.3)
    assert "no text rule reaches its accuracy" in format_text_margin(ahead)
    with pytest.raises(ValueError, match="not in the results table"):
        text_only_margin(rows, "Lynx c=0.5 (event)")


def test_evaluation_never_imports_the_cli():
    """The import graph reads runtime <- pipeline <- evaluation <- CLI: no library module imports `lynx_hf.cli`."""
    import ast

    offenders = []
    for path in (ROOT / "lynx_hf").rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):  # the command itself (`lynx-hf`, `python -m lynx_hf`)
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                names = {a.name for a in node.names}
                if module.endswith("cli") or (module in (".", "lynx_hf") and "cli" in names):
                    offenders.append(f"{path.name}: from {module} import {', '.join(sorted(names))}")
            elif isinstance(node, ast.Import) and any(a.name == "lynx_hf.cli" for a in node.names):
                offenders.append(f"{path.name}: import lynx_hf.cli")
    assert not offenders, offenders


def test_importing_lynx_hf_loads_the_runtime_only():
    """`import lynx_hf` (what a user of the plug-ins imports) loads no evaluation, demo, plotting or CLI code; the
    text baselines it exports are imported on first use."""
    import subprocess
    import sys

    code = ("import sys, lynx_hf; print(sorted(m for m in sys.modules if m.startswith(('lynx_hf.', 'matplotlib', "
            "'evaluate', 'datasets')))); from lynx_hf import TextProbe; print(TextProbe.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.splitlines()
    loaded = eval(out[0])
    for heavy in ("lynx_hf.evaluation.replay", "lynx_hf.evaluation.cue_rules", "lynx_hf.evaluation.text_rules",
                  "lynx_hf.evaluation.live_rules", "lynx_hf.evaluation.evaluate", "lynx_hf.evaluation.agreement",
                  "lynx_hf.evaluation.tables", "lynx_hf.evaluation.demo",
                  "lynx_hf.evaluation.plots", "lynx_hf.cli", "lynx_hf.pipeline.collect", "matplotlib", "evaluate",
                  "datasets"):
        assert heavy not in loaded, loaded
    assert out[1] == "lynx_hf.evaluation.text_rules"


def test_shipped_text_events_belong_to_the_shipped_bundle():
    """The demo's TextProbe trains on the bundle's own tables; a table with other labels is refused."""
    from lynx_hf import organism
    from lynx_hf.evaluation.text_rules import TextEvents, load_text_events
    from lynx_hf.runtime.bundle import Lynx
    from lynx_hf.evaluation.demo import TEXT_EVENTS, is_bundle_table

    path = organism.BUNDLE_DIR / TEXT_EVENTS
    if not path.exists():
        pytest.skip("the bundle ships no text events yet (scripts/build_organism_bundle.py writes them)")
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
    splits, meta = load_text_events(path)
    assert meta["weights_sample"] == list(lynx.config.weights_sample)
    assert is_bundle_table(lynx, "calibration", splits["calibration"]) is True
    assert is_bundle_table(lynx, "train", splits["train"]) is True
    assert not set(splits["train"].trace_ids) & set(splits["calibration"].trace_ids)
    cal = splits["calibration"]
    flipped = TextEvents(cal.ids, cal.thought, cal.cue_index, ~cal.safe, cal.trace, cal.trace_ids)
    assert is_bundle_table(lynx, "calibration", flipped) is False


def test_text_events_round_trip_through_safetensors(tmp_path, text_setup):
    from lynx_hf.evaluation.text_rules import TextEvents, load_text_events, save_text_events

    _, text_probe, replay = text_setup
    events = TextEvents.from_table(replay.table)
    save_text_events(tmp_path / "t.safetensors", {"test": events}, metadata={"note": "x"})
    splits, meta = load_text_events(tmp_path / "t.safetensors")
    assert meta == {"note": "x"} and splits["test"].trace_ids == events.trace_ids
    for name in ("ids", "thought", "cue_index", "safe", "trace"):
        assert torch.equal(getattr(splits["test"], name), getattr(events, name)), name
    assert torch.equal(text_probe.scores(splits["test"]), text_probe.scores(replay.table))


def test_eval_command_fits_the_text_probe_on_the_given_tables_and_prints_the_compact_table(tmp_path, capsys):
    """`lynx-hf eval` on the organism: text-only rows and both AUROCs, every column in results.md."""
    from lynx_hf import organism
    from lynx_hf.runtime.bundle import Lynx
    from lynx_hf.cli import main as cli_main
    from lynx_hf.evaluation.evaluate import collector_for

    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    collector = collector_for(model, tok, lynx, prompt_fn=organism.prompt, max_new_tokens=400)
    for split, n in (("train", 16), ("calibration", 12), ("test", 8)):
        collector.collect(organism.problems("arithmetic", split, n=n, seed=0), tmp_path / split, batch_size=16,
                          seed=0, progress=False)
    args = ["eval", "--events", str(tmp_path / "test"), "--out", str(tmp_path / "eval")]
    assert cli_main(args + ["--text-probe-train", str(tmp_path / "train")]) == 2
    assert "Give both --text-probe-train and --text-probe-calibration" in capsys.readouterr().err
    assert cli_main(args + ["--text-probe-train", str(tmp_path / "train"),
                            "--text-probe-calibration", str(tmp_path / "calibration")]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| method | accuracy | thinking tokens | savings | premature exits (target) |"
    assert "| TextProbe c=0.9 (event) |" in printed and "| AnswerStated (answer phrases) |" in printed
    assert "LYNX probe (hidden states)" in printed and "TextProbe (last" in printed
    payload = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(payload["aurocs"]) >= {"lynx_probe", "text_probe", "text_probe_window", "n_events"}
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| unsafe-event exits |" in md and "| TextProbe c=0.95 (question) |" in md


# ----- live vs replay on a tiny random model ----------------------------------------------------------------------
def _word_tokenizer():
    """A word-level tokenizer like the organism's: cue words are single tokens, other text is per character."""
    import re
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Wait", "Hmm", "Final", "Answer"]
    special = ["<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>"]
    pieces = special + [c for c in string.printable if c not in "\r\x0b\x0c"] + ["\\boxed"] + words + [
        " " + w for w in words]
    tok = Tokenizer(models.WordLevel(vocab={p: i for i, p in enumerate(dict.fromkeys(pieces))}, unk_token="<unk>"))
    pattern = r"\\boxed| ?(?<![A-Za-z])(?:" + "|".join(words) + r")(?![A-Za-z])|[\s\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    assert re  # the pattern above is a tokenizers Regex
    return hf


@pytest.fixture(scope="module")
def live_setup(tmp_path_factory):
    from lynx_hf.pipeline.collect import Collector
    from lynx_hf.runtime.probe import LynxProbe
    from lynx_hf.pipeline.train import build_bundle, score

    tok = _word_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=3, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # a random model that reflects a lot: raise the logits of " Wait" / " Hmm", lower "</think>" and EOS
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids([" Wait", " Hmm"])] = 2.5
        head.bias[tok.convert_tokens_to_ids(["</think>", "</s>"])] = -5.0
    model.lm_head = head
    collector = Collector(model, tok, layers=(1, 2), max_new_tokens=32, answer_max_new_tokens=3)
    problems = [{"id": f"p{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(9)]
    table = collector.collect(problems, tmp_path_factory.mktemp("events"), batch_size=4, seed=5, progress=False)
    torch.manual_seed(0)
    probe = LynxProbe(collector.settings["hidden_size"] * 2, hidden_sizes=(8,))
    scores = score(probe, table).double()
    # calibration whose event threshold at c = 0.9 is just above the 90th percentile of the cue scores
    calibration = Calibration(scores=torch.cat([scores, torch.zeros(len(scores), dtype=torch.float64)]),
                              safe=torch.cat([torch.zeros(len(scores)), torch.ones(len(scores))]).bool(),
                              question=torch.arange(2 * len(scores)))
    lynx = build_bundle(table.settings, probe, calibration, tokenizer=tok, confidence=0.9).attach(model, tok)
    return model, tok, collector, table, lynx


def test_regenerate_reproduces_the_collected_traces(live_setup):
    model, tok, collector, table, _ = live_setup
    assert len(table) >= 18 and table.n_traces == 9
    indices, seed = next(shard_batches(table))
    out, width = regenerate(model, tok, table, indices, seed)
    for b, i in enumerate(indices):
        generated = table.traces[i]["token_ids"][table.traces[i]["prompt_length"]:]
        assert out[b, width:width + len(generated)].tolist() == generated


def test_live_plugins_agree_with_replay_at_the_same_threshold(live_setup):
    model, tok, _, table, lynx = live_setup
    replay = Replay.from_bundle(table, lynx)
    report = live_agreement(lynx, replay, n=table.n_traces)
    print(format_agreement(report))
    exits = LynxExit(0.9, lynx.guarantee).run(replay)
    assert 0 < exits.exited.sum() < table.n_traces  # some rows exit, some do not
    for mode in ("stop", "shadow"):
        s = report[mode]
        assert s["n"] == 9
        assert s["token_agreement"] == 1.0  # same prompts, batches and seeds: the same tokens up to the exit
        assert s["exit_agreement"] == pytest.approx(1 - sum(not d["agree"] for d in s["disagreements"]) / 9)
        assert s["exit_agreement"] >= 7 / 9
        for d in s["disagreements"]:
            assert d["agree"] is False or d.get("answer_agree") is False
            assert d["reason"] is None or "near the threshold" in d["reason"], d
    stop = report["stop"]
    assert stop["exit_rate"] == pytest.approx(float(exits.exited.double().mean()), abs=2 / 9)
    assert stop["answer_agreement"] >= 7 / 9
    assert lynx.shadow is False
    assert "stop: 9 traces" in format_agreement(report)


@pytest.mark.slow
def test_demo_runs_on_the_organism(tmp_path):
    """End to end on the shipped organism and bundle (skipped until they exist)."""
    from lynx_hf import organism

    if not (organism.BUNDLE_DIR / "config.json").exists() or not (organism.MODEL_DIR / "config.json").exists():
        pytest.skip("the organism bundle is not built yet (scripts/build_organism_bundle.py)")
    from argparse import Namespace

    from lynx_hf import Lynx
    from lynx_hf.evaluation import demo
    from lynx_hf.pipeline.events import read_settings

    calibrated_at = Lynx.from_pretrained(organism.BUNDLE_DIR).metadata["sampling"]["temperature"]
    results = demo.main(Namespace(n=24, out=str(tmp_path), seed=0, live=8, quiet=True))
    for family in ("arithmetic", "compare"):
        rows = {r["method"]: r for r in results[family]["rows"]}
        assert rows["Oracle"]["accuracy"] >= rows["Full"]["accuracy"] - 1e-9
        assert (tmp_path / family / "pareto.png").exists() and (tmp_path / family / "calibration.png").exists()
        # the text-only baselines sit beside LYNX, and the AUROC of both probes is reported
        for name in ("TextProbe c=0.9 (event)", "TextProbe c=0.95 (question)", "AnswerStated (all defaults)",
                     "AnswerStated (answer phrases)", "AnswerStated (= number line)"):
            assert name in rows
        assert results[family]["text_margin"]["method"] == "Lynx c=0.9 (question)"
        # the default guarantee leads, and LYNX + budget sits beside budget forcing at the same budget
        lynx_rows = [r for r in results[family]["rows"] if r["family"].startswith("Lynx")]
        assert lynx_rows[0]["method"] == "Lynx c=0.8 (question)" and lynx_rows[0]["guarantee"] == "question"
        capped = [r for r in results[family]["rows"] if r["family"] == "Lynx + budget"]
        assert capped and all(f"Budget B={r['knob']}" in rows for r in capped)
        aurocs = results[family]["aurocs"]
        assert 0.5 < aurocs["lynx_probe"] <= 1 and 0 <= aurocs["text_probe"] <= 1
        text = (tmp_path / family / "results.md").read_text()
        assert "| TextProbe c=0.9 (event) |" in text and "TextProbe (last" in text
        # the test traces are sampled as the bundle's calibration traces were
        assert read_settings(tmp_path / family / "events")["temperature"] == calibrated_at
