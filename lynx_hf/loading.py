"""Loading what a pipeline run needs by name: a model and tokenizer, problems, and the prompt format of a model.

The library side of the CLI's `--model` and `--problems` arguments, so that evaluation and collection code can load
the same things without importing the CLI (the import graph reads runtime <- pipeline <- evaluation <- CLI).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

PROBLEM_SOURCES = "organism:<family>:<split>[:prompts] | a benchmark Hub id (openai/gsm8k, " \
                  "HuggingFaceH4/MATH-500, tau/commonsense_qa) | a local .jsonl file, one problem a line: " \
                  "{id, question, answer}, or prompts only ({question} or {problem} or {prompt}, optional id and " \
                  "answer; build them with --labels agreement); ':prompts' strips the organism's answers"
PROMPT_FIELDS = ("question", "problem", "prompt")

__all__ = ["PROBLEM_SOURCES", "load_model", "load_problems", "prompt_fn"]


def load_model(name: str, gguf_file: str | None = None, device: str | None = None):
    """`organism` (the shipped model organism), a local folder or a Hub id; returns (model, tokenizer).

    The tokenizer pads on the left (batched generation); without `device`, a CUDA machine places the model with
    `device_map="auto"`.

    Example:
        >>> model, tokenizer = load_model("organism")
        >>> tokenizer.padding_side
        'left'
    """
    if name == "organism":
        from . import organism

        return organism.load(device or "cpu")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    tokenizer.padding_side = "left"
    options = {"dtype": "auto"}
    if device is None and torch.cuda.is_available():
        options["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(name, **extra, **options).eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def load_problems(source: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Problems from a source string (see `PROBLEM_SOURCES`): dicts with `id`, `question` and, where the source has
    one, a gold `answer`.

    A local JSONL file may hold prompts only: each line's text is its `question`, `problem` or `prompt` field (the
    first present), its id the `id` field or `<file stem>-<line>`; such problems are built with agreement labels
    (`--labels agreement`). `organism:<family>:<split>:prompts` is the organism's problems with their answers
    stripped (unlabelled prompts for tests and demos).

    Example:
        >>> load_problems("organism:compare:test:prompts", n=1)[0].keys()
        dict_keys(['id', 'question'])
        >>> [p["id"] for p in load_problems("organism:arithmetic:test", n=2)] == \\
        ...     [p["id"] for p in load_problems("organism:arithmetic:test", n=2)]
        True
    """
    if n is not None and n < 1:
        raise ValueError(f"n={n}: give a positive number of problems, or leave it out for all of them.")
    if source.startswith("organism:"):
        from . import organism

        parts = source.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "prompts"):
            raise ValueError(f"{source!r}: write organism:<family>:<split>[:prompts], e.g. organism:arithmetic:train "
                             "(':prompts': without the answers).")
        problems = organism.problems(parts[1], parts[2], n=n or 500, seed=seed)
        if len(parts) == 4:
            problems = [{"id": p["id"], "question": p["question"]} for p in problems]
        return problems
    if source.endswith((".jsonl", ".json")) and not Path(source).is_file():
        raise FileNotFoundError(f"{source} not found: give an existing .jsonl file of {{id, question, answer}}.")
    if Path(source).is_file():
        lines = Path(source).read_text(encoding="utf-8").splitlines()
        rows = [_problem_row(json.loads(line), i, Path(source)) for i, line in enumerate(lines) if line.strip()]
        return rows[:n] if n else rows
    from .pipeline.data import load_benchmark

    return load_benchmark(source, limit=n)


def prompt_fn(model_name: str) -> Callable | None:
    """The prompt builder of a model: the organism's own for `organism`, else None (the collector's default:
    the question plus R1's instruction through the tokenizer's chat template).

    Example:
        >>> prompt_fn("organism").__name__, prompt_fn("Qwen/Qwen2.5-0.5B") is None
        ('prompt', True)
    """
    if model_name == "organism":
        from . import organism

        return organism.prompt
    return None


def _problem_row(row: dict, i: int, path: Path) -> dict:
    """One line of a problems file as a problem: `question` from the first of `PROMPT_FIELDS` present, `id` given or
    `<stem>-<line>`; every other field (a gold `answer`, an `instruction`) kept."""
    if not isinstance(row, dict):
        raise ValueError(f"{path}, line {i + 1}: expected a JSON object such as {{\"prompt\": \"...\"}}.")
    text = next((row[k] for k in PROMPT_FIELDS if row.get(k) not in (None, "")), None)
    if text is None:
        raise ValueError(f"{path}, line {i + 1}: no question: give a 'question', 'problem' or 'prompt' field.")
    problem = {k: v for k, v in row.items() if k not in PROMPT_FIELDS}
    problem["id"] = str(row["id"]) if row.get("id") not in (None, "") else f"{path.stem}-{i}"
    problem["question"] = str(text)
    return problem
