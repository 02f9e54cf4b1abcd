"""Answer extraction and checking: brace-matching `\\boxed{}` and a strict checker (math-verify, or exact letters).

The reference code extracts `\\boxed{...}` with a regex that stops at the first `}` (so `\\boxed{\\frac{1}{2}}`
becomes `\\frac{1`); here braces are matched.
"""

from __future__ import annotations

import re
import threading

_BOX = "\\boxed{"
_LETTER = re.compile(r"^\(?([A-Ea-e])\)?[.:]?$")


def close_box(text: str) -> str | None:
    """The content of a `\\boxed{` whose opening brace was already consumed: `text` up to the matching `}`.

    Nested braces are counted, so `\\frac{1}{2}` stays whole.

    Args:
        text: The text that follows `\\boxed{`.

    Returns:
        The boxed content, stripped; None if the brace never closes (the answer was cut off).

    Example:
        >>> close_box("\\\\frac{1}{2}} and more")
        '\\\\frac{1}{2}'
    """
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return text[:i].strip()
            depth -= 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces matched.

    The last box is the final answer when a model boxes intermediate results; braces are matched rather than cut at
    the first `}`.

    Args:
        text: A model's answer text.

    Returns:
        The content of the last box, stripped; None if there is no box or it is unclosed.

    Example:
        >>> extract_boxed("so \\\\boxed{1} then \\\\boxed{\\\\frac{a}{b}}.")
        '\\\\frac{a}{b}'
    """
    start = text.rfind(_BOX)
    if start < 0:
        return None
    return close_box(text[start + len(_BOX):])


def is_choice_letter(answer: str) -> bool:
    """True for a multiple-choice letter such as `B`, `(B)` or `b.`.

    Args:
        answer: An extracted answer.

    Returns:
        Whether `answer` is one letter A-E, optionally in parentheses or followed by `.` or `:`.

    Example:
        >>> is_choice_letter("(B)"), is_choice_letter("b."), is_choice_letter("12")
        (True, True, False)
    """
    return bool(_LETTER.match(answer.strip()))


def answers_match(predicted: str | None, gold: str) -> bool:
    """Strict check: multiple-choice letters match exactly (case-insensitive); anything else goes through math-verify.

    Identical strings match without math-verify; otherwise both sides are parsed as LaTeX math and compared by value
    (so `\\frac{1}{2}` matches `0.5`). Off the main thread math-verify's timeouts are disabled, since they rely on
    `signal.alarm`.

    Args:
        predicted: The extracted answer (e.g. from `extract_boxed`); None or blank never matches.
        gold: The reference answer.

    Returns:
        Whether the answers match.

    Example:
        >>> answers_match("\\\\frac{1}{2}", "0.5"), answers_match("(B)", "B"), answers_match(None, "3")
        (True, True, False)
    """
    if predicted is None or not predicted.strip():
        return False
    if is_choice_letter(gold):
        return is_choice_letter(predicted) and _LETTER.match(predicted.strip()).group(1).upper() == _LETTER.match(
            gold.strip()
        ).group(1).upper()
    if predicted.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only the main thread may set: elsewhere (a server thread
    # answering or auditing) it refuses unless they are off.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))
