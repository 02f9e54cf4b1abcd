"""PNG plots of an evaluation (matplotlib, Agg backend): accuracy vs tokens (Pareto) and calibration.

The Pareto plot draws one curve per method family over its knob (LYNX and its text-only control TextProbe over the
confidence c per guarantee, DEER over lambda, budget forcing over B) and single points for Full, FirstCue, Oracle,
NoWait and each AnswerStated text rule. The calibration plot
draws the realised premature-exit rate against the target delta = 1 - c, per guarantee, with the diagonal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_CURVES = {"Lynx (event)": ("tab:blue", "o"), "Lynx (question)": ("tab:cyan", "s"), "DEER": ("tab:orange", "^"),
           "Budget forcing": ("tab:green", "v"), "TextProbe (event)": ("tab:olive", "o"),
           "TextProbe (question)": ("tab:gray", "s")}
_POINTS = {"Full": ("black", "*"), "FirstCue": ("tab:red", "X"), "Oracle": ("tab:purple", "P"),
           "NoWait": ("tab:brown", "D")}
_TEXT_RULE_MARKERS = ("h", "p", "d", "8", "H")  # one per AnswerStated rule (all share the family's colour)


def _knob_label(family: str, knob) -> str:
    if family.startswith(("Lynx", "TextProbe")):
        return f"c={knob:g}"
    if family == "DEER":
        return f"λ={knob:g}"
    return f"B={knob}"


def pareto_plot(rows: Sequence[dict], path: str | Path, title: str = "Accuracy vs tokens") -> Path:
    """Accuracy against mean total tokens per question, one curve per method family over its knob.

    Example:
        >>> pareto_plot([{"family": "Full", "knob": None, "accuracy": 0.9, "total_tokens": 200.0}],
        ...             "/tmp/pareto.png").name
        'pareto.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    curves = defaultdict(list)
    for row in rows:
        if row["family"] in _CURVES:
            curves[row["family"]].append(row)
    for family, members in curves.items():
        members.sort(key=lambda r: r["total_tokens"])
        color, marker = _CURVES[family]
        ax.plot([r["total_tokens"] for r in members], [r["accuracy"] for r in members], marker=marker, color=color,
                label=family, linewidth=1.5, markersize=6)
        labels = defaultdict(list)  # knobs that land on the same point share one label
        for r in members:
            labels[(round(r["total_tokens"], 3), round(r["accuracy"], 4))].append(_knob_label(family, r["knob"]))
        for (x, y), names in labels.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    text_rules = 0
    for row in rows:
        if row["family"] in _POINTS:
            color, marker = _POINTS[row["family"]]
            ax.scatter([row["total_tokens"]], [row["accuracy"]], color=color, marker=marker, s=90, zorder=5,
                       label=row["family"])
        elif row["family"] == "AnswerStated":  # text rules: one point each, labelled with its patterns
            marker = _TEXT_RULE_MARKERS[text_rules % len(_TEXT_RULE_MARKERS)]
            text_rules += 1
            ax.scatter([row["total_tokens"]], [row["accuracy"]], color="tab:pink", marker=marker, s=80, zorder=5,
                       edgecolors="black", linewidths=0.5, label=row["method"])
    ax.set_xlabel("mean total tokens per question (thinking + answer + trial decodes)")
    ax.set_ylabel("accuracy")
    return _finish(fig, ax, path, title, legend_loc="lower right")


def calibration_plot(points: Sequence[dict], path: str | Path, title: str = "Calibration") -> Path:
    """Realised premature-exit rate vs target delta = 1 - c, per guarantee, with the diagonal y = x.

    `points` are `evaluate.calibration_curve` rows (`guarantee`, `target`, `realised`). Points below the diagonal
    keep the promise: per event, the share of unsafe cues that exit; per question, the share of questions whose
    first exit is premature.

    Example:
        >>> calibration_plot([{"guarantee": "event", "target": 0.1, "realised": 0.05}], "/tmp/cal.png").name
        'cal.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    labels = {"event": "per event: unsafe cues that exit", "question": "per question: premature first exits"}
    styles = {"event": ("tab:blue", "o"), "question": ("tab:cyan", "s")}
    top = 0.0
    for guarantee in ("event", "question"):
        members = sorted((p for p in points if p["guarantee"] == guarantee), key=lambda p: p["target"])
        if not members:
            continue
        color, marker = styles[guarantee]
        xs, ys = [p["target"] for p in members], [p["realised"] for p in members]
        ax.plot(xs, ys, marker=marker, color=color, label=labels[guarantee])
        top = max(top, *xs, *ys)
    top = top * 1.05 or 1.0
    ax.plot([0, top], [0, top], linestyle="--", color="gray", label="target (y = x)")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("target premature-exit rate δ = 1 - c")
    ax.set_ylabel("realised premature-exit rate (held-out)")
    return _finish(fig, ax, path, title, legend_loc="upper left")


def _finish(fig, ax, path: Path, title: str, legend_loc: str) -> Path:
    """Title, grid and legend, then write the PNG and free the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
