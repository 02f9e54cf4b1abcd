"""`model.generate` options combined with Lynx, beyond test_runtime.py and test_usage_patterns.py, on the shipped
organism with a left-padded batch: an option orthogonal to Lynx gives the exits and answers of the plain call; one
that is not has the documented behaviour (one test per behaviour).

Not run here: `dola_layers` and `penalty_alpha` (contrastive search) live in `custom_generate` Hub repos in
transformers 5.x (`transformers-community/dola`, `transformers-community/contrastive-search`) and cannot be
downloaded offline; a loop other than `_sample` calling the plug-ins is refused (test_plugins.py).
"""

from __future__ import annotations

import threading

from dataclasses import replace

import pytest
import torch
from transformers import GenerationConfig, SynthIDTextWatermarkingConfig, TextIteratorStreamer, WatermarkingConfig
from transformers.generation.streamers import BaseStreamer

from organism_batch import GREEDY, organism_batch
from organism_batch import answers as _answers


@pytest.fixture(scope="module")
def setup():
    model, tok, lynx, enc, stop = organism_batch()
    streamed = model.generate(**enc, **_stream(lynx), **GREEDY)
    stream = (streamed, lynx.last_exits)
    assert sum(r.exited and r.answered for r in stream[1]) >= 4
    return model, tok, lynx, enc, stop, stream


def _stream(lynx) -> dict:
    return dict(logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()])


def _token(tok, text: str) -> int:
    return tok.convert_tokens_to_ids(text)


def _check_in_stream_rows(model, tok, lynx, enc, out) -> int:
    """Every exited row holds the exit text verbatim after the cue and the token ending its word, then the model's
    own greedy answer from that prefix (what the labels, `answer` and custom_generate decode); returns how many
    rows answered."""
    n = len(lynx.exit_ids)
    answered = 0
    for row, record in enumerate(lynx.last_exits):
        if not record.exited:
            continue
        start = record.position + 2 + n
        assert out[row, record.position + 2: start].tolist() == lynx.exit_ids, row
        answer = [t for t in out[row, start:].tolist() if t != tok.pad_token_id]
        pad = enc["input_ids"].shape[1] - int(enc["attention_mask"][row].sum())
        prefix = out[row, pad:start][None]
        greedy = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                                max_new_tokens=max(len(answer), 1))
        assert greedy[0, prefix.shape[1]:].tolist()[: len(answer)] == answer, row
        assert record.answered == (_token(tok, "}") in answer), row
        answered += bool(record.answered)
    return answered


def _check_stop_rows(model, tok, lynx, enc, out) -> int:
    """`lynx.answer(out)` gives every exited row the model's own greedy answer after `trace[:start] + exit text`
    (plain generate from that prefix); returns how many exited rows closed their box."""
    closed = 0
    for row, (record, answer) in enumerate(zip(lynx.last_exits, lynx.answer(out))):
        if not record.exited:
            continue
        pad = enc["input_ids"].shape[1] - int(enc["attention_mask"][row].sum())
        prefix = torch.cat([out[row, pad:record.start], torch.tensor(lynx.exit_ids)])[None]
        greedy = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                                max_new_tokens=max(len(answer.token_ids), 1))
        assert greedy[0, prefix.shape[1]:].tolist()[: len(answer.token_ids)] == answer.token_ids, row
        closed += answer.answer is not None
    return closed


# ----- processors generate runs before Lynx's: they shape the thinking, never the exit text or the answer -----------

@pytest.mark.parametrize("options", [
    dict(repetition_penalty=1.3),  # penalises the digits the answer copies and the prompt's "}"
    dict(suppress_tokens=["</think>", "\\boxed", "{", "}"]),  # the exit text's and the answer's own tokens
    dict(begin_suppress_tokens=["\n", "Wait"]),
    dict(sequence_bias=[(["}"], -5.0), (["\\boxed"], -5.0)]),
    dict(no_repeat_ngram_size=4),
    dict(min_new_tokens=250),  # EOS masked past every exit
], ids=["repetition_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "no_repeat_ngram_size",
        "min_new_tokens"])
def test_exited_rows_get_the_exit_text_and_the_models_greedy_answer_whatever_generates_processors_do(setup, options):
    model, tok, lynx, enc, _, _ = setup
    options = dict(options)
    for key in ("suppress_tokens", "begin_suppress_tokens"):
        if key in options:
            options[key] = [_token(tok, t) for t in options[key]]
    if "sequence_bias" in options:
        options["sequence_bias"] = [[[_token(tok, t) for t in seq], bias] for seq, bias in options["sequence_bias"]]
    out = model.generate(**enc, **_stream(lynx), **options, **GREEDY)
    assert sum(r.exited for r in lynx.last_exits) >= 4
    assert _check_in_stream_rows(model, tok, lynx, enc, out) >= 4
    out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **options, **GREEDY)  # stop mode: `answer` likewise
    assert sum(r.exited for r in lynx.last_exits) >= 4
    assert _check_stop_rows(model, tok, lynx, enc, out) >= 4


def test_forced_eos_at_the_budget_ends_the_other_rows_and_a_row_cut_in_its_exit_text_is_recorded_unanswered(setup):
    model, tok, lynx, enc, _, (_, stream_records) = setup
    prompt, eos = enc.input_ids.shape[1], tok.eos_token_id
    row = min((r.position, i) for i, r in enumerate(stream_records) if r.exited)[1]
    budget = stream_records[row].position - prompt + 2 + 5 + 1  # the last step writes the 6th exit-text token
    for plug_ins in (lambda: dict(stopping_criteria=[lynx.stopper()]), lambda: _stream(lynx)):
        plain = model.generate(**enc, **plug_ins(), do_sample=False, max_new_tokens=budget)
        records = lynx.last_exits
        forced = model.generate(**enc, **plug_ins(), do_sample=False, max_new_tokens=budget, forced_eos_token_id=eos)
        assert torch.equal(forced[:, :-1], plain[:, :-1])
        uncounted = dict(thinking_tokens=None, full_thinking_tokens=None)
        assert [replace(r, **uncounted) for r in lynx.last_exits] == [replace(r, **uncounted) for r in records]
        for i, (record, with_eos) in enumerate(zip(records, lynx.last_exits)):
            # the forced EOS is no thinking token: only rows still thinking at the last step count one fewer
            assert with_eos.thinking_tokens == record.thinking_tokens - (not record.exited)
            if not record.exited:  # rows Lynx leaves alone end with the forced EOS
                assert forced[i, -1] == eos
            elif plug_ins().get("logits_processor") and record.answered is False:
                assert forced[i, -1] == plain[i, -1] != eos  # Lynx's forced exit text wins over the forced EOS
        if "logits_processor" not in plug_ins():
            assert _answers(lynx.answer(forced)) == _answers(lynx.answer(plain))
    assert lynx.last_exits[row].exited and lynx.last_exits[row].answered is False


def test_a_processor_of_yours_that_edits_the_logits_in_place_shapes_the_thinking_only(setup):
    model, tok, lynx, enc, _, _ = setup
    close = _token(tok, "}")

    def ban_close_in_place(input_ids, scores):  # the first processor is handed generate's copy of the model's logits
        scores[:, close] = -float("inf")
        return scores

    out = model.generate(**enc, logits_processor=[ban_close_in_place, lynx.exit_processor()],
                         stopping_criteria=[lynx.answer_stopper()], **GREEDY)
    assert sum(r.exited for r in lynx.last_exits) >= 4
    assert _check_in_stream_rows(model, tok, lynx, enc, out) >= 4


@pytest.mark.parametrize("watermark", ["kirchenbauer", "synthid"])
def test_watermarked_sampling_keeps_the_exit_text_and_the_greedy_answer_in_stream(setup, watermark):
    model, tok, lynx, enc, _, _ = setup
    config = (WatermarkingConfig(greenlist_ratio=0.25, bias=4.0) if watermark == "kirchenbauer" else
              SynthIDTextWatermarkingConfig(keys=[654, 400, 836, 123, 340, 443, 597, 160, 57], ngram_len=5))
    torch.manual_seed(0)
    out = model.generate(**enc, **_stream(lynx), watermarking_config=config, do_sample=True, max_new_tokens=300)
    assert sum(r.exited for r in lynx.last_exits) >= 4
    assert _check_in_stream_rows(model, tok, lynx, enc, out) >= 4


def test_in_stream_scores_pick_the_returned_tokens_and_the_answer_follows_the_raw_logits(setup):
    model, tok, lynx, enc, _, (streamed, records) = setup
    full = model.generate(**enc, **_stream(lynx), return_dict_in_generate=True, output_scores=True,
                          output_logits=True, repetition_penalty=1.3, **GREEDY)
    out, prompt = full.sequences, enc.input_ids.shape[1]
    steps = out.shape[1] - prompt
    assert len(full.scores) == len(full.logits) == steps
    assert all(s.shape == l.shape == (out.shape[0], model.config.vocab_size) for s, l in zip(full.scores, full.logits))
    answering = 0
    for row, record in enumerate(lynx.last_exits):
        stopped = (out[row, prompt:] == tok.pad_token_id).nonzero()
        end = int(stopped[0]) if len(stopped) else steps  # the row's own steps (padding follows once it stopped)
        for t in range(end):
            token = int(out[row, prompt + t])
            assert int(full.scores[t][row].argmax()) == token, (row, t)
            if record.exited and prompt + t >= record.position + 2 + len(lynx.exit_ids):
                assert int(full.logits[t][row].argmax()) == token, (row, t)  # the answer is the model's greedy one
                answering += 1
    assert answering >= 8


# ----- options orthogonal to Lynx: the plain call's exits and answers -----------------------------------------

@pytest.mark.parametrize("options", [
    dict(renormalize_logits=True),
    dict(low_memory=True),  # beam search only; inert in the sampling loop
    dict(max_time=3600.0),
    dict(suppress_tokens=["<unk>"]),  # a token the traces never use
    dict(return_dict_in_generate=True, output_scores=True, output_logits=True),
], ids=["renormalize_logits", "low_memory", "max_time", "suppress_unused", "output_scores_logits"])
def test_an_orthogonal_option_exits_and_answers_as_the_plain_call_in_both_modes(setup, options):
    model, tok, lynx, enc, (out, records, answers), (streamed, stream_records) = setup
    options = dict(options)
    if "suppress_tokens" in options:
        options["suppress_tokens"] = [_token(tok, t) for t in options["suppress_tokens"]]
    got = model.generate(**enc, stopping_criteria=[lynx.stopper()], **options, **GREEDY)
    sequences = got.sequences if options.get("return_dict_in_generate") else got
    assert torch.equal(sequences, out) and lynx.last_exits == records
    assert _answers(lynx.answer(got)) == answers
    got = model.generate(**enc, **_stream(lynx), **options, **GREEDY)
    sequences = got.sequences if options.get("return_dict_in_generate") else got
    assert torch.equal(sequences, streamed) and lynx.last_exits == stream_records


def test_a_generation_config_object_acts_as_the_same_keyword_arguments(setup):
    model, tok, lynx, enc, _, _ = setup
    options = dict(do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=2, max_new_tokens=300,
                   repetition_penalty=1.1, suppress_tokens=[_token(tok, "<unk>")], renormalize_logits=True)
    for plug_ins in (dict(stopping_criteria=[lynx.stopper()]), _stream(lynx)):
        torch.manual_seed(1)
        by_kwargs = model.generate(**enc, **plug_ins, **options)
        records = lynx.last_exits
        torch.manual_seed(1)
        by_config = model.generate(**enc, **plug_ins, generation_config=GenerationConfig(**options))
        assert torch.equal(by_config, by_kwargs) and lynx.last_exits == records
        assert len(records) == 16 and any(r.exited for r in records)


@pytest.mark.parametrize("mode", ["stop", "stream"])
def test_num_return_sequences_gives_the_exits_and_answers_of_the_prompts_repeated_row_by_row(setup, mode):
    model, tok, lynx, enc, _, _ = setup
    plug_ins = (lambda: dict(stopping_criteria=[lynx.stopper()])) if mode == "stop" else (lambda: _stream(lynx))
    sampling = dict(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=300)
    torch.manual_seed(2)
    out = model.generate(**enc, num_return_sequences=3, **plug_ins(), **sampling)
    records = lynx.last_exits
    answers = _answers(lynx.answer(out)) if mode == "stop" else None
    repeated = {k: v.repeat_interleave(3, dim=0) for k, v in enc.items()}
    torch.manual_seed(2)
    expected = model.generate(**repeated, **plug_ins(), **sampling)
    assert out.shape[0] == 24 and torch.equal(out, expected) and lynx.last_exits == records
    assert sum(r.exited for r in records) >= 8
    assert len({tuple(row.tolist()) for row in out}) > 8  # the copies of a prompt were sampled apart
    if mode == "stop":
        assert answers == _answers(lynx.answer(expected))
        torch.manual_seed(2)
        full = model.generate(**enc, num_return_sequences=3, return_dict_in_generate=True, **plug_ins(), **sampling)
        assert torch.equal(full.sequences, out)
        assert _answers(lynx.answer(full)) == answers  # the cache of the 24 rows, narrowed to the exited ones
    else:
        assert _check_in_stream_rows(model, tok, lynx, repeated, out) >= 8


# ----- streamers, stopping options ------------------------------------------------------------------------

class _Collect(BaseStreamer):
    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.puts.append(value.reshape(value.shape[0], -1) if value.dim() > 1 else value[:, None])

    def end(self):
        self.ended = True


def test_a_streamer_receives_exactly_the_returned_ids_in_both_modes(setup):
    model, tok, lynx, enc, (out, records, _), (streamed, stream_records) = setup
    for plug_ins, expected, expected_records in ((dict(stopping_criteria=[lynx.stopper()]), out, records),
                                                 (_stream(lynx), streamed, stream_records)):
        streamer = _Collect()
        got = model.generate(**enc, **plug_ins, streamer=streamer, **GREEDY)
        assert torch.equal(got, expected) and lynx.last_exits == expected_records
        assert streamer.ended and torch.equal(torch.cat(streamer.puts, dim=1), expected)


def test_a_text_iterator_streamer_streams_the_returned_text_in_both_modes(setup):
    model, tok, lynx, enc, (out, records, _), _ = setup
    row = 3
    assert records[row].exited
    single = {k: v[row:row + 1, v.shape[1] - int(enc.attention_mask[row].sum()):] for k, v in enc.items()}
    for plug_ins in (lambda: dict(stopping_criteria=[lynx.stopper()]), lambda: _stream(lynx)):
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            out=model.generate(**single, **plug_ins(), streamer=streamer, **GREEDY), records=lynx.last_exits))
        worker.start()
        text = "".join(streamer)
        worker.join()
        got = result["out"]
        assert result["records"][0].exited
        assert text == tok.decode(got[0, single["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Final Answer" in text  # the in-stream exit text and answer are streamed as they are written


def test_max_time_cuts_the_call_as_a_token_budget_would(setup, monkeypatch):
    import transformers.generation.stopping_criteria as criteria

    model, tok, lynx, enc, _, _ = setup
    steps = 80  # after some rows exited and before others did

    class Clock:  # one second per decoding step: the cut falls at a known step
        now = 0.0

        @classmethod
        def time(cls):
            cls.now += 1.0
            return cls.now

    monkeypatch.setattr(criteria, "time", Clock)
    for plug_ins in (lambda: dict(stopping_criteria=[lynx.stopper()]), lambda: _stream(lynx)):
        Clock.now = 0.0
        cut = model.generate(**enc, **plug_ins(), do_sample=False, max_new_tokens=300, max_time=steps - 0.5)
        cut_records = lynx.last_exits
        budget = model.generate(**enc, **plug_ins(), do_sample=False, max_new_tokens=steps)
        assert torch.equal(cut, budget) and cut_records == lynx.last_exits
        assert 0 < sum(r.exited for r in cut_records) < len(cut_records)
    stop = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=steps)
    expected = _answers(lynx.answer(stop))
    Clock.now = 0.0
    cut = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=300, max_time=steps - 0.5)
    assert _answers(lynx.answer(cut)) == expected


def test_min_new_tokens_does_not_delay_an_exit_in_stop_mode(setup):
    model, tok, lynx, enc, (out, records, answers), _ = setup
    late = max(r.position for r in records if r.exited) - enc.input_ids.shape[1] + 20
    got = model.generate(**enc, stopping_criteria=[lynx.stopper()], min_new_tokens=late, **GREEDY)
    assert torch.equal(got, out) and lynx.last_exits == records
    assert _answers(lynx.answer(got)) == answers


def test_stop_strings_stop_their_rows_and_lynx_exits_the_others_as_without_them(setup):
    model, tok, lynx, enc, (out, records, answers), _ = setup
    stop_string = "not done yet"  # a pause phrase in some rows before their exit, in none of the others
    plain = model.generate(**enc, stop_strings=[stop_string], tokenizer=tok, **GREEDY)  # where each row would stop
    prompt = enc.input_ids.shape[1]
    got = model.generate(**enc, stopping_criteria=[lynx.stopper()], stop_strings=[stop_string], tokenizer=tok, **GREEDY)
    got_records, got_answers = lynx.last_exits, _answers(lynx.answer(got))
    first, second = 0, 0
    for row, record in enumerate(records):
        text = tok.decode(plain[row, prompt:], skip_special_tokens=True)
        stopped_first = stop_string in text and (
            not record.exited or stop_string in tok.decode(out[row, prompt: record.position + 2]))
        if stopped_first:  # the stop string came before Lynx's exit: the row ends there, unexited
            first += 1
            assert not got_records[row].exited
            assert tok.decode(got[row, prompt:], skip_special_tokens=True).endswith(stop_string)
        else:
            second += 1
            assert got_records[row] == record and got_answers[row] == answers[row]
    assert first and second


@pytest.mark.parametrize("mode", ["stop", "stream"])
@pytest.mark.parametrize("eos", ["eos", "no_eos"])
def test_a_row_a_stop_string_ends_on_a_cue_word_is_not_exited_whatever_its_batch_neighbours(setup, mode, eos):
    # The cue's word is confirmed by the token after it; in a row a stop string ended, that token is generate's
    # padding (or, without an EOS id, a model token written after the row's end), and only while other rows run.
    model, tok, lynx, enc, _, _ = setup
    plug_ins = (lambda: dict(stopping_criteria=[lynx.stopper()])) if mode == "stop" else (lambda: _stream(lynx))
    options = dict(stop_strings=["Wait", "wait", "Hmm", "hmm"], tokenizer=tok, **GREEDY)
    if eos == "no_eos":
        options.update(eos_token_id=None, pad_token_id=tok.pad_token_id)
    model.generate(**enc, **plug_ins(), **options)
    together = [(r.exited, r.would_exit, r.cue, r.cues_seen) for r in lynx.last_exits]
    alone = []
    for row in range(enc.input_ids.shape[0]):
        single = {k: v[row:row + 1, v.shape[1] - int(enc.attention_mask[row].sum()):] for k, v in enc.items()}
        model.generate(**single, **plug_ins(), **options)
        alone += [(r.exited, r.would_exit, r.cue, r.cues_seen) for r in lynx.last_exits]
    assert together == alone


def test_a_stop_string_in_the_exit_text_ends_an_in_stream_row_there_unanswered_and_leaves_stop_mode_alone(setup):
    model, tok, lynx, enc, (out, records, answers), _ = setup
    options = dict(stop_strings=["</think>"], tokenizer=tok, **GREEDY)
    got = model.generate(**enc, stopping_criteria=[lynx.stopper()], **options)  # stop mode exits before the thinking ends
    assert torch.equal(got, out) and lynx.last_exits == records and _answers(lynx.answer(got)) == answers
    got = model.generate(**enc, **_stream(lynx), **options)
    exited = [(row, r) for row, r in enumerate(lynx.last_exits) if r.exited]
    assert len(exited) >= 4
    for row, record in exited:
        assert record.answered is False  # the user's stop string ended the row inside the forced exit text
        assert tok.decode(got[row, record.position + 2:], skip_special_tokens=True) == "\n</think>"
