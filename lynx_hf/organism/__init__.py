"""The model organism: a ~1M-parameter Llama, shipped with the package, that reasons in R1-style traces and overthinks.

It was trained from scratch by ``scripts/train_organism.py`` (``make organism``) on the synthetic traces of
:mod:`lynx_hf.organism.tasks`: step-by-step arithmetic inside ``<think> ... </think>``, slips corrected after
"Wait", pauses mid-computation, verification after the last step before the answer is stated, stated answers with
a slip that the next "Wait" corrects, redundant re-checks after the answer is already right, and, now and then, a
re-check that talks itself out of a right answer (grammar v3, documented in :mod:`lynx_hf.organism.tasks`; the
shipped weights: 2400 steps on one GPU, recorded in ``model/training.json``).
Everything runs offline on a CPU in seconds, so the whole LYNX method (collect, train the probe, calibrate, exit
early) can be demonstrated and tested without the Hub.

Example:
    >>> import torch
    >>> from lynx_hf import organism
    >>> model, tokenizer = organism.load()
    >>> problem = organism.problems("arithmetic", "test", n=1)[0]
    >>> inputs = tokenizer(organism.prompt(tokenizer, problem["question"]), return_tensors="pt",
    ...                    add_special_tokens=False)
    >>> out = model.generate(**inputs, do_sample=False, max_new_tokens=768)
    >>> text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    >>> "</think>" in text and organism.extract_answer(text) is not None
    True

The forced exit LYNX uses is ``prefix + EXIT_TEXT`` followed by greedy decoding up to ``}``; the organism's own
traces close their thinking block with exactly that text, so the exit is in distribution.
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.answers import extract_boxed as extract_answer
from .tasks import CUE_WORDS, EXIT_TEXT, FAMILIES, PROMPT_SUFFIX, problems, render_trace, split_of, user_message

__all__ = [
    "BUNDLE_DIR",
    "CUE_WORDS",
    "EXIT_TEXT",
    "FAMILIES",
    "MODEL_DIR",
    "PROMPT_SUFFIX",
    "TEMPERATURE",
    "extract_answer",
    "load",
    "problems",
    "prompt",
    "render_trace",
    "split_of",
]

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""Folder of the shipped organism (safetensors weights, config, tokenizer with chat template); loadable with
``AutoModelForCausalLM.from_pretrained(MODEL_DIR)`` and ``AutoTokenizer.from_pretrained(MODEL_DIR)``."""

BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"
"""Folder of the LYNX probe bundle trained for the organism (shipped next to it when present)."""

TEMPERATURE = 1.2
"""The organism's sampling temperature (with top_p 0.95): its generation config's, and the one its bundle's tables
and the demo's test events are sampled at. The organism's distribution is much sharper than a real reasoning
model's, and at R1's usual 0.6 its rarer behaviours are sharpened away (on arithmetic, a re-check that talks itself
out of a right answer ends 0.4% of traces where the grammar writes one in 8%); at 1.2 they occur as often as its
design targets ask (4.0%; docs/benchmarks/organism.md, docs/organism_variants.md)."""

def load(device: str = "cpu", model_dir: str | Path | None = None):
    """The shipped organism and its tokenizer, loaded offline; the model is in eval mode.

    The tokenizer pads on the left, ready for batched generation. Loading takes about a second on a CPU.

    Args:
        device: Where to put the model (default `"cpu"`).
        model_dir: A folder written by ``scripts/train_organism.py --out``; None (default) loads `MODEL_DIR`.

    Returns:
        `(model, tokenizer)`: a transformers `LlamaForCausalLM` and its tokenizer.

    Raises:
        FileNotFoundError: If the folder holds no model (train it with `make organism`, or reinstall lynx-hf).

    Example:
        >>> from lynx_hf import organism
        >>> model, tokenizer = organism.load()
        >>> type(model).__name__, tokenizer.padding_side, model.training
        ('LlamaForCausalLM', 'left', False)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir) if model_dir is not None else MODEL_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"the model organism is missing from {folder}; train it with `make organism` "
            "(scripts/train_organism.py --out FOLDER) or reinstall lynx-hf")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
    return model, tokenizer


def prompt(tokenizer, question: str) -> str:
    """The chat-formatted prompt for ``question``, opened inside the thinking block.

    A user turn with R1's instruction, then the assistant turn opened inside its thinking block (it ends with
    ``"<think>\\n"``). The template already holds the BOS token and the tokenizer adds none of its own, so
    ``add_special_tokens`` makes no difference.

    Args:
        tokenizer: The organism's tokenizer (from `load`).
        question: The problem text (e.g. a problem's ``"question"`` from `problems`).

    Returns:
        The prompt text.

    Example:
        >>> from lynx_hf import organism
        >>> _, tokenizer = organism.load()
        >>> organism.prompt(tokenizer, "What is 2 + 2?").endswith("<think>\\n")
        True
    """
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message(question)}],
                                         tokenize=False, add_generation_prompt=True)
