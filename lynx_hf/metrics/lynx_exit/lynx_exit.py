"""`lynx_exit`: the early-exit harness's metrics as an `evaluate` metric.

Accuracy under lynx-hf's strict answer checker (`lynx_hf.runtime.answers.answers_match`: matched `\\boxed{}` content, exact
multiple-choice letters, math-verify otherwise), thinking tokens and the share saved against full reasoning, the exit
rate, and the premature-exit rate per question (questions answered wrongly at an exit: what the per-question
guarantee bounds) and, when the per-event counts are given, per event (unsafe cue events at which the rule exits:
what the per-event guarantee bounds).

    >>> import evaluate, lynx_hf.metrics
    >>> metric = evaluate.load(lynx_hf.metrics.LYNX_EXIT)  # a local path: works offline
    >>> r = metric.compute(predictions=["4", "7"], references=["4", "8"], exited=[True, True],
    ...                    thinking_tokens=[10, 20], full_thinking_tokens=[40, 40])
    >>> r["accuracy"], r["savings"], r["premature_per_question"]
    (0.5, 0.625, 0.5)
"""

from __future__ import annotations

import functools

import datasets
import evaluate

from lynx_hf.runtime.answers import answers_match

_DESCRIPTION = __doc__.split("\n\n")[1]
_CITATION = """@article{lynx2025,
  title={LYNX: Learning Dynamic Exits for Confidence-Controlled Reasoning},
  journal={arXiv preprint arXiv:2512.05325},
  year={2025}
}"""
_KWARGS_DESCRIPTION = """
Args (one entry per question):
    predictions: final answers (strings; None or "" when there is none).
    references: gold answers (strings).
    exited: whether the method ended thinking early at a cue (or a budget).
    thinking_tokens: thinking tokens the method used.
    full_thinking_tokens: thinking tokens of full reasoning on the same question (the savings reference).
    correct (optional, keyword): precomputed correctness per question, e.g. the labels lynx-hf's collector made with
        the same checker; skips re-checking `predictions` against `references`.
    unsafe_events (optional, keyword): per question, its unsafe cue events (a forced exit there answers wrongly).
    unsafe_events_exiting (optional, keyword): per question, how many of them the rule's threshold would exit at.
Returns:
    accuracy, thinking_tokens (mean), full_thinking_tokens (mean), thinking_tokens_saved (mean per question),
    savings (1 - mean thinking / mean full thinking), exit_rate, premature_per_question (share of all questions
    answered wrongly at an exit), premature_per_exit (share of exits answered wrongly), exited_accuracy,
    premature_per_event (unsafe cue events that exit, pooled; None without the per-event counts), n.
"""


@functools.lru_cache(maxsize=65536)
def _correct(prediction: str, reference: str) -> bool:
    return answers_match(prediction or None, reference)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LynxExit(evaluate.Metric):
    """Accuracy (strict checker), thinking tokens saved and premature-exit rates of an early-exit method."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
                "exited": datasets.Value("bool"),
                "thinking_tokens": datasets.Value("int64"),
                "full_thinking_tokens": datasets.Value("int64"),
            }),
            reference_urls=["https://arxiv.org/abs/2512.05325"],
        )

    def _compute(self, predictions, references, exited, thinking_tokens, full_thinking_tokens, correct=None,
                 unsafe_events=None, unsafe_events_exiting=None) -> dict:
        n = len(references)
        if n == 0:
            raise ValueError("lynx_exit needs at least one question.")
        if correct is None:
            correct = [_correct(p or "", r) for p, r in zip(predictions, references)]
        elif len(correct) != n:
            raise ValueError(f"correct has {len(correct)} entries for {n} questions.")
        correct = [bool(c) for c in correct]
        wrong_exits = sum(e and not c for e, c in zip(exited, correct))
        n_exits = sum(bool(e) for e in exited)
        think, full = sum(thinking_tokens) / n, sum(full_thinking_tokens) / n
        per_event = None
        if unsafe_events is not None and unsafe_events_exiting is not None:
            total = sum(unsafe_events)
            per_event = sum(unsafe_events_exiting) / total if total else 0.0
        return {
            "accuracy": sum(correct) / n,
            "thinking_tokens": think,
            "full_thinking_tokens": full,
            "thinking_tokens_saved": full - think,
            "savings": 1.0 - think / full if full > 0 else 0.0,
            "exit_rate": n_exits / n,
            "premature_per_question": wrong_exits / n,
            "premature_per_exit": wrong_exits / n_exits if n_exits else 0.0,
            "exited_accuracy": (n_exits - wrong_exits) / n_exits if n_exits else float("nan"),
            "premature_per_event": per_event,
            "n": n,
        }
