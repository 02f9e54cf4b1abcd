"""`model.generate(**inputs, stopping_criteria=[lynx])` returns finished outputs: every row that exits has its
thinking closed with the bundle's exit text and its greedy answer after it, in that one call (the in-stream
construction: the criterion brings its exit processor into the call it runs in). The exact stop-then-answer path
stays available as `lynx.stopper()` + `lynx.answer(out)`.

The pin tests at the end fail if transformers changes what the one call relies on in its decoding loop."""

from __future__ import annotations

import contextlib
import dis
import io
import threading
import warnings

import pytest
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TextIteratorStreamer, TextStreamer, pipeline)
from transformers.generation.utils import GenerationMixin

from lynx_hf import Lynx, LynxStoppingCriteria, UnsupportedGenerationError, organism

GREEDY = dict(do_sample=False, max_new_tokens=300)
SAMPLED = dict(do_sample=True, temperature=organism.TEMPERATURE, top_p=0.95, max_new_tokens=300)


@pytest.fixture(scope="module")
def setup():
    model, tok = organism.load()
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=6)]
    prompts = [organism.prompt(tok, q) for q in questions]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc.attention_mask == 0).any()  # left padding
    return model, tok, prompts, enc


def _lynx(**options):
    return Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.9, guarantee="event", **options)


def _generate(model, enc, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(**enc, **kwargs)


def _finished(tok, row_ids) -> bool:
    """A closed thinking block followed by a closed `\\boxed{...}` answer."""
    text = tok.decode(row_ids, skip_special_tokens=True)
    return "</think>" in text and organism.extract_answer(text.split("</think>", 1)[1]) is not None


def _in_stream(model, enc, lynx, seed=0, **kwargs):
    """The explicit in-stream pair, the reference the one call must equal."""
    return _generate(model, enc, seed, logits_processor=[lynx.exit_processor()],
                     stopping_criteria=[lynx.answer_stopper()], **kwargs)


@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_one_call_returns_finished_answers(setup, options):
    model, tok, _, enc = setup
    lynx = _lynx()  # no model=: it attaches to the model whose generate it runs in
    out = _generate(model, enc, stopping_criteria=[lynx], **options)
    records = lynx.last_exits
    width = enc.input_ids.shape[1]
    exited = [i for i, r in enumerate(records) if r.exited]
    assert len(exited) >= 3
    assert all(records[i].answered for i in exited)
    assert all(_finished(tok, out[i, width:]) for i in exited)
    # exactly the in-stream construction: the explicit pair gives the same tokens and records
    reference = _lynx()
    assert torch.equal(_in_stream(model, enc, reference, **options), out)
    assert reference.last_exits == records


def test_the_exit_text_follows_the_token_after_the_cue(setup):
    model, tok, _, enc = setup
    lynx = _lynx()
    out = _generate(model, enc, stopping_criteria=[lynx], **GREEDY)
    exit_ids = lynx.exit_ids
    for row, record in enumerate(lynx.last_exits):
        if record.exited and not record.by_budget:
            start = record.position + 2  # the cue, the token that ended its word, then the exit text
            assert out[row, start:start + len(exit_ids)].tolist() == exit_ids


def test_answer_on_a_one_call_output_returns_the_answers_already_there(setup):
    model, tok, _, enc = setup
    lynx = _lynx()
    out = _generate(model, enc, stopping_criteria=[lynx], **GREEDY)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        answers = lynx.answer(out)
    finally:
        handle.remove()
    assert not forwards  # no second generation
    width = enc.input_ids.shape[1]
    for row, (answer, record) in enumerate(zip(answers, lynx.last_exits)):
        text = tok.decode(out[row, width:], skip_special_tokens=True)
        assert answer.answer == organism.extract_answer(text)
        if record.exited:
            assert answer.token_ids and answer.text in text


def test_called_twice_with_batches_interleaved_each_output_keeps_its_answers(setup):
    model, tok, _, enc = setup
    lynx = _lynx()
    first = {k: v[:3] for k, v in enc.items()}
    second = {k: v[3:] for k, v in enc.items()}
    out_a = _generate(model, first, seed=1, stopping_criteria=[lynx], **SAMPLED)
    records_a = lynx.last_exits
    out_b = _generate(model, second, seed=2, stopping_criteria=[lynx], **SAMPLED)
    answers_b = lynx.answer(out_b)
    answers_a = lynx.answer(out_a)
    width = enc["input_ids"].shape[1]
    for out, answers in ((out_a, answers_a), (out_b, answers_b)):
        for row, answer in enumerate(answers):
            assert answer.answer == organism.extract_answer(tok.decode(out[row, width:], skip_special_tokens=True))
    again = _generate(model, first, seed=1, stopping_criteria=[lynx], **SAMPLED)
    assert torch.equal(again, out_a) and lynx.last_exits == records_a


def test_num_return_sequences_rows_each_finish(setup):
    model, tok, _, enc = setup
    lynx = _lynx()
    two = {k: v[:2] for k, v in enc.items()}
    out = _generate(model, two, seed=3, stopping_criteria=[lynx], num_return_sequences=2, **SAMPLED)
    records = lynx.last_exits
    assert out.shape[0] == len(records) == 4
    width = enc["input_ids"].shape[1]
    assert any(r.exited for r in records)
    assert all(_finished(tok, out[i, width:]) for i, r in enumerate(records) if r.exited)
    assert torch.equal(_in_stream(model, two, _lynx(), seed=3, num_return_sequences=2, **SAMPLED), out)


def test_pipeline_returns_finished_answers(setup):
    model, tok, prompts, _ = setup
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    lynx = _lynx()
    results = pipe(prompts[:3], stopping_criteria=[lynx], return_full_text=False, **GREEDY)
    texts = [r[0]["generated_text"] for r in results]
    exited = 0
    for prompt, text in zip(prompts[:3], texts):
        alone = tok(prompt, return_tensors="pt", add_special_tokens=False)
        direct = _lynx()
        out = model.generate(**alone, stopping_criteria=[direct], **GREEDY)
        assert text == tok.decode(out[0, alone.input_ids.shape[1]:], skip_special_tokens=True)
        if direct.last_exits[0].exited:
            exited += 1
            assert "</think>" in text and organism.extract_answer(text.split("</think>", 1)[1]) is not None
    assert exited >= 1


def test_text_streamer_streams_the_returned_text(setup):
    model, tok, prompts, _ = setup
    alone = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    lynx = _lynx()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = model.generate(**alone, stopping_criteria=[lynx], streamer=TextStreamer(tok, skip_prompt=True),
                             **GREEDY)
    text = tok.decode(out[0, alone.input_ids.shape[1]:], skip_special_tokens=True)
    assert lynx.last_exits[0].exited and _finished(tok, out[0, alone.input_ids.shape[1]:])
    assert printed.getvalue().strip() == text.strip()


def test_text_iterator_streamer_streams_the_returned_text(setup):
    model, tok, prompts, _ = setup
    alone = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    lynx = _lynx()
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(
        **alone, stopping_criteria=[lynx], streamer=streamer, **GREEDY)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    out = result["out"]
    assert lynx.last_exits[0].exited
    assert streamed == tok.decode(out[0, alone.input_ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("options", [dict(shadow=True), dict(audit_rate=1.0)], ids=["shadow", "audited"])
def test_shadow_and_audited_rows_never_change_the_output(setup, options):
    model, tok, _, enc = setup
    plain = _generate(model, enc, seed=4, **SAMPLED)
    lynx = _lynx(**options)
    out = _generate(model, enc, seed=4, stopping_criteria=[lynx], **SAMPLED)
    assert torch.equal(out, plain)
    records = lynx.last_exits
    assert not any(r.exited for r in records) and sum(r.would_exit for r in records) >= 3


def test_only_rows_drawn_for_the_audit_run_on(setup):
    model, tok, _, enc = setup
    lynx = _lynx(audit_rate=0.5, audit_seed=3)
    out = _generate(model, enc, stopping_criteria=[lynx], **GREEDY)
    records = lynx.last_exits
    assert 0 < sum(r.audited for r in records) < len(records)
    width = enc.input_ids.shape[1]
    for row, r in enumerate(records):
        assert r.exited == (r.would_exit and not r.audited)
        if r.exited:
            assert _finished(tok, out[row, width:])


def test_the_thinking_budget_exits_and_answers_in_the_call(setup):
    model, tok, _, enc = setup
    lynx = _lynx(max_thinking_tokens=12)
    out = _generate(model, enc, stopping_criteria=[lynx], **GREEDY)
    records = lynx.last_exits
    assert all(r.exited and r.by_budget for r in records) and any(r.answered for r in records)
    width = enc.input_ids.shape[1]
    # (a row cut after 12 tokens may write on inside its box: the organism has not computed its answer yet)
    assert all(_finished(tok, out[i, width:]) for i, r in enumerate(records) if r.answered)
    reference = _lynx(max_thinking_tokens=12)
    assert torch.equal(_in_stream(model, enc, reference, **GREEDY), out) and reference.last_exits == records


def test_with_its_own_exit_processor_too_nothing_is_forced_twice(setup):
    model, tok, _, enc = setup
    alone = _lynx()
    expected = _generate(model, enc, stopping_criteria=[alone], **GREEDY)
    lynx = _lynx()
    out = _generate(model, enc, logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx], **GREEDY)
    assert torch.equal(out, expected) and lynx.last_exits == alone.last_exits


def test_with_another_lynx_exit_processor_it_raises(setup):
    model, tok, _, enc = setup
    lynx, other = _lynx(), _lynx()
    with pytest.raises(UnsupportedGenerationError, match="another Lynx's exit processor"):
        _generate(model, enc, logits_processor=[other.exit_processor()], stopping_criteria=[lynx], **GREEDY)


def test_stopper_is_the_exact_stop_then_answer_path(setup):
    model, tok, _, enc = setup
    lynx = _lynx()
    assert isinstance(lynx.stopper(), LynxStoppingCriteria) and lynx.stopper() is lynx.stopper()
    out = _generate(model, enc, stopping_criteria=[lynx.stopper()], **GREEDY)
    records = lynx.last_exits
    width = enc.input_ids.shape[1]
    for row, r in enumerate(records):
        if r.exited:  # halted one token after the cue, no answer yet
            assert not _finished(tok, out[row, width:])
    answers = lynx.answer(out)
    assert all(answers[i].answer is not None for i, r in enumerate(records) if r.exited)


def test_stopping_criteria_is_a_deprecated_alias_of_stopper():
    lynx = _lynx()
    with pytest.warns(FutureWarning, match=r"stopper\(\)"):
        assert lynx.stopping_criteria() is lynx.stopper()


# ----- what the one call relies on in transformers' decoding loop (fails if a transformers release changes it) ---

def test_pin_sample_loop_local_names():
    """`_sample` keeps the names the plug-ins read from its frame."""
    names = set(GenerationMixin._sample.__code__.co_varnames)
    assert {"self", "logits_processor", "stopping_criteria", "unfinished_sequences", "outputs",
            "model_kwargs"} <= names
    calls = [i.argval for i in dis.get_instructions(GenerationMixin._sample) if i.opname.startswith("LOAD_")]
    assert "logits_processor" in calls and "stopping_criteria" in calls


class _Count(LogitsProcessor):
    def __init__(self):
        self.lengths = []

    def __call__(self, input_ids, scores):
        self.lengths.append(input_ids.shape[1])
        return scores


class _Joiner(StoppingCriteria):
    """Appends a processor to the loop's `logits_processor` on its first call, as `stopping_criteria=[lynx]` does."""

    def __init__(self):
        self.lists, self.first_lengths, self.processor = [], [], None

    def __call__(self, input_ids, scores, **kwargs):
        import sys

        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "_sample":
            frame = frame.f_back
        processors = frame.f_locals["logits_processor"]
        assert isinstance(processors, LogitsProcessorList)
        assert isinstance(frame.f_locals["stopping_criteria"], StoppingCriteriaList)
        if not any(processors is seen for seen in self.lists):
            self.lists.append(processors)
            self.first_lengths.append(input_ids.shape[1])
            self.processor = _Count()
            processors.append(self.processor)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_pin_a_processor_appended_by_a_criterion_at_step_one_runs_every_later_step(setup):
    """The loop calls the one `logits_processor` list object every step (so an append during the call takes effect
    from the next step), the first criterion call sees the prompt plus one token, and each call gets a fresh list."""
    model, tok, _, enc = setup
    alone = {k: v[:1] for k, v in enc.items()}
    width = alone["input_ids"].shape[1]
    joiner = StoppingCriteriaList([_Joiner()])[0]
    for _ in range(2):
        model.generate(**alone, stopping_criteria=[joiner], do_sample=False, max_new_tokens=6, min_new_tokens=6)
        assert joiner.first_lengths[-1] == width + 1
        assert joiner.processor.lengths == list(range(width + 1, width + 6))  # steps 2..6, each once
    assert len(joiner.lists) == 2 and joiner.lists[0] is not joiner.lists[1]


def test_pin_user_processors_list_is_not_the_loop_list(setup):
    """`generate` copies the user's processors into a list of its own, so joining never grows the user's list."""
    model, tok, _, enc = setup
    alone = {k: v[:1] for k, v in enc.items()}
    lynx = _lynx()
    mine = LogitsProcessorList()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(**alone, logits_processor=mine, stopping_criteria=[lynx], **GREEDY)
    assert len(mine) == 0
