"""Adversarial usage of the offline pipeline (collect -> train -> calibrate -> eval -> build -> save/load), as a
demanding user would drive it. Each test states what must happen; a silent wrong result is the bug to catch.

Tables come from the shipped model organism (tiny, CPU), collected once per module.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lynx_hf import CorruptedBundleError, Lynx, LynxConfigError, organism
from lynx_hf.cli import main as cli_main
from lynx_hf.pipeline.collect import Collector
from lynx_hf.pipeline.events import EventTable
from lynx_hf.loading import load_problems
from lynx_hf.pipeline.train import calibrate_bundle, check_test_disjoint, train

LAYERS = ("--layers", "2", "4")


@pytest.fixture(scope="module")
def model_tok():
    return organism.load()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_tok):
    """Train (16), calibration (8) and test (8) tables of disjoint organism problems, and a probe trained by the CLI."""
    root = tmp_path_factory.mktemp("runs")
    model, tok = model_tok
    collector = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400)
    for split, n in (("train", 16), ("calibration", 8), ("test", 8)):
        collector.collect(organism.problems("arithmetic", split, n), root / split, batch_size=8, seed=0,
                          progress=False)
    assert cli_main(["train", "--events", str(root / "train"), "--out", str(root / "probe"), "--max-epochs", "10"]) == 0
    return root


@pytest.fixture(scope="module")
def bundle_dir(runs):
    out = runs / "bundle"
    assert cli_main(["calibrate", "--probe", str(runs / "probe"), "--events", str(runs / "calibration"),
                     "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()  # progress bars of model loading may come first
    last = err.splitlines()[-1]
    assert last.startswith(f"lynx-hf {command}: error:") and "Traceback" not in err, err
    return last


# ----- problem counts and batch sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -3])
def test_a_problem_count_below_one_is_refused_not_read_as_all(n, tmp_path, capsys):
    """`--n 0` used to collect the organism's default 500 problems (`n or 500`) and `--n -3` all rows but three."""
    with pytest.raises(ValueError, match="positive number of problems"):
        load_problems("organism:arithmetic:train", n)
    assert cli_main(["collect", "--model", "organism", "--problems", "organism:arithmetic:train", "--n", str(n),
                     "--out", str(tmp_path / "c"), *LAYERS]) == 2
    assert "positive number" in _one_line_error(capsys, "collect")
    assert not (tmp_path / "c").exists()


def test_a_batch_size_below_one_is_refused_with_the_fix(model_tok, tmp_path):
    model, tok = model_tok
    collector = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=8)
    with pytest.raises(ValueError, match="positive number of problems per shard"):
        collector.collect(organism.problems("arithmetic", "train", 2), tmp_path, batch_size=0, progress=False)
    assert not (tmp_path / "settings.json").exists()


# ----- resuming a collection with other settings --------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"max_new_tokens": 300}, "max_new_tokens"),
    ({"cues": ("wait",)}, "cues"),
    ({"exit_text": "\n</think>\n\nSo the answer is"}, "exit_text"),
    ({"seed": 1}, "seed"),
    ({"dtype": torch.bfloat16}, "weights"),
    ({"labels": "agreement"}, "labels"),
])
def test_resuming_a_collection_with_other_settings_refuses_instead_of_mixing(change, match, model_tok, runs, tmp_path):
    import shutil

    folder = tmp_path / "cal"
    shutil.copytree(runs / "calibration", folder)
    model, tok = model_tok
    change = dict(change)
    seed = change.pop("seed", 0)
    if "dtype" in change:
        model = organism.load()[0].to(change.pop("dtype"))
    options = {"layers": (2, 4), "prompt_fn": organism.prompt, "max_new_tokens": 400, **change}
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(LynxConfigError, match=match):
        Collector(model, tok, **options).collect(organism.problems("arithmetic", "calibration", 8), folder,
                                                 batch_size=8, seed=seed, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == before


# ----- calibrating and testing on problems the probe or the calibration already saw ----------------------------
def test_cli_calibrate_on_the_probe_training_problems_is_refused(runs, capsys):
    """Calibration scores of training problems are optimistic: the thresholds would exit too early."""
    assert cli_main(["calibrate", "--probe", str(runs / "probe"), "--events", str(runs / "train"),
                     "--out", str(runs / "b-train")]) == 2
    assert "training table and the calibration table" in _one_line_error(capsys, "calibrate")
    assert not (runs / "b-train").exists()


def test_cli_calibrate_with_the_calibration_table_as_test_table_is_refused(runs, capsys):
    assert cli_main(["calibrate", "--probe", str(runs / "probe"), "--events", str(runs / "calibration"),
                     "--test-events", str(runs / "calibration"), "--out", str(runs / "b-test")]) == 2
    assert "calibration problems and the test event table" in _one_line_error(capsys, "calibrate")


def test_the_same_question_under_another_id_still_counts_as_seen(runs):
    """Benchmarks number each split from 0, and two runs over one source share problems under any id: problems are
    told apart by their prompt tokens, not their ids."""
    probe, _ = train(EventTable.load(runs / "train"), max_epochs=2)
    calibration = EventTable.load(runs / "calibration")
    renamed = EventTable.load(runs / "calibration")
    for i, trace in enumerate(renamed.traces):
        trace["id"] = f"other-{i}"
    with pytest.raises(ValueError, match="8 problem"):
        calibrate_bundle(probe, calibration, renamed)


def test_fit_refuses_the_training_problems_as_calibration_under_other_ids_before_training(runs, monkeypatch):
    import lynx_hf.pipeline.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained before checking the tables"))
    renamed = EventTable.load(runs / "train")
    for i, trace in enumerate(renamed.traces):
        trace["id"] = f"other-{i}"
    with pytest.raises(ValueError, match="in both the probe's training table and the calibration table"):
        train_module.fit(EventTable.load(runs / "train"), renamed)


def test_eval_on_the_bundle_calibration_problems_is_refused(runs, bundle_dir, capsys):
    assert cli_main(["eval", "--bundle", str(bundle_dir), "--events", str(runs / "calibration"),
                     "--out", str(runs / "eval-cal")]) == 2
    assert "bundle's calibration problems" in _one_line_error(capsys, "eval")
    meta = Lynx.from_pretrained(bundle_dir).metadata
    check_test_disjoint(EventTable.load(runs / "test"), meta)  # held-out problems pass
    with pytest.raises(ValueError, match="bundle's train problems"):
        check_test_disjoint(EventTable.load(runs / "train"), meta)


# ----- one-class and tiny calibration tables ------------------------------------------------------------------
@pytest.mark.parametrize("all_safe", [True, False])
def test_a_one_class_calibration_table_still_calibrates_and_says_auroc_is_undefined(runs, all_safe, capsys, tmp_path):
    """All-safe (an easy task) or all-unsafe calibration events are a valid calibration: the conformal thresholds
    need no AUROC. It used to fail with 'AUROC needs both classes'."""
    folder = tmp_path / "cal"
    table = EventTable.load(runs / "calibration")
    table.safe = torch.full_like(table.safe, all_safe)
    table.settings = {**table.settings, "n_shards": 1}
    table.save_shard(folder, 0)
    (folder / "settings.json").write_text(json.dumps(table.settings))
    assert cli_main(["calibrate", "--probe", str(runs / "probe"), "--events", str(folder),
                     "--out", str(tmp_path / "bundle")]) == 0
    assert "calibration AUROC undefined" in capsys.readouterr().out
    lynx = Lynx.from_pretrained(tmp_path / "bundle", confidence=0.8)
    assert lynx.metadata["calibration_auroc"] is None
    assert lynx.calibration.n_safe == (len(table) if all_safe else 0)
    for guarantee in ("event", "question"):
        lynx.guarantee = guarantee
        assert not math.isnan(lynx.threshold)


# ----- damaged probe folders and bundles ------------------------------------------------------------------------
def test_cli_calibrate_with_a_truncated_probe_names_the_folder_and_the_fix(runs, tmp_path, capsys):
    import shutil

    probe = tmp_path / "probe"
    shutil.copytree(runs / "probe", probe)
    data = (probe / "probe.safetensors").read_bytes()
    (probe / "probe.safetensors").write_bytes(data[: len(data) // 2])
    assert cli_main(["calibrate", "--probe", str(probe), "--events", str(runs / "calibration"),
                     "--out", str(tmp_path / "b")]) == 2
    err = _one_line_error(capsys, "calibrate")
    assert str(probe) in err and "lynx-hf train" in err


def _edit_json(path, edit):
    payload = json.loads(path.read_text())
    edit(payload)
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize("damage, match", [
    ("nan_score", r"calibration\.json.*'scores' entry 0"),
    ("wrong_lengths", r"calibration\.json.*different lengths"),
    ("newer_format", r"config\.json has format_version 99.*upgrade lynx-hf"),
    ("truncated_weights", r"model\.safetensors is corrupted.*re-save"),
])
def test_a_damaged_bundle_file_is_an_error_naming_the_file_and_the_fix(damage, match, bundle_dir, tmp_path):
    import shutil

    folder = tmp_path / damage
    shutil.copytree(bundle_dir, folder)
    if damage == "nan_score":
        _edit_json(folder / "calibration.json", lambda p: p["calibration"]["scores"].__setitem__(0, math.nan))
    elif damage == "wrong_lengths":
        _edit_json(folder / "calibration.json", lambda p: p["calibration"]["safe"].pop())
    elif damage == "newer_format":
        _edit_json(folder / "config.json", lambda c: c.__setitem__("format_version", 99))
    else:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError if damage in ("nan_score", "wrong_lengths") else CorruptedBundleError, match=match):
        Lynx.from_pretrained(folder)


def test_save_load_keeps_pac_and_paper_rule_thresholds_bit_for_bit(bundle_dir, tmp_path):
    lynx = Lynx.from_pretrained(bundle_dir)
    lynx.save_pretrained(tmp_path / "again")
    again = Lynx.from_pretrained(tmp_path / "again")
    for confidence in (0.5, 0.8):
        for guarantee in ("event", "question"):
            for risk_level, rule in ((0.1, "envelope"), (0.2, "paper"), (None, "paper")):
                for bundle in (lynx, again):
                    bundle.confidence, bundle.guarantee, bundle.risk_level, bundle.rule = \
                        confidence, guarantee, risk_level, rule
                assert again.threshold == lynx.threshold
    assert again.metadata["problem_digests"] == lynx.metadata["problem_digests"]


# ----- folders that already hold something ----------------------------------------------------------------------
def test_collecting_into_a_folder_with_shards_but_no_settings_refuses_to_resume(model_tok, runs, tmp_path):
    """Without settings.json nothing says how the shards were made: resuming would count them as done, mixed in."""
    import shutil

    folder = tmp_path / "cal"
    shutil.copytree(runs / "calibration", folder)
    (folder / "settings.json").unlink()
    model, tok = model_tok
    collector = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=300)
    with pytest.raises(LynxConfigError, match="shards but no settings.json"):
        collector.collect(organism.problems("arithmetic", "calibration", 8), folder, batch_size=8, progress=False)
    assert not (folder / "settings.json").exists()


def test_cli_calibrate_on_a_table_with_another_exit_text_is_refused(model_tok, runs, tmp_path, capsys):
    model, tok = model_tok
    collector = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400,
                          exit_text="\n</think>\n\nSo the answer is")
    collector.collect(organism.problems("arithmetic", "calibration", 2, seed=5), tmp_path / "cal", batch_size=2,
                      progress=False)
    assert cli_main(["calibrate", "--probe", str(runs / "probe"), "--events", str(tmp_path / "cal"),
                     "--out", str(tmp_path / "b")]) == 2
    assert "exit_text" in _one_line_error(capsys, "calibrate")
    assert not (tmp_path / "b").exists()


# ----- hand-built tables ----------------------------------------------------------------------------------------
def _reordered(table: EventTable, order: torch.Tensor) -> EventTable:
    from lynx_hf.pipeline.events import _TENSORS

    return EventTable(table.settings, **{k: getattr(table, k)[order] for k in _TENSORS},
                      answers=[table.answers[i] for i in order.tolist()], traces=table.traces)


def test_events_out_of_trace_order_are_refused_not_calibrated(runs):
    """Reversed events gave a per-question threshold of 0.0 (exit at every cue) where the ordered table gives ~0.3."""
    probe, _ = train(EventTable.load(runs / "train"), max_epochs=2)
    table = EventTable.load(runs / "calibration")
    for order in (torch.arange(len(table)).flip(0), torch.cat([torch.tensor([1, 0]), torch.arange(2, len(table))])):
        with pytest.raises(ValueError, match="select_traces"):
            calibrate_bundle(probe, _reordered(table, order))
    shuffled = _reordered(table, torch.randperm(len(table), generator=torch.Generator().manual_seed(0)))
    fixed = shuffled.select_traces(range(shuffled.n_traces))
    assert torch.equal(fixed.position, table.position) and torch.equal(fixed.trace, table.trace)
    calibrate_bundle(probe, fixed)
    dangling = EventTable.load(runs / "calibration")
    dangling.traces = dangling.traces[:-1]
    with pytest.raises(ValueError, match="holds 7 traces"):
        calibrate_bundle(probe, dangling)


# ----- CLI user errors: exit 2, one line, nothing written ---------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--problems", "organism:arithmetic:train", "--n", "2", "--layers", "9"], "Layer index 9 is out of range"),
    (["--problems", "missing.jsonl"], "missing.jsonl not found"),
    (["--problems", "DUPLICATES"], "ids are not unique"),
    # 0 answer tokens labelled every event unsafe (no answer is ever right); a negative temperature failed in generate
    (["--problems", "organism:arithmetic:train", "--n", "2", "--answer-max-new-tokens", "0"], "positive number of tok"),
    (["--problems", "organism:arithmetic:train", "--n", "2", "--temperature", "-1"], "temperature >= 0"),
    (["--problems", "organism:arithmetic:train", "--n", "2", "--top-p", "0"], "top_p in (0, 1]"),
])
def test_cli_collect_user_errors_exit_2_with_one_line_and_write_no_folder(args, message, tmp_path, capsys):
    if "DUPLICATES" in args:
        path = tmp_path / "dup.jsonl"
        path.write_text("\n".join(json.dumps({"id": "a", "question": f"{i}+1?", "answer": str(i + 1)})
                                  for i in range(2)))
        args = [str(path) if a == "DUPLICATES" else a for a in args]
    args = [str(tmp_path / a) if a.endswith(".jsonl") and not a.startswith("/") else a for a in args]
    assert cli_main(["collect", "--model", "organism", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in _one_line_error(capsys, "collect")
    assert not (tmp_path / "out").exists()


def test_eval_refuses_an_evaluation_table_that_overlaps_the_text_probe_tables(runs, bundle_dir, capsys):
    """The TextProbe control is trained and calibrated on the given tables: evaluating it on them is refused too
    (and is the only check for bundles, like the shipped one, saved before digests were recorded)."""
    assert cli_main(["eval", "--bundle", str(bundle_dir), "--events", str(runs / "test"), "--text-probe-train",
                     str(runs / "train"), "--text-probe-calibration", str(runs / "test"),
                     "--out", str(runs / "eval-tp")]) == 2
    assert "--text-probe-calibration and the evaluation table" in _one_line_error(capsys, "eval")


def test_an_interruption_between_the_two_files_of_a_shard_resumes_cleanly(model_tok, runs, tmp_path, monkeypatch):
    """Killed after a shard's first file landed: the re-run must redo that shard, not count it done without its
    traces (which made every later load fail)."""
    import os

    from lynx_hf.pipeline import events

    model, tok = model_tok
    collector = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400)
    problems = organism.problems("arithmetic", "calibration", 8)
    calls, replace = [], os.replace

    def replace_then_die(src, dst):
        calls.append(str(dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(events.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        collector.collect(problems, tmp_path, batch_size=8, seed=0, progress=False)
    monkeypatch.undo()
    table = collector.collect(problems, tmp_path, batch_size=8, seed=0, progress=False)
    reference = EventTable.load(runs / "calibration")
    assert [t["token_ids"] for t in table.traces] == [t["token_ids"] for t in reference.traces]
    assert torch.equal(table.safe, reference.safe)


@pytest.mark.parametrize("sizes, message", [
    (("0", "4", "0"), "training and calibration problems"),  # used to collect the calibration split first
    (("4", "-2", "0"), "calibration size -2"),  # used to shrink the training split to 2 problems
])
def test_build_with_an_empty_or_negative_split_refuses_before_collecting(sizes, message, tmp_path, capsys):
    train, calibration, test = sizes
    assert cli_main(["build", "--model", "organism", "--problems", "organism:arithmetic:train", "--train", train,
                     "--calibration", calibration, "--test", test, "--out", str(tmp_path / "b"),
                     "--max-new-tokens", "50"]) == 2
    assert message in _one_line_error(capsys, "build")
    assert not (tmp_path / "b").exists()


# ----- unlabelled prompts ----------------------------------------------------------------------------------------
def test_a_prompts_only_file_loads_with_ids_and_keeps_answers_where_given(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in (
        {"prompt": "What is 2 + 2?"}, {"problem": "What is 3 + 3?", "id": "q7"},
        {"question": "What is 4 + 4?", "answer": "8"})) + "\n", encoding="utf-8")
    rows = load_problems(str(path))
    assert [r["id"] for r in rows] == ["mine-0", "q7", "mine-2"]
    assert [r["question"] for r in rows] == ["What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?"]
    assert [r.get("answer") for r in rows] == [None, None, "8"]
    path.write_text(json.dumps({"text": "no known field"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'question', 'problem' or 'prompt'"):
        load_problems(str(path))


def test_organism_prompts_are_the_organism_problems_without_their_answers():
    labelled = load_problems("organism:compare:test", n=3)
    prompts = load_problems("organism:compare:test:prompts", n=3)
    assert [p["question"] for p in prompts] == [p["question"] for p in labelled]
    assert all("answer" not in p for p in prompts)


def test_cli_collect_with_gold_labels_on_prompts_exits_2_naming_agreement_labels(tmp_path, capsys):
    assert cli_main(["collect", "--model", "organism", "--problems", "organism:compare:train:prompts", "--n", "2",
                     "--out", str(tmp_path / "out")]) == 2
    assert "--labels agreement" in _one_line_error(capsys, "collect")
    assert not (tmp_path / "out").exists()


def test_calibrating_with_agreement_labels_records_them_and_relabels_the_test_table(runs):
    from lynx_hf.pipeline.events import relabel
    from lynx_hf.pipeline.train import load_probe_folder

    probe, _ = load_probe_folder(runs / "probe")
    cal, test = EventTable.load(runs / "calibration"), EventTable.load(runs / "test")
    lynx = calibrate_bundle(probe, cal, test, labels="agreement")
    assert lynx.metadata["labels"] == {"probe": "gold", "calibration": "agreement"}
    assert torch.equal(lynx.calibration.safe, relabel(cal, "agreement").safe)
    assert lynx.metadata["dropped_traces"]["test"] == len(relabel(test, "agreement").dropped)


def test_eval_reads_an_agreement_labelled_table_with_gold_accuracy_not_agreement(runs, bundle_dir, tmp_path, capsys):
    from lynx_hf.pipeline.events import relabel, write_settings

    test = EventTable.load(runs / "test")
    agree = relabel(test, "agreement")
    write_settings(tmp_path / "agree", agree.settings)
    agree.save_shard(tmp_path / "agree", 0)
    accuracy = {}
    for name, events in (("gold", runs / "test"), ("agreement", tmp_path / "agree")):
        out = tmp_path / f"eval-{name}"
        assert cli_main(["eval", "--bundle", str(bundle_dir), "--events", str(events), "--replay-only",
                         "--out", str(out)]) == 0
        rows = json.loads((out / "results.json").read_text())["rows"]
        accuracy[name] = {r["method"]: r["accuracy"] for r in rows}
    capsys.readouterr()
    if not agree.dropped:  # same traces: the same accuracies, read against gold either way
        assert accuracy["agreement"] == accuracy["gold"]
