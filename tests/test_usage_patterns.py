"""Usage patterns a demanding transformers user tries, beyond those in test_runtime.py, on the shipped organism: each
gives the same result as its plain equivalent, or a clear error naming the fix (one test per pattern)."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch

from lynx_hf import Lynx, UnsupportedGenerationError, organism
from lynx_hf.runtime.answers import extract_boxed
from lynx_hf.runtime.exit import cache_kwargs
from organism_batch import GREEDY, organism_batch
from organism_batch import answers as _answers


@pytest.fixture(scope="module")
def setup():
    return organism_batch()


def test_answer_accepts_the_output_as_nested_lists_or_a_numpy_array(setup):
    model, tok, lynx, enc, (out, _, expected) = setup
    assert _answers(lynx.answer(out.tolist())) == expected
    assert _answers(lynx.answer(out.numpy())) == expected


@pytest.mark.parametrize("bad", ["some text", [[0.5, 1.5]], [[1, 2], [3]]])
def test_answer_on_something_that_is_not_token_ids_is_a_type_error_naming_the_fix(setup, bad):
    _, _, lynx, _, _ = setup
    with pytest.raises(TypeError, match="pass the output itself, unchanged"):
        lynx.answer(bad)


def test_answer_on_an_in_stream_output_returns_the_answers_it_already_holds(setup):
    model, tok, lynx, enc, _ = setup
    out = model.generate(**enc, logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()],
                         **GREEDY)
    records = lynx.last_exits
    with torch.no_grad():
        forwards = []
        handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
        try:
            answers = lynx.answer(out)
        finally:
            handle.remove()
    assert not forwards  # nothing generated again
    width = enc["input_ids"].shape[1]
    for row, (answer, record) in enumerate(zip(answers, records)):
        text = tok.decode(out[row, width:], skip_special_tokens=True)
        if record.exited and record.answered:
            assert answer.answer is not None and answer.text in text
        else:
            assert answer.answer == extract_boxed(text)


def test_a_lynx_and_its_own_stopping_criteria_in_one_list_decide_once(setup):
    model, tok, lynx, enc, (out, records, _) = setup
    both = model.generate(**enc, stopping_criteria=[lynx.stopper(), lynx.stopper()], **GREEDY)
    assert torch.equal(both, out) and lynx.last_exits == records


def test_return_dict_with_hidden_states_logits_and_scores_exits_and_answers_as_plain(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    full = model.generate(**enc, stopping_criteria=[lynx.stopper()], return_dict_in_generate=True, output_hidden_states=True,
                          output_logits=True, output_scores=True, **GREEDY)
    assert torch.equal(full.sequences, out) and lynx.last_exits == records
    assert len(full.hidden_states) == len(full.logits) == out.shape[1] - enc.input_ids.shape[1]
    assert _answers(lynx.answer(full)) == expected


def test_an_output_generated_under_inference_mode_is_answered_outside_it(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    with torch.inference_mode():
        inferred = model.generate(**enc, stopping_criteria=[lynx.stopper()], return_dict_in_generate=True, **GREEDY)
    assert torch.equal(inferred.sequences, out) and lynx.last_exits == records
    assert _answers(lynx.answer(inferred)) == expected  # reuses (and extends) the inference-mode cache


def test_a_model_cast_to_bfloat16_after_attach_exits_as_one_attached_in_bfloat16(setup):
    _, tok, _, enc, _ = setup
    cast, _ = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=cast, tokenizer=tok, confidence=0.9)
    cast.generate(**enc, stopping_criteria=[lynx.stopper()], max_new_tokens=20, do_sample=False)  # a float32 call first
    cast.to(torch.bfloat16)
    out = cast.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY)
    records, answers = lynx.last_exits, _answers(lynx.answer(out))
    fresh_model, _ = organism.load()
    fresh_model.to(torch.bfloat16)
    fresh = Lynx.from_pretrained(organism.BUNDLE_DIR, model=fresh_model, tokenizer=tok, confidence=0.9)
    assert torch.equal(fresh_model.generate(**enc, stopping_criteria=[fresh.stopper()], **GREEDY), out)
    assert fresh.last_exits == records and any(r.exited for r in records)
    assert _answers(fresh.answer(out)) == answers


def test_a_shallow_copy_has_its_own_settings_plug_ins_and_records(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    strict = copy.copy(lynx)
    strict.confidence = 0.99
    assert strict.threshold > lynx.threshold and strict.stopper() is not lynx.stopper()
    model.generate(**enc, stopping_criteria=[strict.stopper()], **GREEDY)
    assert {r.threshold for r in strict.last_exits} == {strict.threshold}
    assert lynx.last_exits == records  # the original neither ran that call nor changed its settings
    assert lynx.confidence == 0.9 and _answers(lynx.answer(out)) == expected
    with pytest.raises(ValueError, match="none of this Lynx's last"):
        strict.answer(out)  # the copy has no record of the original's calls


def test_a_deep_copy_shares_the_model_and_exits_like_the_original(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    twin = copy.deepcopy(lynx)
    assert twin.model is model and twin.tokenizer is tok and twin.probe is not lynx.probe
    assert torch.equal(model.generate(**enc, stopping_criteria=[twin.stopper()], **GREEDY), out)
    assert twin.last_exits == records and _answers(twin.answer(out)) == expected


def test_an_unpickled_lynx_attaches_on_first_use_and_exits_like_the_original(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    lynx.confidence = 0.95
    try:
        restored = pickle.loads(pickle.dumps(lynx))
    finally:
        lynx.confidence = 0.9
    assert restored.model is None and restored.confidence == 0.95
    restored.confidence = 0.9
    assert torch.equal(model.generate(**enc, stopping_criteria=[restored.stopper()], **GREEDY), out)
    assert restored.model is model and restored.last_exits == records
    assert _answers(restored.answer(out)) == expected


@pytest.mark.parametrize("options", [
    dict(do_sample=True, typical_p=0.9, eta_cutoff=3e-4, renormalize_logits=True),
    dict(do_sample=True, top_k=5, min_p=0.1, epsilon_cutoff=3e-4, top_h=0.5),
    dict(do_sample=False, bad_words_ids="exit"),
])
def test_the_in_stream_exit_text_survives_the_processors_transformers_runs_after_it(setup, options):
    model, tok, lynx, enc, _ = setup
    options = dict(options)
    if options.get("bad_words_ids") == "exit":  # the user bans the end of thinking (budget forcing), Lynx forces it
        options["bad_words_ids"] = [tok("</think>", add_special_tokens=False).input_ids]
    torch.manual_seed(0)
    out = model.generate(**enc, logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()],
                         max_new_tokens=300, **options)
    exited = [(row, r) for row, r in enumerate(lynx.last_exits) if r.exited]
    assert len(exited) >= 4
    n = len(lynx.exit_ids)
    for row, record in exited:
        forced = out[row, record.position + 2: record.position + 2 + n].tolist()
        assert forced == lynx.exit_ids  # cue, the token that ended its word, then the exit text verbatim


def test_a_compiled_forward_either_exits_as_uncompiled_or_is_refused_naming_compilation(setup):
    _, tok, _, enc, _ = setup
    model, _ = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, guarantee="event")  # row 0 exits
    row = {k: v[:1, v.shape[1] - int(enc.attention_mask[0].sum()):] for k, v in enc.items()}
    plain = model.generate(**row, stopping_criteria=[lynx.stopper()], **GREEDY)
    records = lynx.last_exits
    assert records[0].exited
    model.forward = torch.compile(model.forward, backend="eager")
    model.generate(**row, do_sample=False, max_new_tokens=2)  # compiled without hooks: dynamo (torch 2.x) then
    try:                                                      # skips hooks added later, by default
        compiled = model.generate(**row, stopping_criteria=[lynx.stopper()], **GREEDY)
    except UnsupportedGenerationError as error:
        assert "compiled forward" in str(error)
    else:
        assert torch.equal(compiled, plain) and lynx.last_exits == records


def test_threads_sharing_one_lynx_each_read_their_own_calls_records(setup):
    model, tok, lynx, enc, (out, records, _) = setup
    halves = [{k: v[rows] for k, v in enc.items()} for rows in (slice(0, 4), slice(4, 8))]
    expected = [records[:4], records[4:]]
    first_done, second_done = threading.Event(), threading.Event()
    seen: dict[int, list] = {}

    def work(index: int) -> None:
        if index == 1:
            first_done.wait()
        model.generate(**halves[index], stopping_criteria=[lynx.stopper()], **GREEDY)
        (first_done if index == 0 else second_done).set()
        second_done.wait()  # thread 0 reads its records after thread 1's call ran
        seen[index] = (lynx.last_exits, lynx.stopper().last_exits)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index in range(2):
        assert seen[index][0] == seen[index][1] == expected[index]
    assert seen[0][0] != seen[1][0]


def test_in_stream_calls_of_finished_threads_are_not_kept_alive(setup):
    """A server that answers each request in a new thread must not accumulate one call's state per thread: only the
    bundle's last `ANSWERABLE_CALLS` calls (what `answer(out)` can match) are kept."""
    from lynx_hf.runtime.bundle import ANSWERABLE_CALLS

    model, tok, lynx, enc, _ = setup
    processor = lynx.exit_processor()
    calls = []

    def work():
        model.generate(**enc, logits_processor=[processor], stopping_criteria=[lynx.answer_stopper()],
                       max_new_tokens=8, do_sample=False)
        calls.append(weakref.ref(processor.calls.last))

    for _ in range(ANSWERABLE_CALLS + 4):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    gc.collect()
    assert len(calls) == ANSWERABLE_CALLS + 4 and sum(ref() is not None for ref in calls) <= ANSWERABLE_CALLS


def test_an_outputs_cache_reused_by_a_later_generate_call_is_recomputed_with_a_warning(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    full = model.generate(**enc, stopping_criteria=[lynx.stopper()], return_dict_in_generate=True, **GREEDY)
    cache = full.cache if getattr(full, "cache", None) is not None else full.past_key_values
    follow_up = torch.cat([full.sequences, full.sequences[:, -3:]], dim=1)  # the next turn, reusing the cache
    mask = torch.cat([enc.attention_mask, torch.ones_like(follow_up[:, enc.input_ids.shape[1]:])], dim=1)
    model.generate(input_ids=follow_up, attention_mask=mask, **cache_kwargs(model, cache), do_sample=False,
                   max_new_tokens=4)
    with pytest.warns(UserWarning, match="changed after generate returned it"):
        assert _answers(lynx.answer(full)) == expected


def test_a_processor_of_yours_after_the_exit_processor_is_refused_naming_the_order(setup):
    model, tok, lynx, enc, _ = setup
    think_end = tok("</think>", add_special_tokens=False).input_ids

    def ban_think_end(input_ids, scores):  # after the exit processor it would turn the forced "</think>" into "<s>"
        return scores.index_fill(-1, torch.tensor(think_end), -float("inf"))

    with pytest.raises(UnsupportedGenerationError, match=r"put lynx.exit_processor\(\) last"):
        model.generate(**enc, logits_processor=[lynx.exit_processor(), ban_think_end],
                       stopping_criteria=[lynx.answer_stopper()], **GREEDY)
    out = model.generate(**enc, logits_processor=[ban_think_end, lynx.exit_processor()],
                         stopping_criteria=[lynx.answer_stopper()], **GREEDY)
    exited = [(row, r) for row, r in enumerate(lynx.last_exits) if r.exited]
    assert exited and all(out[row, r.position + 2: r.position + 2 + len(lynx.exit_ids)].tolist() == lynx.exit_ids
                          for row, r in exited)


def test_an_output_answered_after_the_model_was_cast_to_bfloat16_is_answered_by_the_cast_model(setup):
    _, tok, _, enc, _ = setup
    model, _ = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    out = model.generate(**enc, stopping_criteria=[lynx.stopper()], return_dict_in_generate=True, **GREEDY)
    model.to(torch.bfloat16)  # the float32 cache in `out` cannot serve the cast model
    assert _answers(lynx.answer(out)) == _answers(lynx.answer(out.sequences))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_answer_refuses_a_token_budget_that_is_not_a_positive_integer(setup, bad):
    _, _, lynx, _, (out, _, _) = setup
    with pytest.raises(ValueError, match="positive number of answer tokens"):
        lynx.answer(out, max_new_tokens=bad)


def test_custom_generate_without_an_attention_mask_infers_it_from_the_padding_as_plain_generate(setup, tmp_path,
                                                                                                 monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path))  # transformers copies the recipe it runs there
    model, tok, _, enc, _ = setup
    common = dict(do_sample=False, max_new_tokens=60)
    plain = model.generate(input_ids=enc.input_ids, **common)  # plain generate infers the mask from the pad token
    assert torch.equal(plain, model.generate(**enc, **common))
    out = model.generate(input_ids=enc.input_ids, custom_generate=str(organism.BUNDLE_DIR), trust_remote_code=True,
                         tokenizer=tok, shadow=True, **common)
    assert torch.equal(out[:, : plain.shape[1]], plain)


def test_the_shipped_organism_bundle_carries_the_current_custom_generate_recipe():
    from lynx_hf.runtime.bundle_files import CUSTOM_GENERATE_SOURCE

    shipped = organism.BUNDLE_DIR / "custom_generate" / "generate.py"
    assert shipped.read_bytes() == CUSTOM_GENERATE_SOURCE.read_bytes()


def test_in_stream_rows_record_their_closed_box_without_the_answer_stopper(setup):
    model, tok, lynx, enc, _ = setup
    out = model.generate(**enc, logits_processor=[lynx.exit_processor()], **GREEDY)  # rows write on until EOS
    exited = [(row, r) for row, r in enumerate(lynx.last_exits) if r.exited]
    assert len(exited) >= 4
    for row, record in exited:
        after = tok.decode(out[row, record.position + 2 + len(lynx.exit_ids):], skip_special_tokens=True)
        assert record.answered is ("}" in after)
    assert any(r.answered for _, r in exited)


def test_classifier_free_guidance_is_refused_by_name(setup):
    model, tok, lynx, enc, _ = setup
    with pytest.raises(UnsupportedGenerationError, match="guidance_scale"):  # it runs a second forward every step
        model.generate(**enc, stopping_criteria=[lynx.stopper()], guidance_scale=1.5, do_sample=False, max_new_tokens=5)


def test_a_lynx_attached_to_a_peft_model_reads_the_model_inside_it(setup):
    from peft import LoraConfig, get_peft_model

    _, tok, _, enc, (out, records, expected) = setup
    base, _ = organism.load()
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()  # LoRA B = 0
    with pytest.warns(UserWarning, match="active, unmerged adapter"):  # a trained one would void the calibration
        # PeftModel.generate runs `base`; the per-event rule, as the reference
        lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=wrapped, tokenizer=tok, guarantee="event")
    assert torch.equal(wrapped.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY), out)
    assert lynx.last_exits == records and _answers(lynx.answer(out)) == expected


def test_without_an_eos_token_the_records_end_at_the_exit_as_with_one(setup):
    model, tok, lynx, enc, (out, records, expected) = setup
    # Without an EOS criterion transformers keeps writing model tokens (not padding) into rows a criterion stopped.
    unpadded = model.generate(**enc, stopping_criteria=[lynx.stopper()], eos_token_id=None, **GREEDY)
    assert lynx.last_exits == records  # cues written after a row's exit are not counted
    assert _answers(lynx.answer(unpadded)) == expected


def test_an_exit_processor_wrapped_in_a_processor_of_yours_exits_as_when_listed_directly(setup):
    model, tok, lynx, enc, _ = setup
    stream = dict(stopping_criteria=[lynx.answer_stopper()], **GREEDY)
    direct = model.generate(**enc, logits_processor=[lynx.exit_processor()], **stream)
    records = lynx.last_exits

    class Timed:  # e.g. a wrapper that logs or times the processors it calls
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, input_ids, scores):
            return self.inner(input_ids, scores)

    assert torch.equal(model.generate(**enc, logits_processor=[Timed(lynx.exit_processor())], **stream), direct)
    assert lynx.last_exits == records


def test_a_stopping_criteria_list_of_yours_nested_in_the_call_and_reused_starts_a_new_call_each_time(setup):
    from transformers import StoppingCriteriaList

    model, tok, lynx, enc, (out, records, _) = setup
    mine = StoppingCriteriaList([lynx.stopper()])  # the same inner list object in both calls
    first = {k: v[:3] for k, v in enc.items()}
    model.generate(**first, stopping_criteria=[lynx.stopper()], **GREEDY)
    expected = lynx.last_exits
    model.generate(**first, stopping_criteria=[mine], **GREEDY)
    assert lynx.last_exits == expected
    assert torch.equal(model.generate(**enc, stopping_criteria=[mine], **GREEDY), out)
    assert lynx.last_exits == records


def test_in_stream_answers_are_greedy_as_the_labels_whatever_the_sampling_settings(setup):
    # The guarantee is about the greedy answer after the exit text (how the labels were made); a sampled trace must
    # still get that answer, not a sampled one (at T=1.2 some sampled answers differ from the greedy one).
    model, tok, lynx, _, _ = setup
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=32, seed=3)]
    enc = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
              add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()],
                         do_sample=True, temperature=1.2, max_new_tokens=300)
    answered = [(row, r) for row, r in enumerate(lynx.last_exits) if r.exited and r.answered]
    assert len(answered) >= 16
    for row, record in answered:
        start = record.position + 2 + len(lynx.exit_ids)  # cue, the token ending its word, exit text, then the answer
        answer = [t for t in out[row, start:].tolist() if t != tok.pad_token_id]
        pad = enc.input_ids.shape[1] - int(enc.attention_mask[row].sum())  # left padding of this row
        prefix = out[row, pad:start][None]
        greedy = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                                max_new_tokens=len(answer))
        assert greedy[0, prefix.shape[1]:].tolist() == answer, row
