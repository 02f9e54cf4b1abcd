"""Results as text: the markdown tables (`format_table`, every column; `format_compact`, five; the per-guarantee
`format_guarantee_table`), the one-line summaries of the AUROCs, the text-only margin and the live agreement, and the
results files (`write_results`: markdown and JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..runtime.conformal import DEFAULT_GUARANTEE

__all__ = [
    "binomial_tolerance", "format_agreement", "format_aurocs", "format_compact", "format_guarantee_table",
    "format_table", "format_text_margin", "premature_text", "realised_rate", "write_results",
]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if not math.isinf(value) else "inf"
    return str(value)


def realised_rate(row: dict) -> float | None:
    """The premature-exit rate in the unit of the row's guarantee (event: unsafe cues that exit; question: questions
    answered wrongly at an exit), i.e. the number to compare with the target 1 - c; None for other methods.

    Example:
        >>> realised_rate({"guarantee": "question", "premature_per_question": 0.04, "unsafe_event_exit_rate": 0.2})
        0.04
    """
    if row.get("guarantee") == "event":
        return row.get("unsafe_event_exit_rate")
    if row.get("guarantee") == "question":
        return row.get("premature_per_question")
    return None


def format_table(rows: Sequence[dict]) -> str:
    """Results rows as a markdown table (`realised` is the premature-exit rate the row's guarantee bounds).

    Example:
        >>> print(format_table([{"method": "Full", "accuracy": 0.5, "thinking_tokens": 10.0, "total_tokens": 12.0,
        ...     "savings": 0.0, "exit_rate": 0.0, "premature_per_exit": 0.0, "premature_per_question": 0.0,
        ...     "target": None, "unsafe_event_exit_rate": None, "exited_accuracy": float("nan"), "helped": 0,
        ...     "harmed": 0, "wall_time_s": None}]).splitlines()[2])
        | Full | 0.500 | 10.0 | 12.0 | 0.0% | 0.0% | – | – | – | – | – | – | 0 | 0 | – |
    """
    header = ("| method | accuracy | think tok | total tok | savings | exit rate | target 1-c | realised | "
              "unsafe-event exits | premature/question | premature/exit | acc. on exits | helped | harmed | wall s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        exited = bool(r["exit_rate"])
        lines.append("| " + " | ".join([
            r["method"], _fmt(r["accuracy"]), _fmt(r["thinking_tokens"], 1), _fmt(r["total_tokens"], 1),
            f"{100 * r['savings']:.1f}%", f"{100 * r['exit_rate']:.1f}%", _fmt(r.get("target"), 2),
            _fmt(realised_rate(r)), _fmt(r.get("unsafe_event_exit_rate")),
            _fmt(r["premature_per_question"]) if exited else "–", _fmt(r["premature_per_exit"]) if exited else "–",
            _fmt(r["exited_accuracy"]), str(r["helped"]), str(r["harmed"]), _fmt(r.get("wall_time_s"), 1),
        ]) + " |")
    return "\n".join(lines)


def premature_text(row: dict) -> str:
    """The compact table's premature-exit cell: the realised rate in the unit the row's guarantee bounds, with its
    target; for exits without a guarantee, the share of questions answered wrongly at an exit; "–" without exits.

    Example:
        >>> premature_text({"guarantee": "event", "unsafe_event_exit_rate": 0.098, "target": 0.1, "exit_rate": 0.9})
        '0.098 per unsafe cue (target 0.10)'
        >>> premature_text({"guarantee": None, "premature_per_question": 0.5, "exit_rate": 0.9})
        '0.500 per question'
    """
    if row.get("guarantee") == "event":
        return f"{_fmt(row.get('unsafe_event_exit_rate'))} per unsafe cue (target {_fmt(row.get('target'), 2)})"
    if row.get("guarantee") == "question":
        return f"{_fmt(row.get('premature_per_question'))} per question (target {_fmt(row.get('target'), 2)})"
    if not row.get("exit_rate"):
        return "–"
    return f"{_fmt(row.get('premature_per_question'))} per question"


def format_compact(rows: Sequence[dict]) -> str:
    """Results rows as a five-column markdown table that fits a terminal: method, accuracy, thinking tokens,
    savings and the premature-exit rate against its target (`format_table` has every column; results.md holds it).

    Example:
        >>> print(format_compact([{"method": "Full", "accuracy": 0.5, "thinking_tokens": 10.0, "savings": 0.0,
        ...     "exit_rate": 0.0, "guarantee": None}]).splitlines()[2])
        | Full | 0.500 | 10.0 | 0.0% | – |
    """
    lines = ["| method | accuracy | thinking tokens | savings | premature exits (target) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['accuracy'])} | {_fmt(r['thinking_tokens'], 1)} | "
                     f"{100 * r['savings']:.1f}% | {premature_text(r)} |")
    return "\n".join(lines)


def binomial_tolerance(n: int, rate: float, level: float = 0.95) -> float:
    """The rate that `n` test questions exceed with probability at most 1 - `level` when the true rate is `rate`
    (the upper `level` quantile of Binomial(n, rate) / n): a realised rate above it is unlikely under the bound.

    Example:
        >>> binomial_tolerance(200, 0.1)
        0.135
    """
    from ..runtime.bounds import binomial_cdf

    return int((binomial_cdf(n, rate) < level).sum()) / n


def format_guarantee_table(rows: Sequence[dict], guarantee: str = DEFAULT_GUARANTEE) -> str:
    """The LYNX rows of one guarantee, per confidence: the realised share of questions whose exit is premature
    (what the guarantee bounds by δ = 1 - c, with the binomial 95% tolerance for this many test questions), the
    share the exit made wrong (right at the end of the full trace, wrong at the exit), accuracy against full
    reasoning and thinking saved.

    Example:
        >>> rows = [{"method": "Full", "family": "Full", "accuracy": 0.9, "n": 200},
        ...         {"method": "Lynx c=0.9 (question)", "family": "Lynx (question)", "confidence": 0.9, "n": 200,
        ...          "premature_per_question": 0.08, "harmed": 10, "accuracy": 0.86, "savings": 0.4}]
        >>> print(format_guarantee_table(rows).splitlines()[2])
        | 0.9 | 0.10 | 0.080 (≤ 0.135) | 0.050 | 0.860 (full 0.900) | 40.0% |
    """
    full = next(r for r in rows if r["family"] == "Full")
    lines = ["| c | δ = 1 − c | premature exits per question (binomial tolerance) | made wrong by the exit | "
             "accuracy | thinking saved |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["family"] != f"Lynx ({guarantee})":
            continue
        delta, n = 1 - r["confidence"], r["n"]
        lines.append(f"| {r['confidence']:g} | {delta:.2f} | {_fmt(r['premature_per_question'])} "
                     f"(≤ {binomial_tolerance(n, delta):.3f}) | {r['harmed'] / n:.3f} | {_fmt(r['accuracy'])} "
                     f"(full {_fmt(full['accuracy'])}) | {100 * r['savings']:.1f}% |")
    return "\n".join(lines)


def format_aurocs(report: dict) -> str:
    """One line from `probe_aurocs`.

    Example:
        >>> format_aurocs({"n_events": 10, "n_safe": 4, "lynx_probe": 0.9, "text_probe": 0.85, "text_probe_window": 8})
        'probe AUROC on 10 held-out cue events (4 safe): LYNX probe (hidden states) 0.900, TextProbe (last 8 tokens) 0.850'
    """
    text = (f"probe AUROC on {report['n_events']} held-out cue events ({report['n_safe']} safe): "
            f"LYNX probe (hidden states) {_fmt(report['lynx_probe'])}")
    if "text_probe" in report:
        text += f", TextProbe (last {report['text_probe_window']} tokens) {_fmt(report['text_probe'])}"
    return text


def format_text_margin(margin: dict) -> str:
    """One line from `text_only_margin`, against issue 12's targets (+10 points savings at equal accuracy, or +5
    points accuracy at equal thinking tokens).

    Example:
        >>> line = format_text_margin({"method": "L", "savings_margin": 0.12, "accuracy_margin": 0.01,
        ...     "text_savings_at_equal_accuracy": 0.4, "text_accuracy_at_equal_tokens": 0.8, "text_methods": ["Full"]})
        >>> print(line.replace("; ", ";\\n").replace("), ", "),\\n"))
        L vs the best text-only exit (mixes of 1 rules): +12.0 points savings at equal accuracy (text 40.0%),
        +1.0 points accuracy at equal thinking tokens (text 0.800);
        target +10 or +5: met
    """
    def points(x):
        return "n/a" if x is None else f"{100 * x:+.1f} points"

    savings, accuracy = margin["savings_margin"], margin["accuracy_margin"]
    met = (savings is not None and savings >= 0.10 - 1e-9) or (accuracy is not None and accuracy >= 0.05 - 1e-9)
    text_savings = margin["text_savings_at_equal_accuracy"]
    reach = "no text rule reaches its accuracy" if text_savings is None else f"text {100 * text_savings:.1f}%"
    return (f"{margin['method']} vs the best text-only exit (mixes of {len(margin['text_methods'])} rules): "
            f"{points(savings)} savings at equal accuracy ({reach}), {points(accuracy)} accuracy at equal thinking "
            f"tokens (text {_fmt(margin['text_accuracy_at_equal_tokens'])}); target +10 or +5: "
            f"{'met' if met else 'missed'}")


def format_agreement(report: dict) -> str:
    """A short text summary of `live_agreement`'s report.

    Example:
        >>> format_agreement({"sampling": "greedy", "confidence": 0.9, "guarantee": "event", "threshold": 0.5,
        ...     "stop": {"n": 4, "exit_agreement": 1.0, "exited_agreement": 1.0, "token_agreement": 1.0,
        ...     "answer_agreement": 0.75, "disagreements": []}}).splitlines()[1]
        '  stop: 4 traces, same exit decision and position 100.0%, same exited? 100.0%, same answer 75.0%, tokens identical up to the exit 100.0%'
    """
    lines = [f"live vs replay ({report['sampling']}, c={report['confidence']}, {report['guarantee']} guarantee, "
             f"tau={_fmt(report['threshold'], 4)}):"]
    for mode in ("stop", "shadow"):
        if mode not in report:
            continue
        s = report[mode]
        text = (f"  {mode}: {s['n']} traces, same exit decision and position {100 * s['exit_agreement']:.1f}%, "
                f"same exited? {100 * s['exited_agreement']:.1f}%")
        if "answer_agreement" in s:
            text += f", same answer {100 * s['answer_agreement']:.1f}%"
        text += f", tokens identical {'up to the exit' if mode == 'stop' else 'throughout'} {100 * s['token_agreement']:.1f}%"
        lines.append(text)
        for d in s["disagreements"][:5]:
            reason = d["reason"] or (f"same exit, different answer: live {d.get('live_answer')!r} vs replay "
                                     f"{d.get('replay_answer')!r} (greedy answer decode on padded cached vs "
                                     "unpadded hidden states)")
            lines.append(f"    {d['id']}: replay pos {d['replay_position']}, live pos {d['live_position']}: {reason}")
    return "\n".join(lines)


def write_results(rows: Sequence[dict], out: str | Path, name: str = "results", title: str = "",
                  extra: dict | None = None, notes: Sequence[str] = ()) -> Path:
    """Write `name.md` (the full markdown table, then `notes` as lines) and `name.json` (rows + `extra`) into
    `out`; returns the markdown path.

    Example:
        >>> write_results(rows, "outputs/eval")  # doctest: +SKIP
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    md.write_text((f"## {title}\n\n" if title else "") + format_table(rows) + "\n"
                  + "".join(f"\n{note}\n" for note in notes), encoding="utf-8")
    payload = {"rows": list(rows), **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n", encoding="utf-8")
    return md


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
