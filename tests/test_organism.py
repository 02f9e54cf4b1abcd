"""The model organism: shipped weights and tokenizer, trace grammar, task generators and splits."""

from __future__ import annotations

import random
import re
import time

import pytest
import torch

from lynx_hf import organism
from lynx_hf.organism.tasks import CUE_WORDS, EXIT_TEXT, FAMILIES, SPLITS, render_trace, split_of

needs_model = pytest.mark.skipif(not (organism.MODEL_DIR / "config.json").is_file(),
                                 reason="organism weights not trained yet: run `make organism`")


@pytest.fixture(scope="module")
def shipped():
    return organism.load()


# ------------------------------------------------------------------------------------------- shipped model
@needs_model
def test_shipped_model_loads_offline_in_seconds(monkeypatch):
    import transformers.models.llama.modeling_llama  # noqa: F401  (import time is not load time)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    model, tok = organism.load()
    assert time.perf_counter() - start < 20  # ~1 s on an idle 2-core machine; CI shares its cores
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert sum(f.stat().st_size for f in organism.MODEL_DIR.iterdir()) < 20e6
    assert (organism.MODEL_DIR / "model.safetensors").is_file()


@needs_model
def test_automodel_loads_the_shipped_folder():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(organism.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(organism.MODEL_DIR)
    assert model.config.model_type == "llama"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


@needs_model
def test_prompt_opens_the_thinking_block(shipped):
    _, tok = shipped
    text = organism.prompt(tok, "Ann has 3 coins. She finds 2. How many coins does Ann have now?")
    assert text.endswith("<|assistant|><think>\n")
    assert organism.PROMPT_SUFFIX in text
    # the template holds BOS; the tokenizer must not add a second one
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


@needs_model
def test_greedy_trace_is_well_formed(shipped):
    model, tok = shipped
    problem = organism.problems("arithmetic", "test", n=1, seed=3)[0]
    inputs = tok(organism.prompt(tok, problem["question"]), return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=500)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id, "the trace must end with EOS"
    text = tok.decode(new, skip_special_tokens=True)
    assert "<think>" not in text  # generation starts inside the thinking block
    assert re.fullmatch(r"(?s)[^<]+\n\n</think>\n\nFinal Answer: \\boxed\{[^{}]+\}", text), text
    assert organism.extract_answer(text) is not None


# ------------------------------------------------------------------------------------------- tokenizer
@needs_model
@pytest.mark.parametrize("text", [
    EXIT_TEXT, "Wait,", " wait ", "Hmm.", " hmm ", "Alternatively,", " alternatively ",
    "\nWait, 12 + 7 = 19, not 18.\n", "Final Answer: \\boxed{42}", "Hmm let me check (B).\n",
])
def test_tokenizer_round_trips_cues_and_exit_text(shipped, text):
    _, tok = shipped
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@needs_model
def test_cue_words_and_think_tags_are_single_tokens(shipped):
    _, tok = shipped
    for word in CUE_WORDS + tuple(" " + w for w in CUE_WORDS) + ("<think>", "</think>"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.decode(tok("<think>", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == "<think>"


@needs_model
def test_digits_are_single_tokens(shipped):
    _, tok = shipped
    ids = tok("1234567890", add_special_tokens=False)["input_ids"]
    assert len(ids) == 10
    assert tok.convert_ids_to_tokens(ids) == list("1234567890")


# ------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("family", FAMILIES)
def test_problem_splits_are_disjoint(family):
    questions = {split: {p["question"] for p in organism.problems(family, split, n=300)} for split in SPLITS}
    for split, qs in questions.items():
        assert len(qs) == 300
        assert all(split_of(q) == split for q in qs)
    assert not questions["train"] & questions["calibration"]
    assert not questions["train"] & questions["test"]
    assert not questions["calibration"] & questions["test"]


@pytest.mark.parametrize("family", FAMILIES)
def test_generators_are_deterministic_by_seed(family):
    a = organism.problems(family, "test", n=20, seed=5)
    assert a == organism.problems(family, "test", n=20, seed=5)
    assert a != organism.problems(family, "test", n=20, seed=6)
    assert render_trace(a[0], random.Random(1)) == render_trace(a[0], random.Random(1))
    assert len({p["id"] for p in a}) == 20


def test_arithmetic_answers_are_right_and_small():
    for p in organism.problems("arithmetic", "train", n=200, seed=1):
        value = p["meta"]["start"]
        for kind, _, k in p["meta"]["ops"]:
            value = value + k if kind == "add" else value - k if kind == "sub" else value * k
            assert 0 <= value <= 30
        assert 2 <= len(p["meta"]["ops"]) <= 5
        assert p["answer"] == str(value)


def test_compare_answer_is_the_letter_of_the_largest_value():
    for p in organism.problems("compare", "train", n=200, seed=1):
        values = [v for _, v in p["meta"]["options"]]
        assert p["answer"] == "ABCD"[values.index(max(values))]
        assert len(set(values)) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_closes_with_the_exit_text_and_cues_open_lines(family):
    """A prefix cut before any cue, plus EXIT_TEXT, reads like the trace's own end of thinking."""
    rng = random.Random(0)
    roles = set()
    for p in organism.problems(family, "train", n=100, seed=2):
        trace, events = render_trace(p, rng, annotate=True)
        assert trace.startswith("<think>\n")
        final = organism.extract_answer(trace)
        assert trace.endswith(EXIT_TEXT + final + "}")
        body = trace[len("<think>\n"): trace.index(EXIT_TEXT)]
        assert body.endswith(".\n") and "\n\n" not in body
        for e in events:
            roles.add(e["role"])
            assert trace[e["offset"]:].startswith(e["cue"])
            assert trace[: e["offset"]].endswith("\n")
            assert re.match(r"(wait|hmm|alternatively)(, |\. | )[^ ]", trace[e["offset"]:], re.IGNORECASE)
        harmful = any(e["role"] == "harmful" for e in events)
        assert (final == p["answer"]) != harmful
    assert roles == {"mid", "slip", "recheck", "harmful"}
