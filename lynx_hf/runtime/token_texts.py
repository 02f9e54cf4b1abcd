"""The text of every token id of a tokenizer, case-folded one character per character: what the cue detector
compiles its tables from (`cues.py`).

Example:
    >>> fold("WAIT, Hmm")
    'wait, hmm'
"""

from __future__ import annotations


def fold(text: str) -> str:
    """Lower-case character by character, keeping one character per character (so positions line up)."""
    low = text.lower()
    if len(low) == len(text) and "ς" not in low:  # no character grew, no context-dependent final sigma
        return low
    out = []
    for ch in text:
        low = ch.lower()
        out.append(low if len(low) == 1 else ch)
    return "".join(out)


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id stands for, decoded behind a fixed prefix so leading spaces survive."""
    prefix = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    kwargs = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    prefix_text = tokenizer.decode(prefix, **kwargs) if prefix else ""
    sequences = [prefix + [i] for i in range(vocab_size)]
    decoded = _decode_batch(tokenizer, sequences, kwargs)
    strings = []
    for i, text in enumerate(decoded):
        if text.startswith(prefix_text):
            strings.append(text[len(prefix_text):])
        else:
            strings.append(tokenizer.decode([i], **kwargs))
    return strings


def _decode_batch(tokenizer, sequences: list[list[int]], kwargs: dict) -> list[str]:
    """`tokenizer.batch_decode(sequences)`, straight through the Rust backend of a fast tokenizer when that gives the
    same text (checked on a sample): transformers' per-sequence Python conversions cost seconds at 150k tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            fast = backend.decode_batch(sequences, skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - any backend refusal: take the general path
            fast = None
        if fast is not None:
            step = max(1, len(sequences) // 200)
            sample = list(range(0, len(sequences), step))[:200] + list(range(max(0, len(sequences) - 50), len(sequences)))
            reference = tokenizer.batch_decode([sequences[i] for i in sample], **kwargs)
            if all(fast[i] == text for i, text in zip(sample, reference)):
                return fast
    return tokenizer.batch_decode(sequences, **kwargs)


def id_space(tokenizer) -> int:
    """One more than the largest token id (added tokens may leave holes above the base vocabulary)."""
    size = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if backend is not None and added is not None:
        return max([size, backend.get_vocab_size(with_added_tokens=False)] + [int(i) + 1 for i in added])
    vocab = tokenizer.get_vocab()
    return max(size, max(vocab.values()) + 1) if vocab else size


def fold_all(strings: list[str]) -> list[str]:
    """`[fold(s) for s in strings]`, taking `str.lower` straight wherever it keeps each character one character."""
    return [low if len(low) == len(s) and "ς" not in low else fold(s) for s, low in zip(strings, map(str.lower, strings))]
