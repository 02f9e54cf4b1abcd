"""Collection, event tables and the train/calibrate pipeline on the shipped model organism."""

import json
import logging
import os

import pytest
import torch

from lynx_hf import EventTable, Lynx, LynxConfigError, organism
from lynx_hf.cli import main as cli_main
from lynx_hf.collect import Collector
from lynx_hf.exit import answer_after_exit, exit_cut, exit_prefix

pytestmark = pytest.mark.skipif(not (organism.MODEL_DIR / "config.json").exists(), reason="organism not trained")


@pytest.fixture(scope="module")
def collector():
    model, tok = organism.load()
    return Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400)


@pytest.fixture(scope="module")
def problems():
    return organism.problems("arithmetic", "train", n=12, seed=1)


def test_cached_batched_labels_equal_reprefilling_each_prefix(collector, problems):
    token_ids, prompt_length = collector.sample(problems[:2], seed=3)[0]
    events, features, cached = collector.label_trace(token_ids, prompt_length)
    assert len(events) >= 1 and features.shape == (len(events), 2 * collector.settings["hidden_size"])
    for event, answer in zip(events, cached):
        cut = exit_cut(event.position, event.start)
        fresh = answer_after_exit(collector.model, collector.tokenizer, torch.tensor([token_ids[:cut]]), [cut],
                                  collector.exit_ids, max_new_tokens=collector.answer_max_new_tokens)[0]
        assert fresh.token_ids == answer.token_ids
        assert exit_prefix(token_ids, cut, collector.exit_ids)[-len(collector.exit_ids):] == collector.exit_ids


def test_features_equal_what_the_live_hooks_see(collector, problems):
    """One teacher-forced forward gives the hidden states that decoding computed, up to numerics."""
    from lynx_hf.capture import HiddenStateCapture

    token_ids, prompt_length = collector.sample(problems[:1], seed=5)[0]
    events, features, _ = collector.label_trace(token_ids, prompt_length)
    model = collector.model
    with HiddenStateCapture(model, collector.layers) as capture:
        for event, expected in zip(events, features):
            model(torch.tensor([token_ids[: event.position + 1]]))
            torch.testing.assert_close(capture.features()[0], expected, rtol=1e-4, atol=1e-4)


def test_an_interrupted_collection_resumes_and_loses_nothing(collector, problems, tmp_path):
    full = collector.collect(problems, tmp_path / "a", batch_size=4, seed=0, progress=False)
    os.remove(tmp_path / "a" / "shard-00001.safetensors")  # as if the run died while writing shard 1
    resumed = collector.collect(problems, tmp_path / "a", batch_size=4, seed=0, progress=False)
    assert [t["token_ids"] for t in resumed.traces] == [t["token_ids"] for t in full.traces]
    assert torch.equal(resumed.safe, full.safe) and torch.equal(resumed.features, full.features)


def test_resuming_with_other_settings_is_a_clear_error(collector, problems, tmp_path):
    collector.collect(problems[:4], tmp_path, batch_size=4, seed=0, progress=False)
    other = Collector(collector.model, collector.tokenizer, layers=(1,), prompt_fn=organism.prompt,
                      max_new_tokens=400)
    with pytest.raises(LynxConfigError, match="layers"):
        other.collect(problems[:4], tmp_path, batch_size=4, seed=0, progress=False)


def test_resuming_with_re_trained_weights_of_the_same_architecture_is_a_clear_error(collector, problems, tmp_path):
    import copy

    collector.collect(problems[:4], tmp_path, batch_size=4, seed=0, progress=False)
    retrained = copy.deepcopy(collector.model)
    with torch.no_grad():
        retrained.get_input_embeddings().weight.mul_(1.5)
    other = Collector(retrained, collector.tokenizer, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400)
    with pytest.raises(LynxConfigError, match="weights differ"):
        other.collect(problems[:4], tmp_path, batch_size=4, seed=0, progress=False)


def test_mismatched_event_tables_cannot_be_combined(collector, problems, tmp_path):
    a = collector.collect_batch(problems[:2], seed=0)
    b = collector.collect_batch(problems[2:4], seed=0)
    b.settings = {**b.settings, "layers": [1, 2, 3]}
    with pytest.raises(LynxConfigError, match="Mismatched settings"):
        EventTable.concat([a, b])


def test_a_dataset_without_answers_is_rejected_with_the_fix(collector):
    with pytest.raises(ValueError, match="gold 'answer'"):
        collector.collect_batch([{"id": "p1", "question": "What is 2 + 2?"}], seed=0)


def test_traces_without_cues_are_counted_and_collection_keeps_going(collector, problems, tmp_path, caplog):
    # a cue the organism never writes: every trace is cue-less
    quiet = Collector(collector.model, collector.tokenizer, cues=("perhaps",), layers=(2,),
                      prompt_fn=organism.prompt, max_new_tokens=400)
    with caplog.at_level(logging.WARNING):
        table = quiet.collect(problems[:4], tmp_path, batch_size=2, seed=0, progress=False)
    assert table.n_traces == 4 and len(table) == 0
    assert "4 of 4 traces had no cue event" in caplog.text


def test_cli_collect_train_calibrate_writes_a_bundle_that_loads(tmp_path):
    runs = tmp_path
    for split, n in (("train", 24), ("calibration", 16)):
        assert cli_main(["collect", "--model", "organism", "--problems", f"organism:arithmetic:{split}", "--n", str(n),
                         "--out", str(runs / split), "--layers", "2", "4", "--batch-size", "8",
                         "--max-new-tokens", "400"]) == 0
    assert cli_main(["train", "--events", str(runs / "train"), "--out", str(runs / "probe"), "--max-epochs", "20"]) == 0
    assert cli_main(["calibrate", "--probe", str(runs / "probe"), "--events", str(runs / "calibration"),
                     "--out", str(runs / "bundle")]) == 0
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(runs / "bundle", model=model, tokenizer=tok)
    assert lynx.config.layers == [2, 4] and lynx.calibration.n_events > 0
    meta = json.loads((runs / "bundle" / "calibration.json").read_text())["metadata"]
    assert 0.0 <= meta["calibration_auroc"] <= 1.0


@pytest.mark.slow
def test_two_process_collection_equals_one_process(tmp_path):
    """`accelerate launch --num_processes 2` shards by index and seeds per shard: the same tables as one process."""
    import subprocess
    import sys
    from pathlib import Path

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    args = ["-m", "lynx_hf.cli", "collect", "--model", "organism", "--problems", "organism:arithmetic:train",
            "--n", "24", "--batch-size", "6", "--max-new-tokens", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, timeout=600, capture_output=True)
    assert cli_main([*args[2:], "--out", str(tmp_path / "one")]) == 0
    one, two = EventTable.load(tmp_path / "one"), EventTable.load(tmp_path / "two")
    assert [t["token_ids"] for t in one.traces] == [t["token_ids"] for t in two.traces]
    assert torch.equal(one.safe, two.safe) and one.answers == two.answers
    torch.testing.assert_close(one.features, two.features)


def test_a_missing_shard_at_merge_is_named(collector, problems, tmp_path):
    from lynx_hf import CorruptedBundleError

    collector.collect(problems[:8], tmp_path, batch_size=4, seed=0, progress=False)
    os.remove(tmp_path / "shard-00001.safetensors")
    with pytest.raises(CorruptedBundleError, match=r"shard\(s\) \[1\] are missing"):
        EventTable.load(tmp_path)
