"""Thinking formats: how a reasoning model opens and closes its thinking, and what it writes when it closes it itself.

The forced exit must look like the model's own end of thinking, so the exit text is taken from the model's format
(its tokenizer's special tokens and its chat template), never a hard-coded `</think>`:

| preset | models | thinking | exit text (then the answer prompt `Final Answer: \\boxed{`) |
|---|---|---|---|
| `think` | DeepSeek-R1 distills, QwQ-32B, Phi-4-reasoning, EXAONE 4 | `<think>` ... `</think>` | `"\\n</think>\\n\\n"` |
| `think` + `enable_thinking` | Qwen3, SmolLM3 (chat template takes `enable_thinking`) | same, prompts built with `enable_thinking=True` | same |
| `magistral` | Magistral, Ministral reasoning | `[THINK]` ... `[/THINK]` | `"[/THINK]"` |
| `harmony` | gpt-oss | analysis channel, then final channel | `"<|end|><|start|>assistant<|channel|>final<|message|>"` |

`detect_thinking(tokenizer)` picks the preset from the tokenizer's own vocabulary (a marker that is a single token
there is what the model writes) and its chat template; `resolve_thinking(...)` lets any of the three strings be
given explicitly instead (e.g. for a model whose markers are ordinary text). A tokenizer with neither gets a clear
error saying how to pass them. `thinking_exit_ids` encodes the exit text with the closing marker as the model's
single token id, never spelled out in characters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from ..errors import LynxConfigError

logger = logging.getLogger(__name__)

ANSWER_PROMPT = "Final Answer: \\boxed{"

__all__ = ["ANSWER_PROMPT", "PRESETS", "ThinkingFormat", "detect_thinking", "resolve_thinking", "thinking_exit_ids"]


@dataclass(frozen=True)
class ThinkingFormat:
    """One model family's thinking markers and exit text.

    The presets in `PRESETS` cover the common families; `detect_thinking` picks one from a tokenizer and
    `resolve_thinking` overrides any of the strings.

    Args:
        name: The preset's name (`"think"`, `"magistral"`, `"harmony"`; `"+custom"` appended when strings were
            overridden).
        think_start: Text that opens the thinking block; None when generation starts inside it.
        think_end: Text that closes the thinking block.
        exit_text: What the model writes when it closes its thinking by itself, followed by the answer prompt
            (`ANSWER_PROMPT`); the forced exit appends it.
        chat_template_kwargs: What prompts must be built with for the model to think (Qwen3's
            `enable_thinking=True`); empty by default.

    Example:
        >>> PRESETS["think"].exit_text
        '\\n</think>\\n\\nFinal Answer: \\\\boxed{'
        >>> PRESETS["magistral"].think_end
        '[/THINK]'
    """

    name: str
    think_start: str | None
    think_end: str
    exit_text: str
    chat_template_kwargs: dict = field(default_factory=dict)


PRESETS: dict[str, ThinkingFormat] = {
    "think": ThinkingFormat("think", "<think>", "</think>", "\n</think>\n\n" + ANSWER_PROMPT),
    "magistral": ThinkingFormat("magistral", "[THINK]", "[/THINK]", "[/THINK]" + ANSWER_PROMPT),
    "harmony": ThinkingFormat(
        "harmony", "<|channel|>analysis<|message|>", "<|end|>",
        "<|end|><|start|>assistant<|channel|>final<|message|>" + ANSWER_PROMPT,
    ),
}
# Single tokens that identify each preset in a tokenizer's vocabulary, checked in this order.
_SIGNATURES = (
    ("harmony", ("<|channel|>", "<|message|>", "<|end|>")),
    ("magistral", ("[THINK]", "[/THINK]")),
    ("think", ("<think>", "</think>")),
)


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: look at all of them
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _single_token(tokenizer, text: str) -> int | None:
    """The id of `text` if the tokenizer has it as one token (an added/special token or a vocabulary entry)."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if isinstance(token_id, int) and token_id >= 0 and tokenizer.convert_ids_to_tokens(token_id) == text:
        return int(token_id)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def detect_thinking(tokenizer) -> ThinkingFormat:
    """The thinking format of the model this tokenizer belongs to (see the module docstring for the presets).

    A marker that is a single token in the vocabulary is what the model writes; failing that, markers spelled in
    the model's own chat template count. A chat template that takes `enable_thinking` adds it to
    `chat_template_kwargs`.

    Args:
        tokenizer: The model's Hugging Face tokenizer.

    Returns:
        The matching preset.

    Raises:
        LynxConfigError: When neither the vocabulary nor the chat template has thinking markers; the message says
            how to pass them explicitly.

    Example:
        >>> from lynx_hf import organism
        >>> _, tok = organism.load()
        >>> detect_thinking(tok).name
        'think'
    """
    template = _template_text(tokenizer)
    found = None
    for name, markers in _SIGNATURES:
        if all(_single_token(tokenizer, m) is not None for m in markers):
            found = PRESETS[name]
            break
    if found is None:
        # Markers spelled as ordinary text, but part of the model's own chat template.
        for name, markers in _SIGNATURES:
            if all(m in template for m in markers):
                found = PRESETS[name]
                break
    if found is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise LynxConfigError(
            f"The tokenizer {name!r} has no thinking markers (no <think>/</think>, [THINK]/[/THINK] or gpt-oss "
            "channel tokens, and none in its chat template), so lynx-hf cannot tell where the model thinks. Pass "
            "them explicitly: LynxConfig(..., think_start='<think>', think_end='</think>', "
            "exit_text='\\n</think>\\n\\nFinal Answer: \\\\boxed{') or Collector(..., think_start=..., "
            "think_end=..., exit_text=...) (`lynx-hf collect/build --think-start/--think-end/--exit-text`), or "
            f"a preset name thinking=... from {sorted(PRESETS)}."
        )
    if "enable_thinking" in template:
        found = replace(found, chat_template_kwargs={"enable_thinking": True})
    return found


def resolve_thinking(
    tokenizer,
    think_start: str | None = None,
    think_end: str | None = None,
    exit_text: str | None = None,
    preset: str | None = None,
) -> ThinkingFormat:
    """The thinking format to use: explicit strings win, then the named `preset`, then `detect_thinking`.

    Detection runs only when something is left unset, so a fully explicit format works for any tokenizer.

    Args:
        tokenizer: The model's Hugging Face tokenizer.
        think_start: Opening marker; None takes the preset's or the detected one.
        think_end: Closing marker; None takes the preset's or the detected one.
        exit_text: Exit text; None takes the preset's or the detected one.
        preset: A name from `PRESETS`; None detects the format from the tokenizer.

    Returns:
        The format, named after its base with `"+custom"` appended when a string was overridden.

    Raises:
        LynxConfigError: If `preset` is unknown, or detection is needed and finds no markers.

    Example:
        >>> from lynx_hf.runtime.cues import _example_tokenizer
        >>> resolve_thinking(_example_tokenizer(), "<think>", "</think>", "</think> so").exit_text
        '</think> so'
    """
    if preset is not None and preset not in PRESETS:
        raise LynxConfigError(f"Unknown thinking preset {preset!r}: use one of {sorted(PRESETS)}.")
    if think_start is not None and think_end is not None and exit_text is not None:
        return ThinkingFormat("custom", think_start, think_end, exit_text)
    base = PRESETS[preset] if preset else detect_thinking(tokenizer)
    if preset and "enable_thinking" in _template_text(tokenizer):
        base = replace(base, chat_template_kwargs={"enable_thinking": True})
    changed = {k: v for k, v in (("think_start", think_start), ("think_end", think_end), ("exit_text", exit_text))
               if v is not None}
    return replace(base, name=base.name if not changed else base.name + "+custom", **changed)


def thinking_exit_ids(tokenizer, fmt: ThinkingFormat) -> list[int]:
    """Token ids of `fmt.exit_text`, holding the closing marker as the model's single token.

    The ids are checked to decode back to the exit text and, where the tokenizer has the closing marker as one
    token, to hold that token (never the marker spelled out in characters).

    Args:
        tokenizer: The model's Hugging Face tokenizer.
        fmt: The thinking format whose exit text to encode.

    Returns:
        The exit text's token ids.

    Raises:
        LynxConfigError: If the exit text does not round-trip through the tokenizer, or spells the closing marker
            in several tokens where the model writes one.

    Example:
        >>> from lynx_hf import organism
        >>> _, tok = organism.load()
        >>> ids = thinking_exit_ids(tok, detect_thinking(tok))
        >>> tok.convert_tokens_to_ids("</think>") in ids
        True
    """
    from .exit import exit_token_ids

    ids = exit_token_ids(tokenizer, fmt.exit_text)
    marker = _single_token(tokenizer, fmt.think_end) if fmt.think_end else None
    if marker is not None and fmt.think_end in fmt.exit_text and marker not in ids:
        raise LynxConfigError(
            f"The exit text {fmt.exit_text!r} encodes the closing marker {fmt.think_end!r} as several tokens, but the "
            f"model writes it as the single token {marker}: the forced exit would not look like the model's own. "
            "Check that the tokenizer's added tokens are not normalised away, or pass exit token ids built with "
            "that token."
        )
    return ids
