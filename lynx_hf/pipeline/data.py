"""Prompts and benchmark loaders by their Hub ids (GSM8K, MATH-500, CommonsenseQA), as `{id, question, answer}` dicts.

The loaders go through `datasets.load_dataset` with the real Hub ids; `data_files=` points the same code at a local
file in the same schema (how the tests run offline).
"""

from __future__ import annotations

import re
from collections.abc import Callable

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."


def build_prompt(tokenizer, question: str, instruction: str = R1_INSTRUCTION, **chat_template_kwargs) -> str:
    """The R1 evaluation prompt through the tokenizer's chat template (problem, then the instruction);
    `chat_template_kwargs` go to the template (e.g. Qwen3's `enable_thinking=True`).

    Example:
        >>> from lynx_hf import organism
        >>> _, tok = organism.load()
        >>> build_prompt(tok, "What is 2 + 2?").rstrip().endswith("<think>")
        True
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "This tokenizer has no chat template: pass prompt_fn=... (a function (tokenizer, question) -> str) "
            "that formats the prompt the way the model expects."
        )
    content = f"{question} {instruction}" if instruction else question
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False, **chat_template_kwargs)


def _gsm8k(row: dict, i: int) -> dict:
    # GSM8K answers end with "#### <number>"; commas are thousands separators.
    answer = row["answer"].split("####")[-1].strip().replace(",", "")
    return {"id": f"gsm8k-{i}", "question": row["question"], "answer": answer}


def _math500(row: dict, i: int) -> dict:
    return {"id": row.get("unique_id") or f"math500-{i}", "question": row["problem"], "answer": row["answer"]}


def _csqa(row: dict, i: int) -> dict:
    choices = " ".join(f"({label}) {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
    return {"id": row.get("id") or f"csqa-{i}", "question": f"{row['question']}\nChoices: {choices}",
            "answer": row["answerKey"], "instruction": CHOICE_INSTRUCTION}


BENCHMARKS: dict[str, tuple[dict, Callable[[dict, int], dict]]] = {
    "openai/gsm8k": ({"name": "main", "split": "test"}, _gsm8k),
    "HuggingFaceH4/MATH-500": ({"split": "test"}, _math500),
    # the test split of CommonsenseQA has no labels: evaluate on validation
    "tau/commonsense_qa": ({"split": "validation"}, _csqa),
}


def load_benchmark(hub_id: str, *, limit: int | None = None, data_files: str | None = None) -> list[dict]:
    """Load a benchmark by Hub id as a list of `{id, question, answer}` (+ `instruction` for multiple choice).

    `data_files` reads a local JSON/JSONL/parquet file in the same schema instead of the Hub.

    Example:
        >>> sorted(BENCHMARKS)
        ['HuggingFaceH4/MATH-500', 'openai/gsm8k', 'tau/commonsense_qa']
    """
    if hub_id not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {hub_id!r}: use one of {sorted(BENCHMARKS)}.")
    from .._extras import require

    load_dataset = require("datasets", extra="build", purpose="loading a benchmark").load_dataset

    options, convert = BENCHMARKS[hub_id]
    if data_files is not None:
        suffix = re.sub(r".*\.", "", str(data_files))
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix, "json")
        dataset = load_dataset(builder, data_files=str(data_files), split="train")
    else:
        dataset = load_dataset(hub_id, options.get("name"), split=options["split"])
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [convert(row, i) for i, row in enumerate(dataset)]
