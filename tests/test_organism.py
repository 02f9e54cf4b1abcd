"""The model organism: shipped weights and tokenizer, trace grammar, task generators and splits."""

from __future__ import annotations

import random
import re
import time

import pytest
import torch

from lynx_hf import organism
from lynx_hf.organism import tasks
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
    assert roles == {"mid", "slip", "verify", "misstated", "recheck", "harmful"}


def _last_result(text: str, family: str) -> str:
    """The latest computed result in a trace prefix: the last number (arithmetic; a slip's correction line
    "Wait, 14 * 2 = 28, not 29." counts as 28) or the running best (compare)."""
    if family == "arithmetic":
        return re.findall(r"\d+", re.sub(r", not \d+\.\n$", "", text))[-1]
    return re.findall(r"best: \(([A-D])\)", text)[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_cue_safety_follows_its_role(family):
    """Cues before the computation is complete, or right after a wrong statement, are unsafe; the rest are safe."""
    rng = random.Random(3)
    for p in organism.problems(family, "train", n=200, seed=3):
        _, events = render_trace(p, rng, annotate=True)
        for e in events:
            assert e["safe"] == (e["role"] in {"verify", "recheck", "harmful"}), e


@pytest.mark.parametrize("family", FAMILIES)
def test_done_but_not_said_stretch_verifies_before_stating(family):
    """After the last step, the trace often verifies before any answer is stated: the result is computed (an exit
    is safe) but no "answer is" has been written, so a text rule waiting for a statement keeps thinking."""
    rng = random.Random(4)
    with_stretch = 0
    for p in organism.problems(family, "train", n=300, seed=4):
        trace, events = render_trace(p, rng, annotate=True)
        verify = [e for e in events if e["role"] == "verify"]
        with_stretch += bool(verify)
        for e in verify:
            before = trace[: e["offset"]]
            assert "answer is" not in before
            assert _last_result(before, family) == p["answer"]
            assert "So the answer is" in trace[e["offset"]:]
        if verify:  # the stretch comes after every computation cue and before every re-check
            first_verify = events.index(verify[0])
            assert all(e["role"] in {"mid", "slip"} for e in events[:first_verify])
            assert all(e["role"] not in {"mid", "slip"} for e in events[first_verify:])
    assert 0.4 < with_stretch / 300 < 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_misstated_answer_is_corrected_by_the_next_cue(family):
    """A stated answer can be a slip; the very next line is a cue that corrects it, and the trace ends right
    unless a later harmful re-check changes it."""
    rng = random.Random(5)
    misstated = 0
    for p in organism.problems(family, "train", n=300, seed=5):
        trace, events = render_trace(p, rng, annotate=True)
        for e in (e for e in events if e["role"] == "misstated"):
            misstated += 1
            before, after = trace[: e["offset"]], trace[e["offset"]:]
            stated = re.fullmatch(r"(?s).*\nSo the answer is (\w+)\.\n", before)
            assert stated and stated.group(1) != p["answer"]
            assert before.count("answer is") == 1  # the slip is the first statement
            assert f"So the answer is {p['answer']}, not {stated.group(1)}.\n" in after
            harmful = any(x["role"] == "harmful" for x in events)
            assert (organism.extract_answer(trace) == p["answer"]) != harmful
    assert abs(misstated / 300 - tasks.P_MISSTATE) < 0.1  # one trace in P_MISSTATE has its answer misstated


@pytest.mark.parametrize("knob, value, role", [("P_MISSTATE", 0.0, "misstated"), ("P_VERIFY", (0.0, 0.0), "verify"),
                                               ("P_HARMFUL", 0.0, "harmful")])
def test_grammar_knobs_switch_parts_off(monkeypatch, knob, value, role):
    from lynx_hf.organism import tasks

    assert knob in tasks.GRAMMAR_KNOBS
    monkeypatch.setattr(tasks, knob, value)
    rng = random.Random(6)
    for family in FAMILIES:
        for p in organism.problems(family, "train", n=150, seed=6):
            _, events = render_trace(p, rng, annotate=True)
            assert role not in {e["role"] for e in events}


@needs_model
def test_load_reads_a_given_model_folder(tmp_path):
    model, tok = organism.load(model_dir=organism.MODEL_DIR)
    assert tok.padding_side == "left" and not model.training
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        organism.load(model_dir=tmp_path)


def _train_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_organism.py"
    spec = importlib.util.spec_from_file_location("train_organism", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_pools_depend_only_on_seed_and_index():
    """Training data are the same whatever the number of data workers: pool j is a function of (seed, j)."""
    train = _train_script()
    tok = train.build_tokenizer(train.grammar_words(n=300))
    a = train.draw_pool(tok, 7, 0)
    assert a == train.draw_pool(tok, 7, 0)
    assert a != train.draw_pool(tok, 7, 1)
    assert len(a) == train.BATCH_SIZE * train.BUCKET
    assert all(len(ids) <= train.MAX_LEN and ids[-1] == tok.eos_token_id for ids, _ in a)
    assert train.parse_knob("0.6,0.5") == (0.6, 0.5) and train.parse_knob("0.08") == 0.08
