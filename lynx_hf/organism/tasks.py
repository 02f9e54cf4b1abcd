"""Seeded task generators and R1-style reasoning traces for the model organism.

Two task families with ground truth:

* ``arithmetic``: multi-step word problems ("Ann has 12 coins. She finds 7. She doubles them. ...") over small integers,
  every intermediate value kept in 0..30. The organism is trained on it and the probe is trained on it.
* ``compare``: multiple-choice questions ("Which option has the largest value? (A) 3 * 7 (B) 25 ..."),
  answered with a letter A-D. A held-out *format* family: the organism sees it in training, the probe never does.

:func:`render_trace` writes the reasoning the organism learns to imitate (grammar v3). Reflection cues ("Wait",
"Hmm", "Alternatively", in varied case and punctuation) open a new line. A trace has four parts, each modelling
something real R1 traces do, and each cue is annotated with its role and whether an exit just before it is safe:

1. **Computation** (arithmetic: one line per step, ``"finds 7: 12 + 7 = 19"``; compare: one line per option with
   the running best). Cues inside it are R1's pauses mid-derivation (``"mid"``: "Wait, let me keep going."; an
   exit there is premature, unsafe) and slips of arithmetic caught on the next line (``"slip"``: a step written
   with a wrong result, then "Wait, 12 + 7 = 19, not 18."; unsafe).
2. **Done but not said** (``"verify"``, safe): the last step is computed, and before stating anything the trace
   verifies, as R1 often does ("Hmm, before I answer, let me go over the steps." and the steps again). The result
   is in the text but no answer was stated, so a text rule that waits for "answer is" keeps thinking here, while
   a forced exit can copy the computed result and the model's state knows the computation is complete.
3. **Statement** ("So the answer is 18."). In a minority of traces it is a slip of the pen, the wrong number
   (off by one) or the runner-up letter, and the very next cue corrects it (``"misstated"``: "Wait, I stated
   that wrong." / the last step again / "So the answer is 18, not 17."); like R1's "wait, that's wrong" after a
   sloppy conclusion. Exiting at that cue would copy the wrong statement, so "an answer was stated" is unsafe
   there, while the model, trained to correct the slip, carries the mismatch in its state.
4. **Re-checks** (``"recheck"``, safe): redundant verification of a right stated answer, the overthinking LYNX
   removes ("Hmm, let me double-check." / the steps / "Yes, the answer is 18."); in a few traces the last
   re-check talks itself out of the right answer (``"harmful"``: safe before it, the trace ends wrong), R1's
   overthinking that hurts.

The ``P_*`` knobs (:data:`GRAMMAR_KNOBS`) set how often each optional part occurs. Every reasoning line ends with
``"\n"`` and the thinking block closes with ``EXIT_TEXT``, so a prefix cut just before a cue plus ``EXIT_TEXT``
reads exactly like a normal end of thinking.

Splits are disjoint by construction: a question's split is a function of a hash of its text.

Example:
    >>> from lynx_hf.organism.tasks import problems, render_trace
    >>> import random
    >>> p = problems("arithmetic", "test", n=1, seed=0)[0]
    >>> sorted(p)[:4]
    ['answer', 'family', 'id', 'meta']
    >>> trace = render_trace(p, random.Random(0))
    >>> trace.startswith("<think>\\n") and trace.endswith("\\\\boxed{" + p["answer"] + "}")
    True
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ..runtime.exit import DEFAULT_EXIT_TEXT

__all__ = [
    "CUE_WORDS",
    "GRAMMAR_KNOBS",
    "EXIT_TEXT",
    "FAMILIES",
    "PROMPT_SUFFIX",
    "SPLITS",
    "problems",
    "render_trace",
    "sample_problem",
    "split_of",
    "user_message",
]

EXIT_TEXT = DEFAULT_EXIT_TEXT
"""Text appended to a prefix to force the answer; also exactly how every trace closes its thinking block."""

PROMPT_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction appended to each question, as in DeepSeek-R1 evaluation."""

CUE_WORDS = ("Wait", "wait", "Hmm", "hmm", "Alternatively", "alternatively")
FAMILIES = ("arithmetic", "compare")
SPLITS = ("train", "calibration", "test")

# Split = hash(question) mod 10: 0-7 train, 8 calibration, 9 test.
_SPLIT_OF_BUCKET = ("train",) * 8 + ("calibration", "test")

# Knobs of the trace grammar (GRAMMAR_KNOBS names the ones scripts/train_organism.py can override). Choices are
# made at >= 50% where they must survive sampling at a low temperature (which sharpens every choice towards its
# likelier side; the organism is sampled at 1.2, `organism.TEMPERATURE`, where the rarer ones come back).
P_MID_CUE = 0.75  # a cue line between two computation steps (exit there is premature)
P_SLIP = 0.1  # a computation step written with a wrong result, corrected on the next line after a cue
P_VERIFY = (0.6, 0.5)  # a 1st, 2nd verification block after the last step, before the answer is stated
P_MISSTATE = 0.35  # the answer is first stated wrong (off by one / the runner-up), corrected after the next cue
P_RECHECK = (0.95, 0.75, 0.5)  # probability of a 1st, 2nd, 3rd re-check block after the answer is stated
MAX_VALUE = 30  # arithmetic values stay in 0..MAX_VALUE, small enough for a 1M-parameter model to learn
P_HARMFUL = 0.08  # a trace's last re-check "finds a mistake" and changes a right answer into a wrong one
# (0.2 in the first shipped organism capped its sampled accuracy near 80%; 0.06 kept >= 3% such traces in v2;
# the shipped v3 weights were trained with P_HARMFUL = 0.08 and P_MISSTATE = 0.35, the variant picked on a GPU)
_P_FULL_COMPARE = 0.25  # share of compare checks that rescan all options (its lines are long; arithmetic: 0.6)
GRAMMAR_KNOBS = ("P_MID_CUE", "P_SLIP", "P_VERIFY", "P_MISSTATE", "P_RECHECK", "P_HARMFUL")
_CUE_WEIGHTS = {"Wait": 0.4, "Hmm": 0.3, "wait": 0.1, "hmm": 0.1, "Alternatively": 0.1}
_PUNCT_WEIGHTS = {",": 0.6, ".": 0.2, " ": 0.2}

_NAMES = (("Ann", "She", "her"), ("Ben", "He", "his"), ("Cara", "She", "her"), ("Dan", "He", "his"),
          ("Eva", "She", "her"), ("Finn", "He", "his"), ("Gia", "She", "her"), ("Hugo", "He", "his"))
_ITEMS = ("coins", "apples", "stickers", "marbles", "cards", "shells", "books", "stamps")
_ADD_VERBS = ("finds", "gets", "buys")
_SUB_VERBS = ("loses", "gives away", "uses")
_LETTERS = "ABCD"

_MID_PHRASES = ("what comes next?", "there is more.", "let me keep going.", "not done yet.", "one step at a time.")
_MID_PHRASES_ALT = ("I could go on step by step.", "let me continue from here.")
_FULL_PHRASES = ("let me double-check.", "let me check it again.", "let me verify from the start.")
_FULL_PHRASES_ALT = ("let me redo it from the start.", "I can recompute everything.")
_LAST_PHRASES = ("let me check the last step.", "is the last step right?")
_LAST_PHRASES_ALT = ("I can check the last step.",)
_VERIFY_PHRASES = ("before I answer, let me go over the steps.", "let me verify the steps first.")
_VERIFY_PHRASES_ALT = ("I could verify each step first.",)
_VERIFY_LAST_PHRASES = ("let me verify the last step first.", "before I answer, is the last step right?")
_MISSTATED_PHRASES = ("that is not what I computed.", "I stated that wrong.")
_HARMFUL_PHRASES = ("maybe I made a mistake.", "that does not look right.")


def user_message(question: str) -> str:
    """The user turn for a question: the question followed by R1's evaluation instruction."""
    return question + PROMPT_SUFFIX


def split_of(question: str) -> str:
    """The split ("train", "calibration" or "test") a question belongs to, from a stable hash of its text."""
    bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 10
    return _SPLIT_OF_BUCKET[bucket]


def problems(family: str, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``family`` from ``split``, reproducible from ``seed``.

    Each problem is a dict with ``id``, ``question`` (without the instruction suffix, see :func:`user_message`),
    ``answer`` (a string: an integer for arithmetic, a letter for compare), ``family`` and ``meta`` (the
    structure :func:`render_trace` needs). A question belongs to exactly one split, so splits never overlap.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rng = random.Random(f"{family}/{split}/{seed}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * (n + 10):
            raise RuntimeError(f"could not draw {n} distinct {family} problems for split {split!r}")
        p = sample_problem(family, rng)
        if p["question"] in seen or split_of(p["question"]) != split:
            continue
        seen.add(p["question"])
        p["id"] = f"{family}-{split}-{seed}-{len(out)}"
        out.append(p)
    return out


def sample_problem(family: str, rng: random.Random) -> dict[str, Any]:
    """One random problem of ``family`` (any split; see :func:`split_of`), without an ``id``."""
    if family == "arithmetic":
        return _arithmetic(rng)
    if family == "compare":
        return _compare(rng)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


# --------------------------------------------------------------------------------------------- generators
def _arithmetic(rng: random.Random) -> dict[str, Any]:
    name, pron, poss = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    value = rng.randint(2, 15)
    start = value
    ops: list[tuple[str, str, int]] = []  # (kind, verb, operand)
    used: set[tuple[str, int]] = set()
    n_steps = rng.randint(2, 5)
    while len(ops) < n_steps:
        choices = []
        if value <= MAX_VALUE // 2 and ("doubles", 2) not in used:
            choices.append("double")
        if value < MAX_VALUE:
            choices += ["add", "add"]
        if value >= 2:
            choices += ["sub", "sub"]
        kind = rng.choice(choices)
        if kind == "double":
            verb, k = "doubles", 2
        elif kind == "add":
            verb, k = rng.choice(_ADD_VERBS), rng.randint(1, min(9, MAX_VALUE - value))
        else:
            verb, k = rng.choice(_SUB_VERBS), rng.randint(1, min(9, value))
        if (verb, k) in used:  # a repeated phrase would make "which step comes next" ambiguous
            continue
        used.add((verb, k))
        ops.append((kind, verb, k))
        value = _apply(kind, value, k)
    sentences = [f"{name} has {start} {items}."]
    for kind, verb, k in ops:
        sentences.append(f"{pron} doubles them." if kind == "double" else f"{pron} {verb} {k}.")
    sentences.append(f"How many {items} does {name} have now?")
    return {"question": " ".join(sentences), "answer": str(value), "family": "arithmetic",
            "meta": {"start": start, "ops": [list(op) for op in ops]}}


def _compare(rng: random.Random) -> dict[str, Any]:
    options: list[tuple[str, int]] = []  # (expression, value)
    values: set[int] = set()
    while len(options) < 4:
        form = rng.random()
        if form < 0.35:
            a, b = rng.randint(2, 5), rng.randint(2, 9)
            expr, v = f"{a} * {b}", a * b
        elif form < 0.7:
            a, b = rng.randint(10, 39), rng.randint(1, 9)
            expr, v = f"{a} + {b}", a + b
        else:
            v = rng.randint(4, 60)
            expr = str(v)
        if v in values or v > 98:
            continue
        values.add(v)
        options.append((expr, v))
    best = max(range(4), key=lambda i: options[i][1])
    question = "Which option has the largest value? " + " ".join(
        f"({_LETTERS[i]}) {expr}" for i, (expr, _) in enumerate(options))
    return {"question": question, "answer": _LETTERS[best], "family": "compare",
            "meta": {"options": [list(o) for o in options]}}


def _apply(kind: str, value: int, k: int) -> int:
    return value + k if kind == "add" else value - k if kind == "sub" else value * k


# --------------------------------------------------------------------------------------------- traces
class _Trace:
    """Collects reasoning lines and where each cue starts (character offset, role, whether an exit is safe)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []

    def line(self, text: str) -> None:
        self.lines.append(text + "\n")

    def cue_line(self, phrases: tuple[str, ...], alt_phrases: tuple[str, ...] | None, role: str, safe: bool,
                 rest: str | None = None) -> None:
        weights = dict(_CUE_WEIGHTS)
        if alt_phrases is None:
            weights.pop("Alternatively")
        cue = self.rng.choices(list(weights), list(weights.values()))[0]
        punct = self.rng.choices(list(_PUNCT_WEIGHTS), list(_PUNCT_WEIGHTS.values()))[0]
        body = rest if rest is not None else self.rng.choice(alt_phrases if cue == "Alternatively" else phrases)
        if punct == ".":
            body = body[0].upper() + body[1:]
        self.events.append({"offset": len("<think>\n") + sum(map(len, self.lines)), "cue": cue,
                            "role": role, "safe": safe})
        self.line(f"{cue}{punct}{'' if punct == ' ' else ' '}{body}")

    def text(self, answer: str) -> str:
        return "<think>\n" + "".join(self.lines) + EXIT_TEXT + answer + "}"


def render_trace(problem: dict[str, Any], rng: random.Random, annotate: bool = False):
    """An R1-style trace for ``problem``: ``"<think>\\n" ... EXIT_TEXT + answer + "}"`` (append EOS yourself).

    With ``annotate=True`` also returns the cue events: a list of dicts with ``offset`` (character index of the
    cue word in the trace), ``cue``, ``role`` ("mid", "slip", "verify", "misstated", "recheck", "harmful"; see the
    module docstring) and ``safe`` (whether the right answer is already computed and not contradicted by a wrong
    statement at that point, i.e. whether exiting just before this cue should give the right answer).
    """
    t = _Trace(rng)
    if problem["family"] == "arithmetic":
        final = _arithmetic_trace(problem, t)
    elif problem["family"] == "compare":
        final = _compare_trace(problem, t)
    else:
        raise ValueError(f"unknown family {problem['family']!r}")
    text = t.text(final)
    return (text, t.events) if annotate else text


def _wrong(value: int, rng: random.Random, lo: int = 0, hi: int = 99) -> int:
    """A plausible wrong result near ``value`` (off by one or two, or by ten)."""
    while True:
        w = value + rng.choice((-10, -2, -1, 1, 2, 10))
        if lo <= w <= hi:
            return w


def _count(rng: random.Random, probs: tuple[float, ...]) -> int:
    """How many of a run of optional blocks happen: block ``j`` happens with ``probs[j]`` if block ``j-1`` did."""
    n = 0
    while n < len(probs) and rng.random() < probs[n]:
        n += 1
    return n


def _arithmetic_trace(problem: dict[str, Any], t: _Trace) -> str:
    rng = t.rng
    start, ops = problem["meta"]["start"], problem["meta"]["ops"]

    def step_line(kind: str, verb: str, k: int, a: int, b: int) -> str:
        return f"doubles: {a} * 2 = {b}" if kind == "double" else \
            f"{verb} {k}: {a} {'+' if kind == 'add' else '-'} {k} = {b}"

    def last_step(result: int) -> str:
        kind, verb, k = ops[-1]
        return step_line(kind, verb, k, _apply_all(start, ops[:-1]), result)

    def rerun(full: bool) -> None:
        if full:
            v = start
            for kind, verb, k in ops:
                t.line(step_line(kind, verb, k, v, _apply(kind, v, k)))
                v = _apply(kind, v, k)
        else:
            t.line(last_step(value))

    # 1. the computation, with pauses (mid) and slips corrected at once (slip)
    t.line(f"Start with {start}.")
    value = start
    for kind, verb, k in ops:
        if rng.random() < P_MID_CUE:
            t.cue_line(_MID_PHRASES, _MID_PHRASES_ALT, "mid", safe=False)
        new = _apply(kind, value, k)
        if rng.random() < P_SLIP:
            wrong = _wrong(new, rng)
            t.line(step_line(kind, verb, k, value, wrong))
            fix = step_line(kind, verb, k, value, new).split(": ", 1)[1]
            t.cue_line((), None, "slip", safe=False, rest=f"{fix}, not {wrong}.")
        else:
            t.line(step_line(kind, verb, k, value, new))
        value = new

    # 2. done but not said: verification before the answer is stated
    for _ in range(_count(rng, P_VERIFY)):
        full = rng.random() < 0.6
        t.cue_line(_VERIFY_PHRASES if full else _VERIFY_LAST_PHRASES, _VERIFY_PHRASES_ALT if full else None,
                   "verify", safe=True)
        rerun(full)

    # 3. the statement, now and then a slip of the pen that the next cue corrects (misstated)
    if rng.random() < P_MISSTATE:
        wrong = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
        t.line(f"So the answer is {wrong}.")
        t.cue_line(_MISSTATED_PHRASES, None, "misstated", safe=False)
        t.line(last_step(value))
        t.line(f"So the answer is {value}, not {wrong}.")
    else:
        t.line(f"So the answer is {value}.")

    # 4. re-checks of a stated right answer (overthinking); now and then the last one talks itself out of it
    n_checks = _count(rng, P_RECHECK)
    harmful = n_checks > 0 and rng.random() < P_HARMFUL
    for j in range(n_checks):
        if harmful and j == n_checks - 1:
            wrong = _wrong(value, rng)
            t.cue_line(_HARMFUL_PHRASES, None, "harmful", safe=True)
            t.line(last_step(wrong))
            t.line(f"So the answer is {wrong}.")
            return str(wrong)
        full = rng.random() < 0.6
        if full:
            t.cue_line(_FULL_PHRASES, _FULL_PHRASES_ALT, "recheck", safe=True)
        else:
            t.cue_line(_LAST_PHRASES, _LAST_PHRASES_ALT, "recheck", safe=True)
        rerun(full)
        t.line(f"Yes, the answer is {value}.")
    return str(value)


def _apply_all(value: int, ops: list) -> int:
    for kind, _, k in ops:
        value = _apply(kind, value, k)
    return value


def _compare_trace(problem: dict[str, Any], t: _Trace) -> str:
    rng = t.rng
    options = problem["meta"]["options"]

    def option_line(i: int, v: int, best: int, best_v: int) -> str:
        expr = options[i][0]
        shown = f"({_LETTERS[i]}) is {expr} = {v}." if not expr.isdigit() else f"({_LETTERS[i]}) is {v}."
        if i == 0:
            return f"{shown} Best: (A) {v}."
        rel = ">" if v > best_v else "<"
        return f"{shown} {v} {rel} {best_v}, best: ({_LETTERS[best]}) {max(v, best_v)}."

    def last_line() -> str:
        i = len(options) - 1
        prev_b = max(range(i), key=lambda x: options[x][1])
        v, pv = options[i][1], options[prev_b][1]
        return option_line(i, v, prev_b if v < pv else i, pv)

    def rerun(full: bool) -> None:
        if full:
            b, bv = 0, options[0][1]
            for i, (_, v) in enumerate(options):
                t.line(option_line(i, v, b if i and v < bv else i, bv))
                if i == 0 or v > bv:
                    b, bv = i, v
        else:
            t.line(last_line())

    # 1. the scan over the options, with pauses (mid) and slips corrected at once (slip)
    best, best_v = 0, options[0][1]
    for i, (expr, v) in enumerate(options):
        if i > 0 and rng.random() < P_MID_CUE:
            t.cue_line(_MID_PHRASES, _MID_PHRASES_ALT, "mid", safe=False)
        if not expr.isdigit() and rng.random() < P_SLIP:
            wrong = _wrong(v, rng, 1, 98)
            t.line(option_line(i, wrong, best if i and wrong < best_v else i, best_v))
            t.cue_line((), None, "slip", safe=False, rest=f"{expr} = {v}, not {wrong}.")
            # the corrected option is restated so the running best is right again
            t.line(option_line(i, v, best if i and v < best_v else i, best_v))
        else:
            t.line(option_line(i, v, best if i and v < best_v else i, best_v))
        if i == 0 or v > best_v:
            best, best_v = i, v
    answer = _LETTERS[best]

    # 2. done but not said
    for _ in range(_count(rng, P_VERIFY)):
        full = rng.random() < _P_FULL_COMPARE
        t.cue_line(_VERIFY_PHRASES if full else _VERIFY_LAST_PHRASES, _VERIFY_PHRASES_ALT if full else None,
                   "verify", safe=True)
        rerun(full)

    # 3. the statement; a slip names the runner-up, and the next cue corrects it
    if rng.random() < P_MISSTATE:
        runner_up = max((x for x in range(4) if x != best), key=lambda x: options[x][1])
        wrong = _LETTERS[runner_up]
        t.line(f"So the answer is {wrong}.")
        t.cue_line(_MISSTATED_PHRASES, None, "misstated", safe=False)
        t.line(f"({answer}) {best_v} > ({wrong}) {options[runner_up][1]}.")
        t.line(f"So the answer is {answer}, not {wrong}.")
    else:
        t.line(f"So the answer is {answer}.")

    # 4. re-checks, the last one now and then harmful
    n_checks = _count(rng, P_RECHECK)
    harmful = n_checks > 0 and rng.random() < P_HARMFUL
    for j in range(n_checks):
        if harmful and j == n_checks - 1:
            # "finds" that another option is larger than the best
            i = rng.choice([x for x in range(4) if x != best])
            expr = options[i][0]
            fake = best_v + rng.choice((1, 2, 10)) if best_v <= 88 else best_v + 1
            t.cue_line(_HARMFUL_PHRASES, None, "harmful", safe=True)
            shown = f"({_LETTERS[i]}) is {expr} = {fake}." if not expr.isdigit() else f"({_LETTERS[i]}) is {fake}."
            t.line(f"{shown} {fake} > {best_v}, best: ({_LETTERS[i]}) {fake}.")
            t.line(f"So the answer is {_LETTERS[i]}.")
            return _LETTERS[i]
        full = rng.random() < _P_FULL_COMPARE
        if full:
            t.cue_line(_FULL_PHRASES, _FULL_PHRASES_ALT, "recheck", safe=True)
        else:
            t.cue_line(_LAST_PHRASES, _LAST_PHRASES_ALT, "recheck", safe=True)
        rerun(full)
        t.line(f"Yes, the answer is {answer}.")
    return answer
