"""Collection, event tables and the train/calibrate pipeline on the shipped model organism."""

import json
import logging
import os

import pytest
import torch

from lynx_hf import EventTable, Lynx, LynxConfigError, organism
from lynx_hf.cli import main as cli_main
from lynx_hf.pipeline.collect import Collector
from conftest import tiny_llama, tiny_qwen2
from lynx_hf.runtime.exit import answer_after_exit, exit_cut, exit_prefix

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
    from lynx_hf.runtime.capture import HiddenStateCapture

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


def test_event_tables_of_a_fine_tune_that_left_the_embeddings_alone_cannot_be_combined(collector, problems):
    import copy

    a = collector.collect_batch(problems[:2], seed=0)
    tuned = copy.deepcopy(collector.model)
    with torch.no_grad():
        tuned.model.layers[2].self_attn.q_proj.weight.mul_(1.1)
    other = Collector(tuned, collector.tokenizer, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400)
    assert other.settings["weights_sample"] == collector.settings["weights_sample"]
    b = EventTable.empty(other.settings, a.features.shape[1])
    with pytest.raises(LynxConfigError, match="layer_sample: the weights inside the model's layers differ"):
        EventTable.concat([a, b])
    old = EventTable.empty({k: v for k, v in collector.settings.items() if k != "layer_sample"}, a.features.shape[1])
    assert len(EventTable.concat([a, old])) == len(a)  # tables collected before the layer sample existed still mix


def test_a_bundle_built_from_a_collection_warns_on_a_fine_tune_of_its_model(collector):
    import copy

    from lynx_hf import Calibration, LynxProbe
    from lynx_hf.pipeline.train import build_bundle

    settings = collector.settings
    lynx = build_bundle(settings, LynxProbe(2 * settings["hidden_size"]),
                        Calibration(scores=[0.3, 0.9], safe=[False, True], question=[0, 1]))
    assert lynx.config.layer_sample == settings["layer_sample"] and len(settings["layer_sample"]) == 21
    tuned = copy.deepcopy(collector.model)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.1)
    with pytest.warns(UserWarning, match="inside the decoder layers differ"):
        lynx.attach(tuned, collector.tokenizer)


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
    library = logging.getLogger("lynx_hf")  # it propagates to the root logger only where transformers' does
    library.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="lynx_hf"):
            table = quiet.collect(problems[:4], tmp_path, batch_size=2, seed=0, progress=False)
    finally:
        library.removeHandler(caplog.handler)
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


def _reprefilled(model, tok, trace, cut, exit_ids, steps):
    return answer_after_exit(model, tok, torch.tensor([trace[:cut]]), [cut], exit_ids, max_new_tokens=steps)[0]


def _eos_that_ends_some_rows_early(model, tok, trace, cuts, exit_ids, steps):
    """A token one row emits at its third step, made EOS: rows then finish at different steps."""
    model.generation_config.eos_token_id = None
    return _reprefilled(model, tok, trace, cuts[1], exit_ids, steps).token_ids[2]


@pytest.mark.parametrize("make, attention", [(tiny_llama, "sdpa"), (tiny_llama, "eager"), (tiny_qwen2, "sdpa")])
def test_packed_answers_equal_reprefilling_each_cut(smollm2_tokenizer, make, attention):
    from transformers import DynamicCache

    from lynx_hf.runtime.forced import answer_from_shared_prefix, supports_packed_answers
    from lynx_hf.runtime.exit import cache_kwargs, exit_token_ids

    tok = smollm2_tokenizer
    model = make(vocab_size=len(tok), seed=7, attn_implementation=attention)
    assert supports_packed_answers(model)
    torch.manual_seed(2)
    trace = torch.randint(100, 2000, (60,)).tolist()
    cuts = [1, 9, 9, 23, 41, 59, 60]  # the first position, a repeated cut, the cache's full length
    exit_ids, steps = exit_token_ids(tok), 8
    model.generation_config.eos_token_id = _eos_that_ends_some_rows_early(model, tok, trace, cuts, exit_ids, steps)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([trace]), use_cache=True, **cache_kwargs(model, cache))
    packed = answer_from_shared_prefix(model, tok, cache, cuts, exit_ids, max_new_tokens=steps)
    fresh = [_reprefilled(model, tok, trace, cut, exit_ids, steps) for cut in cuts]
    assert [a.token_ids for a in packed] == [a.token_ids for a in fresh]
    assert len({len(a.token_ids) for a in fresh}) > 1  # rows left the packed batch at different steps
    for a, b in zip(packed, fresh):
        assert a.confidence == pytest.approx(b.confidence, rel=1e-4)


def test_packed_answers_refuse_a_cut_beyond_the_cache(smollm2_tokenizer):
    from transformers import DynamicCache

    from lynx_hf.runtime.forced import answer_from_shared_prefix
    from lynx_hf.runtime.exit import cache_kwargs, exit_token_ids

    model = tiny_llama(vocab_size=len(smollm2_tokenizer), seed=1)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.arange(100, 110)[None], use_cache=True, **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match="holds 10 positions but a cut is at 11"):
        answer_from_shared_prefix(model, smollm2_tokenizer, cache, [3, 11], exit_token_ids(smollm2_tokenizer))


def test_sliding_window_and_flash_attention_models_use_the_repeated_cache():
    from lynx_hf.runtime.forced import supports_packed_answers

    assert not supports_packed_answers(tiny_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0))
    flash = tiny_llama()
    flash.config._attn_implementation = "flash_attention_2"
    assert not supports_packed_answers(flash)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("construction", ["drop_cue", "keep_cue"])
def test_labels_of_a_cue_dense_trace_equal_reprefilling_each_event(smollm2_tokenizer, monkeypatch, packed,
                                                                   construction):
    import lynx_hf.runtime.forced as forced

    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok), seed=5)
    monkeypatch.setattr(forced, "supports_packed_answers", lambda m: packed)
    collector = Collector(model, tok, layers=(1, 2), exit_construction=construction, answer_max_new_tokens=6,
                          thinking="think")  # SmolLM2 has no thinking tokens: the trace spells <think> out
    text = "<think>\n" + " ".join(f"Step {i}: {i} plus {i} is {2 * i}. {cue}," for i, cue in
                                   enumerate(["Wait", "Hmm", "Alternatively", "Wait", "Hmm"] * 3))
    token_ids = tok(text, add_special_tokens=False)["input_ids"]
    events, features, answers = collector.label_trace(token_ids, 0)
    assert len(events) == 15 and features.shape[0] == 15
    for event, answer in zip(events, answers):
        cut = exit_cut(event.position, event.start, construction)
        assert answer.token_ids == _reprefilled(model, tok, token_ids, cut, collector.exit_ids, 6).token_ids


def test_packed_answers_accept_ids_beyond_the_tokenizer(smollm2_tokenizer):
    """Models whose embedding is larger than the tokenizer (R1-Distill-Qwen: 151,936 vs 151,665) may emit the
    extra ids; they hold no brace, so the answer runs to the token limit instead of failing."""
    from transformers import DynamicCache

    from lynx_hf.runtime.forced import answer_from_shared_prefix
    from lynx_hf.runtime.exit import cache_kwargs, exit_token_ids

    tok = smollm2_tokenizer
    extra = len(tok) + 3
    model = tiny_llama(vocab_size=len(tok) + 8, seed=1)
    model.generation_config.eos_token_id = None
    model.lm_head = torch.nn.Linear(32, len(tok) + 8, bias=True)
    torch.nn.init.zeros_(model.lm_head.weight)
    torch.nn.init.zeros_(model.lm_head.bias)
    model.lm_head.bias.data[extra] = 1.0
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.arange(100, 110)[None], use_cache=True, **cache_kwargs(model, cache))
    answers = answer_from_shared_prefix(model, tok, cache, [4, 10], exit_token_ids(tok), max_new_tokens=3)
    assert [a.token_ids for a in answers] == [[extra] * 3] * 2


# ----- agreement labels: no gold answers needed -------------------------------------------------------------------
def _prompts_only(problems):
    return [{"id": p["id"], "question": p["question"]} for p in problems]


def test_agreement_labels_check_each_forced_answer_against_the_traces_own_full_answer(collector, problems):
    from lynx_hf.pipeline.events import relabel, table_labels
    from lynx_hf.runtime.answers import answers_match

    model, tok = collector.model, collector.tokenizer
    agree = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=400, labels="agreement")
    table = agree.collect_batch(_prompts_only(problems[:6]), seed=4)
    assert table_labels(table) == "agreement" and table.settings["labels"] == "agreement"
    assert all(t["gold"] is None and t["correct"] is None for t in table.traces)  # no gold seen, none invented
    expected = [answers_match(a, table.traces[t]["answer"]) for a, t in zip(table.answers, table.trace.tolist())]
    assert table.safe.tolist() == expected and len(table) > 0
    # the same traces labelled with gold, then relabelled by agreement: the very same table (labels are a view of
    # the forced answers, not another sampling)
    gold = collector.collect_batch(problems[:6], seed=4)
    kept = [i for i, t in enumerate(gold.traces) if t["answer"] is not None]
    assert [gold.traces[i]["token_ids"] for i in kept] == [t["token_ids"] for t in table.traces]
    assert table.dropped == [t["id"] for t in gold.traces if t["answer"] is None]
    relabelled = relabel(gold, "agreement")
    assert relabelled.safe.tolist() == table.safe.tolist() and torch.equal(relabelled.features, table.features)
    assert relabelled.dropped == table.dropped
    assert torch.equal(relabel(relabelled, "gold").safe, gold.select_traces(kept).safe)  # and back
    with pytest.raises(LynxConfigError, match="no gold answer"):  # prompts only: nothing to go back to
        relabel(table, "gold")


def test_agreement_traces_without_a_full_answer_are_dropped_counted_and_survive_a_reload(collector, problems,
                                                                                         tmp_path, caplog):
    model, tok = collector.model, collector.tokenizer
    # 40 tokens: most traces are cut off before their boxed answer, so they have no reference
    agree = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=40, labels="agreement")
    with caplog.at_level(logging.WARNING):
        table = agree.collect(_prompts_only(problems[:8]), tmp_path / "agree", batch_size=4, seed=0, progress=False)
    assert table.dropped and table.n_traces + len(table.dropped) == 8
    assert all(t["answer"] is not None for t in table.traces)
    assert f"{len(table.dropped)} of 8 traces had no extractable full answer" in caplog.text
    reloaded = EventTable.load(tmp_path / "agree")
    assert reloaded.dropped == table.dropped and torch.equal(reloaded.safe, table.safe)


def test_gold_labels_on_problems_without_answers_are_refused_naming_agreement_labels(collector, problems):
    with pytest.raises(LynxConfigError, match="--labels agreement"):
        collector.collect_batch(_prompts_only(problems[:2]), seed=0)
    with pytest.raises(LynxConfigError, match="unknown labels 'silver'"):
        Collector(collector.model, collector.tokenizer, prompt_fn=organism.prompt, labels="silver")


def test_relabelling_by_agreement_drops_traces_without_a_full_answer_with_their_events():
    from lynx_hf.pipeline.events import relabel

    long = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    table = EventTable(settings={}, features=torch.arange(3.0).reshape(3, 1), safe=torch.tensor([True, False, True]),
                       trace=long(0, 0, 1), position=long(3, 5, 4), start=long(3, 5, 4), cue=long(0, 0, 0),
                       answer_length=long(1, 1, 1), answer_confidence=torch.ones(3), answers=["4", "5", "3"],
                       traces=[{"id": "q0", "gold": "4", "answer": "5"}, {"id": "q1", "gold": "3", "answer": None}])
    agree = relabel(table, "agreement")
    assert agree.n_traces == 1 and agree.dropped == ["q1"] and agree.safe.tolist() == [False, True]
    assert agree.features.flatten().tolist() == [0.0, 1.0]
