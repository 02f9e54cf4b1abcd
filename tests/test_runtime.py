"""Ordinary usage patterns on the shipped organism: each `generate` call's Lynx state travels with its output, and
every transformers option either works or is refused with a message that says why (one test per pattern)."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from lynx_hf import Lynx, NotAttachedError, UnsupportedGenerationError, organism
from lynx_hf.runtime.exit import answer_after_exit, cache_kwargs, exit_token_ids

BATCH = 32


@pytest.fixture(scope="module")
def setup():
    model, tok = organism.load()
    # the per-event rule exits on more rows than the default per-question guarantee: the patterns below need exits
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9, guarantee="event")
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=2 * BATCH)]
    batches = [
        tok([organism.prompt(tok, q) for q in part], return_tensors="pt", padding=True, add_special_tokens=False)
        for part in (questions[:BATCH], questions[BATCH:])
    ]
    assert (batches[0].attention_mask == 0).any()  # left padding is part of every pattern below
    return model, tok, lynx, batches


def _sample(model, enc, criteria, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    options = dict(do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=300)
    options.update(kwargs)
    return model.generate(**enc, stopping_criteria=criteria, **options)


def _answers(answers):
    return [(a.token_ids, a.answer) for a in answers]


def _exited_rows(lynx) -> int:
    return sum(r.exited for r in lynx.last_exits)


def test_answering_the_same_output_twice_gives_the_same_answers(setup):
    model, tok, lynx, (enc, _) = setup
    out = _sample(model, enc, [lynx.stopper()])
    assert _exited_rows(lynx) >= 10
    first = lynx.answer(out)
    assert _answers(lynx.answer(out)) == _answers(first)


def test_a_plain_forward_between_generate_and_answer_changes_nothing(setup):
    model, tok, lynx, (enc, other) = setup
    out = _sample(model, enc, [lynx.stopper()])
    expected = _answers(lynx.answer(out))
    model(input_ids=other.input_ids[:3, :7])  # a cache-less forward with another batch and mask
    assert _answers(lynx.answer(out)) == expected


def test_answer_uses_the_exits_of_the_call_that_produced_the_output(setup):
    model, tok, lynx, (enc_a, enc_b) = setup
    out_a = _sample(model, enc_a, [lynx.stopper()], seed=1)
    records_a, expected_a = lynx.last_exits, _answers(lynx.answer(out_a))
    out_b = _sample(model, enc_b, [lynx.stopper()], seed=2)
    assert lynx.last_exits != records_a
    assert _answers(lynx.answer(out_a)) == expected_a
    assert len(lynx.answer(out_b)) == BATCH


def test_answer_on_the_output_of_a_generate_that_never_used_lynx_is_a_clear_error(setup):
    model, tok, lynx, (enc, _) = setup
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    with pytest.raises(ValueError, match="none of this Lynx's last"):
        lynx.answer(out)


def test_turning_shadow_on_after_a_stop_run_does_not_rewrite_its_records(setup):
    model, tok, lynx, (enc, _) = setup
    out = _sample(model, enc, [lynx.stopper()], seed=3)
    records, answers = lynx.last_exits, _answers(lynx.answer(out))
    lynx.shadow = True
    try:
        assert lynx.last_exits == records and any(r.exited for r in records)
        assert _answers(lynx.answer(out)) == answers
    finally:
        lynx.shadow = False


def test_changing_confidence_after_a_run_keeps_that_runs_threshold(setup):
    model, tok, lynx, (enc, _) = setup
    out = _sample(model, enc, [lynx.stopper()], seed=4)
    records, answers = lynx.last_exits, _answers(lynx.answer(out))
    lynx.confidence = 0.5
    try:
        assert lynx.last_exits == records and _answers(lynx.answer(out)) == answers
    finally:
        lynx.confidence = 0.9


def test_answering_a_return_dict_output_twice_recomputes_the_consumed_cache(setup):
    model, tok, lynx, (enc, _) = setup
    out = _sample(model, enc, [lynx.stopper()], seed=5, return_dict_in_generate=True)
    first = _answers(lynx.answer(out))
    with pytest.warns(UserWarning, match="consumed"):
        second = _answers(lynx.answer(out))
    assert second == first == _answers(lynx.answer(out.sequences))


def test_a_lynx_attached_to_another_model_refuses_to_read_it(setup):
    model, tok, _, (enc, _) = setup
    other, _ = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=other, tokenizer=tok)
    with pytest.raises(NotAttachedError, match=r"lynx.attach\(model\)"):
        _sample(model, enc, [lynx.stopper()])
    lynx.attach(model, tok)
    _sample(model, enc, [lynx.stopper()])
    assert _exited_rows(lynx) > 0


def test_the_used_by_line_without_model_attaches_on_first_use_and_exits_like_an_attached_lynx(setup):
    model, tok, _, (enc, _) = setup
    attached = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9)
    out = _sample(model, enc, [attached], seed=6)
    expected = attached.last_exits
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.9)
    assert lynx.model is None
    assert torch.equal(_sample(model, enc, [lynx], seed=6), out)  # the line users copy, verbatim
    assert lynx.model is model and lynx.last_exits == expected
    assert _answers(lynx.answer(out)) == _answers(attached.answer(out))


def test_a_lynx_loaded_without_model_follows_a_reloaded_model(setup):
    model, tok, _, (enc, _) = setup
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.9)
    out = _sample(model, enc, [lynx.stopper()], seed=7)
    expected = lynx.last_exits
    reloaded, _ = organism.load()
    assert torch.equal(_sample(reloaded, enc, [lynx.stopper()], seed=7), out)
    assert lynx.model is reloaded and lynx.last_exits == expected


def test_no_hook_stays_on_the_model_outside_generate_calls_that_use_lynx(setup):
    model, tok, lynx, (enc, _) = setup
    layers = [m for m in model.modules() if m._forward_hooks]
    assert layers == []  # attached, but nothing hooked: plain forwards and plain generate pay nothing
    seen = []

    class Spy(torch.nn.Module):
        def __call__(self, input_ids, scores):
            seen.append(sum(len(m._forward_hooks) for m in model.modules()))
            return scores

    model.generate(**enc, logits_processor=[Spy()], stopping_criteria=[lynx.stopper()], max_new_tokens=3, do_sample=False)
    assert seen[-1] == len(lynx.config.layers)
    assert [m for m in model.modules() if m._forward_hooks] == []


def test_two_threads_each_with_its_own_lynx_exit_as_when_run_one_after_the_other(setup):
    model, tok, _, (enc_a, enc_b) = setup
    lynxes = [Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=c) for c in (0.9, 0.8)]
    jobs = list(zip(lynxes, (enc_a, enc_b)))
    greedy = dict(do_sample=False, max_new_tokens=200)
    sequential = []
    for lynx, enc in jobs:
        out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **greedy)
        sequential.append((out, lynx.last_exits))
    results: dict[int, list] = {0: [], 1: []}
    errors = []

    def work(index: int) -> None:
        lynx, enc = jobs[index]
        try:
            for _ in range(3):
                out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **greedy)
                results[index].append((out, lynx.last_exits))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for index, (out, records) in enumerate(sequential):
        assert any(r.exited for r in records)
        for got, got_records in results[index]:
            assert torch.equal(got, out) and got_records == records


def test_continuing_from_an_output_without_a_cache_is_a_new_call(setup):
    model, tok, lynx, (enc, _) = setup
    row = {k: v[:1, v.shape[1] - int(enc.attention_mask[0].sum()):] for k, v in enc.items()}
    greedy = dict(stopping_criteria=[lynx.stopper()], do_sample=False, use_cache=False)
    first = model.generate(**row, max_new_tokens=300, **greedy)
    assert lynx.last_exits[0].exited
    uncached = model.generate(input_ids=first, max_new_tokens=60, **greedy)  # one token longer than the last step
    records = lynx.last_exits
    cached = model.generate(input_ids=first, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=60)
    assert torch.equal(uncached, cached) and records == lynx.last_exits


def test_static_cache_outputs_are_answered_like_dynamic_ones(setup):
    model, tok, lynx, (enc, _) = setup
    greedy = dict(do_sample=False, max_new_tokens=200, return_dict_in_generate=True)
    dynamic = model.generate(**enc, stopping_criteria=[lynx.stopper()], **greedy)
    expected = _answers(lynx.answer(dynamic))
    static = model.generate(**enc, stopping_criteria=[lynx.stopper()], cache_implementation="static", **greedy)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert _answers(lynx.answer(static)) == expected


def test_chunked_prefill_gives_the_same_exits(setup):
    model, tok, lynx, (enc, _) = setup
    plain = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=200)
    expected = lynx.last_exits
    chunked = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=200,
                             prefill_chunk_size=16)
    assert torch.equal(chunked, plain) and lynx.last_exits == expected


def test_a_prefilled_prefix_cache_gives_the_same_exits_and_answers(setup):
    model, tok, lynx, _ = setup
    question = organism.problems("arithmetic", "test", n=1)[0]["question"]
    ids = tok(organism.prompt(tok, question), return_tensors="pt", add_special_tokens=False).input_ids
    plain = model.generate(input_ids=ids, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=300)
    expected, answers = lynx.last_exits, _answers(lynx.answer(plain))
    assert expected[0].exited
    from transformers import DynamicCache

    prefix = DynamicCache(config=model.config)
    with torch.no_grad():  # a shared system prompt, served once
        model(input_ids=ids[:, :6], **cache_kwargs(model, prefix), use_cache=True)
    reused = model.generate(input_ids=ids, **cache_kwargs(model, copy.deepcopy(prefix)), stopping_criteria=[lynx.stopper()],
                            do_sample=False, max_new_tokens=300, return_dict_in_generate=True)
    assert torch.equal(reused.sequences, plain)
    # same decisions, positions and cues; the probe score is computed from a prefill-then-decode cache here, so it
    # may differ in the last float32 bits (it did on the v3 organism: 0.93790770 vs 0.93790781)
    assert [dataclasses.replace(r, score=0.0) for r in lynx.last_exits] == [
        dataclasses.replace(r, score=0.0) for r in expected]
    assert [r.score for r in lynx.last_exits] == pytest.approx([r.score for r in expected], rel=1e-5)
    assert _answers(lynx.answer(reused)) == answers


def test_inputs_embeds_without_input_ids_is_refused_with_the_fix(setup):
    model, tok, lynx, (enc, _) = setup
    embeds = model.get_input_embeddings()(enc.input_ids)
    with pytest.raises(UnsupportedGenerationError, match="Pass the prompt's ids too"):
        model.generate(inputs_embeds=embeds, attention_mask=enc.attention_mask, stopping_criteria=[lynx.stopper()],
                       max_new_tokens=20)


def test_inputs_embeds_with_the_prompt_ids_exits_as_with_ids_alone(setup):
    model, tok, lynx, (enc, _) = setup
    plain = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=200)
    expected = lynx.last_exits
    embeds = model.get_input_embeddings()(enc.input_ids)
    out = model.generate(input_ids=enc.input_ids, inputs_embeds=embeds, attention_mask=enc.attention_mask,
                         stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=200)
    assert torch.equal(out, plain) and lynx.last_exits == expected


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_rows_are_answered_as_if_alone(setup, family):
    _, tok, _, _ = setup
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=0, **common)).eval()
    exit_ids = exit_token_ids(tok)
    prompts = torch.randint(5, len(tok), (3, 40))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[2, :9] = 0  # left padding
    out = model.generate(input_ids=prompts, attention_mask=mask[:, :40], max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    sequences = out.sequences
    cuts = [14, 49, 40]  # row 0's window before its cut is long gone from the sliding cache generate returns
    cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
    together = answer_after_exit(model, tok, sequences, cuts, exit_ids, attention_mask=mask, past_key_values=cache,
                                 max_new_tokens=6)
    for row, cut in enumerate(cuts):
        alone_ids = sequences[row, :cut][mask[row, :cut].bool()][None]
        alone = answer_after_exit(model, tok, alone_ids, [alone_ids.shape[1]], exit_ids, max_new_tokens=6)
        assert together[row].token_ids == alone[0].token_ids
        assert together[row].confidence == pytest.approx(alone[0].confidence, abs=1e-5)


def test_deciding_at_every_step_exits_like_deciding_only_where_a_cue_waits(setup, monkeypatch):
    model, tok, lynx, (enc, _) = setup
    out = _sample(model, enc, [lynx.stopper()], seed=8)
    expected, answers = lynx.last_exits, _answers(lynx.answer(out))
    import lynx_hf.runtime.monitor

    monkeypatch.setattr(lynx_hf.runtime.monitor.HostMirror, "read", lambda self: 2**62)  # the probe runs every step
    assert torch.equal(_sample(model, enc, [lynx.stopper()], seed=8), out)
    assert lynx.last_exits == expected and _answers(lynx.answer(out)) == answers
    processed = model.generate(**enc, logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()],
                               do_sample=False, max_new_tokens=300)
    stream = lynx.last_exits
    monkeypatch.undo()
    assert torch.equal(model.generate(**enc, logits_processor=[lynx.exit_processor()],
                                      stopping_criteria=[lynx.answer_stopper()], do_sample=False, max_new_tokens=300),
                       processed)
    assert lynx.last_exits == stream and any(r.exited for r in stream)


def test_a_bundles_recent_calls_do_not_keep_a_dropped_model_alive(setup):
    import gc
    import weakref

    _, tok, _, (enc, _) = setup
    model, _ = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.9)
    out = _sample(model, enc, [lynx.stopper()])
    gone = weakref.ref(model)
    lynx.detach()
    del model
    gc.collect()
    assert gone() is None
    with pytest.raises(UnsupportedGenerationError, match="no longer exists"):
        lynx.answer(out)


def test_both_plug_ins_of_one_lynx_in_one_call_keep_their_own_state(setup):
    model, tok, lynx, (enc, _) = setup
    stop_only = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=300)
    expected = lynx.stopper().last_exits
    both = model.generate(**enc, logits_processor=[lynx.exit_processor()],
                          stopping_criteria=[lynx.answer_stopper(), lynx.stopper()], do_sample=False, max_new_tokens=300)
    # stop mode decides at the same step, before the processor could force anything: the same output and records
    assert torch.equal(both, stop_only) and lynx.stopper().last_exits == expected
