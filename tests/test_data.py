"""Benchmark loaders on fixtures in the real Hub schemas, and answer extraction / checking."""

from __future__ import annotations

from pathlib import Path

import pytest

from lynx_hf.runtime.answers import answers_match, close_box, extract_boxed, is_choice_letter
from lynx_hf.pipeline.data import CHOICE_INSTRUCTION, load_benchmark

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_gsm8k_gold_is_the_number_after_the_hashes_without_thousands_separators():
    rows = load_benchmark("openai/gsm8k", data_files=str(FIXTURES / "gsm8k.jsonl"))
    assert [r["answer"] for r in rows] == ["72", "10", "14400"]
    assert rows[0]["question"].startswith("Natalia sold clips") and rows[0]["id"] == "gsm8k-0"
    assert len({r["id"] for r in rows}) == 3


def test_math500_keeps_latex_answers_and_unique_ids():
    rows = load_benchmark("HuggingFaceH4/MATH-500", data_files=str(FIXTURES / "math500.jsonl"), limit=2)
    assert len(rows) == 2
    assert rows[0]["id"] == "test/precalculus/807.json"
    assert rows[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and rows[1]["answer"] == "\\frac{14}{3}"
    assert rows[1]["question"].startswith("If $f(x)")


def test_commonsense_qa_lists_the_choices_and_asks_for_a_letter():
    rows = load_benchmark("tau/commonsense_qa", data_files=str(FIXTURES / "csqa.jsonl"))
    assert [r["answer"] for r in rows] == ["A", "A", "B"]
    assert rows[2]["question"].endswith("Choices: (A) doctor (B) bookstore (C) market (D) train station (E) mortuary")
    assert rows[0]["instruction"] == CHOICE_INSTRUCTION and rows[0]["id"] == "1afa02df02c908a558b4036e80242fac"


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(ValueError, match="openai/gsm8k"):
        load_benchmark("openai/gsm9k")


def test_the_boxed_answer_of_each_math500_solution_is_its_gold_answer():
    import json

    for line in (FIXTURES / "math500.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert extract_boxed(row["solution"]) == row["answer"]
        assert answers_match(extract_boxed(row["solution"]), row["answer"])


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # the reference's regex gives "\\frac{1"
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{1}, finally \\boxed{ 2 }", "2"),  # the last box, stripped
    ("\\boxed{{a}{b}}", "{a}{b}"),
    ("\\boxed{B}", "B"),
    ("the answer is 42", None),  # no box
    ("\\boxed{\\frac{1}{2}", None),  # cut off before the box closed
])
def test_extract_boxed_matches_braces(text, expected):
    assert extract_boxed(text) == expected


def test_close_box_reads_a_forced_answer_after_the_exit_text():
    assert close_box("\\frac{3}{4}} and then more") == "\\frac{3}{4}"
    assert close_box("12") is None


@pytest.mark.parametrize("predicted, gold, expected", [
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{14}{3}", "\\frac{14}{3}", True),
    ("14400", "14400", True),
    ("72", "27", False),
    ("(B)", "B", True),
    ("b.", "B", True),
    ("A", "B", False),
    ("B) bookstore", "B", False),  # strict: only a letter counts
    (None, "3", False),
    ("  ", "3", False),
])
def test_answers_match_is_strict(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


def test_choice_letters():
    assert is_choice_letter("(C)") and is_choice_letter("e:") and not is_choice_letter("F") and not is_choice_letter("AB")
