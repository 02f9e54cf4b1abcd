"""The usage tests' common start: the shipped organism, its bundle attached at c = 0.9 under the per-event rule (the
paper's; it exits on more rows than the default per-question guarantee, which these mechanics tests need), and a
left-padded batch of eight held-out arithmetic prompts with their greedy stop-mode reference (output, records,
answers)."""

from __future__ import annotations

from lynx_hf import Lynx, organism

GREEDY = dict(do_sample=False, max_new_tokens=300)


def answers(answers):
    """`lynx.answer(...)` results as comparable (token ids, answer) pairs."""
    return [(a.token_ids, a.answer) for a in answers]


def organism_batch():
    """(model, tokenizer, lynx, encoded batch, (output, last_exits, answers) of plain stop-mode greedy generate)."""
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9, guarantee="event")
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=8)]
    enc = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
              add_special_tokens=False)
    assert (enc.attention_mask == 0).any()  # left padding in every test
    out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY)
    reference = (out, lynx.last_exits, answers(lynx.answer(out)))
    assert sum(r.exited for r in reference[1]) >= 4
    return model, tok, lynx, enc, reference
