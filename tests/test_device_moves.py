"""A model moved to another device after Lynx was bound to it (`model.to("cuda")` after a first call, or back) exits
and answers exactly as a model loaded on that device from the start, in both modes.

Needs a second device: run with `LYNX_TEST_DEVICE=cuda` (benchmarks/gpu_check.py does); skipped on a CPU-only machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from lynx_hf import Lynx, organism
from organism_batch import GREEDY, answers

DEVICE = torch.device(os.environ.get("LYNX_TEST_DEVICE", "cpu"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu", reason="needs a second device: set LYNX_TEST_DEVICE=cuda")


def batch(tok, device):
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=8)]
    return tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
               add_special_tokens=False).to(device)


def run(model, tok, lynx, mode: str, device):
    """(output, records, answers) of one greedy call in `mode` ("stop" or "stream") on `device`."""
    enc = batch(tok, device)
    if mode == "stop":
        out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY)
        return out, lynx.last_exits, answers(lynx.answer(out))
    out = model.generate(**enc, logits_processor=[lynx.exit_processor()],
                         stopping_criteria=[lynx.answer_stopper()], **GREEDY)
    return out, lynx.last_exits, None


def reference(mode: str, device):
    model, tok = organism.load()
    model.to(device)
    return run(model, tok, Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok), mode, device)


@pytest.mark.parametrize("mode", ["stop", "stream"])
@pytest.mark.parametrize("attached", [True, False], ids=["attached", "loaded-without-model"])
def test_a_model_moved_after_a_call_exits_as_one_loaded_on_its_new_device(mode, attached):
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, **(dict(model=model, tokenizer=tok) if attached else {}))
    on_cpu = run(model, tok, lynx, mode, torch.device("cpu"))
    assert any(r.exited for r in on_cpu[1])

    model.to(DEVICE)
    out, records, answered = run(model, tok, lynx, mode, DEVICE)
    expected = reference(mode, DEVICE)
    assert torch.equal(out, expected[0]) and records == expected[1] and answered == expected[2]

    model.to("cpu")
    out, records, answered = run(model, tok, lynx, mode, torch.device("cpu"))
    assert torch.equal(out, on_cpu[0]) and records == on_cpu[1] and answered == on_cpu[2]
