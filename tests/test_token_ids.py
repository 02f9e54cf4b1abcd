"""Every public entry point that takes a batch of token ids takes it in each form transformers hands out: a 2-D
tensor (`return_tensors="pt"`, what `generate` returns), a list of lists (`tokenizer([...]).input_ids`,
`out.tolist()`), a `BatchEncoding`'s `"input_ids"`, a list of 1-D tensors and a NumPy array; and gives the same
result for each."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from lynx_hf import CueDetector, Lynx, answer_after_exit, organism
from lynx_hf.runtime.token_ids import id_batch, id_rows

FORMS = {
    "tensor": lambda ids: ids,
    "list_of_lists": lambda ids: ids.tolist(),
    "batch_encoding": lambda ids: BatchEncoding({"input_ids": ids.tolist()})["input_ids"],
    "batch_encoding_pt": lambda ids: BatchEncoding({"input_ids": ids}, tensor_type="pt")["input_ids"],
    "list_of_tensors": lambda ids: list(ids),
    "numpy": lambda ids: ids.numpy(),
}


@pytest.fixture(scope="module")
def setup():
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9, guarantee="event")
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=3)]
    enc = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", add_special_tokens=False,
              padding=True)
    out = model.generate(**enc, stopping_criteria=[lynx.stopper() if hasattr(lynx, "stopper") else lynx],
                         do_sample=False, max_new_tokens=200)
    width = enc.input_ids.shape[1]
    return model, tok, lynx, enc, out, width


def _entry_points(setup):
    model, tok, lynx, enc, out, width = setup
    detector = CueDetector.for_tokenizer(tok, cues=lynx.config.cues, think_start=lynx.config.think_start,
                                         think_end=lynx.config.think_end)
    return {
        "CueDetector.find_events_batch": (out, lambda ids: detector.find_events_batch(ids, [width] * len(out))),
        "CueDetector.start": (enc.input_ids, lambda ids: detector.start(ids, enc.attention_mask).ids.tolist()),
        "answer_after_exit": (out, lambda ids: [a.answer for a in answer_after_exit(
            model, tok, ids, [width + 20] * len(out), lynx.exit_ids, attention_mask=torch.cat(
                [enc.attention_mask, enc.attention_mask.new_ones(len(out), out.shape[1] - width)], 1))]),
        "Lynx.answer": (out, lambda ids: [(a.token_ids, a.answer) for a in lynx.answer(ids)]),
    }


ENTRY_POINTS = ["CueDetector.find_events_batch", "CueDetector.start", "answer_after_exit", "Lynx.answer"]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_batch_entry_point_takes_each_form_transformers_hands_out(setup, entry, form):
    ids, run = _entry_points(setup)[entry]
    assert run(FORMS[form](ids)) == run(ids)


def test_a_single_flat_sequence_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"ids\[None\]"):
        id_rows(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"wrap one sequence"):
        id_rows([1, 2, 3])
    with pytest.raises(TypeError, match="integer token ids"):
        id_rows([[0.5, 1.5]])  # never truncated to ids silently
    with pytest.raises(ValueError, match="pad them"):
        id_batch([[1, 2], [3]])
    assert id_rows([[1, 2], [3]]) == [[1, 2], [3]]  # ragged rows are fine where the entry point allows them
