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
    """The R1 evaluation prompt through the tokenizer's chat template: the problem, then the instruction.

    Probes are collected and calibrated on prompts built this way; the guarantee holds for prompts built the same
    way at run time.

    Args:
        tokenizer: The model's tokenizer, with a chat template.
        question: The problem text.
        instruction: Appended after the question (default: R1's "reason step by step ... \\boxed{}"); empty
            leaves the question alone.
        **chat_template_kwargs: Passed to the chat template (e.g. Qwen3's `enable_thinking=True`).

    Returns:
        The prompt text, with the assistant turn opened (generation prompt added).

    Raises:
        ValueError: If the tokenizer has no chat template (pass a `prompt_fn` instead).

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

    Args:
        hub_id: One of `BENCHMARKS`: `"openai/gsm8k"`, `"HuggingFaceH4/MATH-500"`, `"tau/commonsense_qa"`.
        limit: Keep only the first `limit` problems; None (default) keeps all.
        data_files: A local file in the benchmark's Hub schema to read instead of the Hub.

    Returns:
        One dict per problem, with `id`, `question`, `answer` and, for multiple choice, `instruction`.

    Raises:
        ValueError: If `hub_id` is not a known benchmark.
        MissingExtraError: If `datasets` (the `build` extra) is not installed.

    Example:
        >>> sorted(BENCHMARKS)
        ['HuggingFaceH4/MATH-500', 'openai/gsm8k', 'tau/commonsense_qa']
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "gsm8k.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"question": "What is 2 + 2?", "answer": "Add.\\n#### 4"}) + "\\n")
        >>> load_benchmark("openai/gsm8k", data_files=path)
        [{'id': 'gsm8k-0', 'question': 'What is 2 + 2?', 'answer': '4'}]
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
