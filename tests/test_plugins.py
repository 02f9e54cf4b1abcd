"""The generate plug-ins on a scripted model with SmolLM2's real tokenizer: where they exit, what they record, and
what they refuse."""

import pytest
import torch

from lynx_hf import LynxConfigError, LynxProbe, UnsupportedGenerationError
from lynx_hf.runtime.exit import answer_after_exit, exit_cut
from scripted import PROMPT, SCRIPT, ScriptProcessor, bundle, scripted_model


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = scripted_model(tok)
    enc = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    return model, tok, enc


def _generate(model, enc, processors=(), criteria=(), **kwargs):
    return model.generate(**enc, logits_processor=list(processors), stopping_criteria=list(criteria),
                          max_new_tokens=60, do_sample=False, **kwargs)


def _script(tok, enc, **kwargs):
    return ScriptProcessor(tok, [enc.input_ids.shape[1]], [SCRIPT], **kwargs)


def _cue_index(tok, enc, out, word):
    prompt_length = enc.input_ids.shape[1]
    for i in range(prompt_length, out.shape[1]):
        if tok.decode(out[0, prompt_length:i + 1]).endswith(word):
            return i
    raise AssertionError(f"{word} not in output")


def test_used_by_line_stops_right_after_the_first_confident_cue(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    out = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()])
    record = lynx.last_exits[0]
    cue = _cue_index(tok, enc, out, "Wait")
    assert record.exited and record.cue == "wait" and record.position == cue
    assert out.shape[1] == cue + 2  # the token after the cue confirms the word ended, then the row stops
    assert record.score == pytest.approx(0.99, abs=1e-6) and record.threshold == lynx.threshold


def test_no_exit_below_threshold_and_every_cue_is_counted(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.01).attach(model, tok)
    out = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()])
    assert SCRIPT in tok.decode(out[0])
    record = lynx.last_exits[0]
    assert not record.exited and not record.would_exit and record.cues_seen == 2 and record.position == -1


def test_shadow_mode_records_the_exit_but_never_changes_the_output(setup):
    model, tok, enc = setup
    plain = _generate(model, enc, [_script(tok, enc)])
    lynx = bundle(model, tok, probability=0.99, shadow=True).attach(model, tok)
    shadowed = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()])
    assert torch.equal(plain, shadowed)
    record = lynx.last_exits[0]
    assert record.would_exit and not record.exited and record.position == _cue_index(tok, enc, plain, "Wait")


def test_a_criterion_that_changes_lynxs_answer_in_place_never_changes_the_next_step(setup):
    """Each step answers with a tensor of its own: a wrapper that writes into what it got back (as `|=` would)
    cannot make a later step stop."""
    from transformers import StoppingCriteria

    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.01, shadow=True).attach(model, tok)

    class Scribbler(StoppingCriteria):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, input_ids, scores, **kwargs):
            done = self.inner(input_ids, scores)
            answer = done.clone()
            done.fill_(True)
            return answer

    plain = _generate(model, enc, [_script(tok, enc)])
    assert torch.equal(_generate(model, enc, [_script(tok, enc)], [Scribbler(lynx)]), plain)
    stream = dict(processors=[_script(tok, enc), lynx.exit_processor()])
    assert torch.equal(_generate(model, enc, criteria=[Scribbler(lynx.answer_stopper())], **stream), plain)


def test_exit_processor_forces_the_exit_text_once_the_cue_word_has_ended_and_stops_when_the_box_closes(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    script = _script(tok, enc, exit_len=len(lynx.exit_ids), model_logits=True)
    out = _generate(model, enc, [script, lynx.exit_processor()], [lynx.answer_stopper()])
    text = tok.decode(out[0, enc.input_ids.shape[1]:])
    # The "," after "Wait" shows the cue word ended (the calibrated event); the exit text follows it.
    assert text == "3 + 4 = 7. Wait," + lynx.config.exit_text + "7}"
    record = lynx.last_exits[0]
    assert record.exited and record.cue == "wait" and record.answered is True
    assert record.position == _cue_index(tok, enc, out, "Wait")


def test_state_resets_by_itself_on_a_new_generate_call(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    _generate(model, enc, [_script(tok, enc)], [lynx.stopper()])
    assert lynx.last_exits[0].exited
    lynx.confidence = 0.999  # needs more calibration data than there is: never exit
    out = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()])
    assert SCRIPT in tok.decode(out[0]) and not lynx.last_exits[0].exited and lynx.last_exits[0].cues_seen == 2


def test_generation_without_a_kv_cache_gives_the_same_exit(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    cached = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()])
    record = lynx.last_exits[0]
    uncached = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()], use_cache=False)
    assert torch.equal(cached, uncached) and lynx.last_exits[0] == record


def test_cues_in_the_prompt_never_trigger_an_exit(setup):
    model, tok, enc = setup
    prompt = PROMPT + "Wait, hmm. Alternatively,"
    enc2 = tok(prompt, return_tensors="pt", add_special_tokens=False)
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    script = ScriptProcessor(tok, [enc2.input_ids.shape[1]], [" 3 + 4 = 7.\n</think>\n\nFinal Answer: \\boxed{7}"])
    _generate(model, enc2, [script], [lynx.stopper()])
    assert lynx.last_exits[0].cues_seen == 0 and not lynx.last_exits[0].exited


def test_rows_do_not_depend_on_their_batch_neighbours(setup):
    model, tok, _ = setup
    torch.manual_seed(0)
    lynx = bundle(model, tok, probe=LynxProbe(model.config.hidden_size * 2)).attach(model, tok)
    prompts = [PROMPT, "<|im_start|>user\nHi there, a longer question?<|im_end|>\n<|im_start|>assistant\n<think>\n"]
    scripts = [SCRIPT, "Alternatively, hmm. Wait: 2. wait\n</think>\n\nFinal Answer: \\boxed{2}"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch.input_ids.shape[1]
    lynx.confidence = 0.5
    lynx.config.layers  # probe scores depend on the hidden states, so decisions are row-specific
    out = _generate(model, batch, [ScriptProcessor(tok, [width, width], scripts)], [lynx.stopper()])
    together = lynx.last_exits
    for row, (prompt, script) in enumerate(zip(prompts, scripts)):
        alone = tok(prompt, return_tensors="pt", add_special_tokens=False)
        n = alone.input_ids.shape[1]
        single = _generate(model, alone, [ScriptProcessor(tok, [n], [script])], [lynx.stopper()])
        solo = lynx.last_exits[0]
        pad = width - n
        assert together[row].exited == solo.exited and together[row].cues_seen == solo.cues_seen
        assert together[row].score == pytest.approx(solo.score, abs=1e-4) if solo.exited else True
        if solo.exited:
            assert together[row].position - pad == solo.position
        generated = out[row, width:]
        generated = generated[generated != tok.pad_token_id] if tok.pad_token_id is not None else generated
        assert tok.decode(single[0, n:], skip_special_tokens=True) == tok.decode(generated, skip_special_tokens=True)


def test_answer_after_stop_mode_reuses_the_cache_and_equals_a_fresh_exit(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    out = _generate(model, enc, [_script(tok, enc)], [lynx.stopper()], return_dict_in_generate=True)
    record = lynx.last_exits[0]
    fresh = answer_after_exit(model, tok, out.sequences, [exit_cut(record.position, record.start)], lynx.exit_ids,
                              max_new_tokens=8)
    cached = lynx.answer(out, max_new_tokens=8)
    assert cached[0].token_ids == fresh[0].token_ids and len(cached[0].token_ids) > 0


def test_beam_search_is_refused_with_a_clear_error(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    with pytest.raises(UnsupportedGenerationError, match="beam search"):
        model.generate(**enc, stopping_criteria=[lynx.stopper()], num_beams=2, max_new_tokens=5, do_sample=False)


def test_assisted_decoding_is_refused_with_a_clear_error(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    with pytest.raises(UnsupportedGenerationError, match="assisted"):
        model.generate(**enc, stopping_criteria=[lynx.stopper()], assistant_model=model, max_new_tokens=8, do_sample=False)


def test_a_bundle_whose_model_has_no_findable_tokenizer_says_how_to_attach(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok)
    lynx.config.base_model = "/no/such/folder"
    with pytest.raises(LynxConfigError, match=r"lynx.attach\(model, tokenizer\)"):
        model.generate(**enc, stopping_criteria=[lynx.stopper()], max_new_tokens=3)


def test_answering_twice_with_left_padded_rows_gives_the_same_answers(setup):
    model, tok, _ = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    prompts = [PROMPT, "<|im_start|>user\nHi there, a much longer question?<|im_end|>\n<|im_start|>assistant\n<think>\n"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = batch.input_ids.shape[1]
    out = _generate(model, batch, [ScriptProcessor(tok, [width, width], [SCRIPT, SCRIPT])], [lynx.stopper()])
    first = [a.token_ids for a in lynx.answer(out, max_new_tokens=8)]
    model(input_ids=batch.input_ids[:1, :5])  # any forward in between
    assert [a.token_ids for a in lynx.answer(out, max_new_tokens=8)] == first
    alone = tok(prompts[1], return_tensors="pt", add_special_tokens=False)
    n = alone.input_ids.shape[1]
    single = _generate(model, alone, [ScriptProcessor(tok, [n], [SCRIPT])], [lynx.stopper()])
    assert [a.token_ids for a in lynx.answer(single, max_new_tokens=8)] == first[1:]  # padding is masked


def test_cue_words_inside_longer_words_never_trigger_an_exit_in_either_mode(setup):
    model, tok, enc = setup
    script = "3 + 4 = 7. Waitress Hmmm awaited. Wait, 7.\n</think>\n\nFinal Answer: \\boxed{7}"
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    stop = _generate(model, enc, [ScriptProcessor(tok, [enc.input_ids.shape[1]], [script])], [lynx.stopper()])
    stop_record = lynx.last_exits[0]
    assert stop_record.cue == "wait" and stop_record.cues_seen == 1
    assert stop_record.position == _cue_index(tok, enc, stop, "Hmmm awaited. Wait")
    script_proc = ScriptProcessor(tok, [enc.input_ids.shape[1]], [script], exit_len=len(lynx.exit_ids),
                                  model_logits=True)
    stream = _generate(model, enc, [script_proc, lynx.exit_processor()], [lynx.answer_stopper()])
    record = lynx.last_exits[0]
    assert (record.position, record.start, record.cue) == (stop_record.position, stop_record.start, "wait")
    assert tok.decode(stream[0, enc.input_ids.shape[1]:]).startswith("3 + 4 = 7. Waitress Hmmm awaited. Wait,\n</think>")


def test_an_in_stream_exit_whose_token_budget_ends_before_the_answer_is_reported_unanswered(setup):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    script = _script(tok, enc, exit_len=len(lynx.exit_ids), model_logits=True)
    full = _generate(model, enc, [script, lynx.exit_processor()], [lynx.answer_stopper()])
    assert lynx.last_exits[0].answered is True
    budget = full.shape[1] - enc.input_ids.shape[1] - 3  # ends inside the forced exit text / answer
    model.generate(**enc, logits_processor=[_script(tok, enc, exit_len=len(lynx.exit_ids), model_logits=True),
                                            lynx.exit_processor()],
                   stopping_criteria=[lynx.answer_stopper()], max_new_tokens=budget, do_sample=False)
    record = lynx.last_exits[0]
    assert record.exited and record.answered is False


def test_token_ids_beyond_the_tokenizer_never_index_out_of_bounds(setup):
    _, tok, enc = setup
    from conftest import tiny_llama

    model = tiny_llama(vocab_size=len(tok) + 64, seed=1, num_hidden_layers=3)  # output layer larger than the tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    beyond = len(tok) + 5
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    width = enc.input_ids.shape[1]
    script = ScriptProcessor(tok, [width], [SCRIPT], exit_len=len(lynx.exit_ids), model_logits=True)
    script.scripts = [[beyond] + script.scripts[0]]  # the trace itself holds an id the tokenizer does not know
    out = _generate(model, enc, [script], [lynx.stopper()], return_dict_in_generate=True)
    assert lynx.last_exits[0].exited
    favour = model.lm_head.register_forward_hook(lambda m, a, logits: logits.index_fill(-1, torch.tensor([beyond]), 1e4))
    try:  # the model's greedy answers are ids beyond the tokenizer
        answers = lynx.answer(out, max_new_tokens=4)
        assert answers[0].token_ids == [beyond] * 4 and answers[0].answer is None
        _generate(model, enc, [script, lynx.exit_processor()], [lynx.answer_stopper()])
    finally:
        favour.remove()
    assert lynx.last_exits[0].exited


@pytest.mark.parametrize("mode", ["stop", "stream"])
def test_steps_the_host_knows_are_quiet_change_nothing_against_deciding_at_every_step(mode, monkeypatch):
    """A step after which no row has a cue to confirm (the host reads that one step late, without waiting) and, in-stream,
    a step before any exit only advance the cue automaton: sampled organism traces with exits, in both modes, equal
    those of running the whole decision (probe, confirmation, bookkeeping, forcing) at every step."""
    from lynx_hf import Lynx, organism
    from lynx_hf.runtime import monitor

    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.8)
    questions = ["What is 17 + 25?", "What is 6 * 7?", "What is 90 - 45?", "What is 12 + 30?"]
    enc = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True)
    if mode == "stop":
        plug = dict(stopping_criteria=[lynx.stopper()])
    else:
        plug = dict(logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()])

    def sample():
        torch.manual_seed(0)
        out = model.generate(**enc, **plug, do_sample=True, temperature=organism.TEMPERATURE, max_new_tokens=160)
        return out, lynx.last_exits

    quick, quick_records = sample()
    monkeypatch.setattr(monitor.HostMirror, "read", lambda self: 2**62)  # "a cue waits" and "a row exited", always
    branchless, branchless_records = sample()
    assert torch.equal(quick, branchless) and quick_records == branchless_records
    assert any(r.exited for r in quick_records) and any(r.cues_seen > 1 for r in quick_records)


@pytest.mark.parametrize("shadow", [False, True], ids=["live", "shadow"])
def test_a_confident_cue_confirmed_by_eos_is_an_event_in_both_modes_as_offline(setup, shadow):
    from forcing import ForceScript

    model, tok, _ = setup
    tok.padding_side = "left"
    enc = tok([PROMPT, PROMPT], return_tensors="pt", add_special_tokens=False)
    width = enc.input_ids.shape[1]
    so, wait = (tok(w, add_special_tokens=False).input_ids for w in (" so", " Wait"))
    # Row 0 writes a cue and then its EOS (nothing continues the word); row 1 thinks on.
    force = ForceScript([so * 2 + wait + [tok.eos_token_id], so * 20], width)
    lynx = bundle(model, tok, probability=0.99, shadow=shadow).attach(model, tok)  # every cue confident
    common = dict(do_sample=False, max_new_tokens=12, pad_token_id=model.generation_config.pad_token_id)
    # Offline (how the calibration events were found, on the trace cut before its EOS) the cue is an event.
    trace = enc.input_ids[0].tolist() + so * 2 + wait
    offline = lynx.detector.find_events(trace, width)
    assert [(e.position, e.cue) for e in offline] == [(width + 2, "wait")]
    stop = model.generate(**enc, logits_processor=[force], stopping_criteria=[lynx.stopper()], **common)
    stop_record = lynx.last_exits[0]
    stop_answer = lynx.answer(stop)[0]  # (before another call writes the same ids)
    model.generate(**enc, logits_processor=[force, lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()],
                   **common)
    stream_record = lynx.last_exits[0]
    import lynx_hf.custom_generate.generate as custom

    custom_record = custom.generate(model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, lynx=lynx,
                                    logits_processor=[force], return_dict_in_generate=True, **common).exits[0]
    assert custom_record == stop_record  # custom_generate decides as stop mode does
    for record in (stop_record, stream_record):
        assert record.would_exit and record.cue == "wait" and record.cues_seen == 1
        assert (record.position, record.start) == (offline[0].position, offline[0].start)
    assert stream_record.score == pytest.approx(stop_record.score)
    # Stop mode exits and answers from before the cue; in-stream the row has already ended with its EOS, so the
    # plug-in could not act on it.
    assert stop_record.exited is not shadow and not stream_record.exited
    if not shadow:  # answered from before the cue: neither the cue nor the EOS is in the answer's context
        assert exit_cut(stop_record.position, stop_record.start, lynx.config.exit_construction) == width + 2
        assert stop[0, width + 3] == tok.eos_token_id and stop_answer.token_ids
        # The later calls wrote the same ids; the output object still names the call that returned it.
        assert lynx.answer(stop)[0].token_ids == stop_answer.token_ids
