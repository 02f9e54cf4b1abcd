"""PNG plots of an evaluation (matplotlib, Agg backend): accuracy vs tokens (Pareto) and calibration.

The Pareto plot draws one curve per method family over its knob (LYNX and its text-only control TextProbe over the
confidence c per guarantee, DEER over lambda, budget forcing over B) and single points for Full, FirstCue, Oracle,
NoWait and each AnswerStated text rule. The calibration plot
draws the realised premature-exit rate against the target delta = 1 - c, per guarantee, with the diagonal: over
random calibration/test splits (mean and 5-95% band, marginal and PAC) or for one draw.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .._extras import require

matplotlib = require("matplotlib", extra="eval", purpose="the evaluation plots")
matplotlib.use("Agg")
plt = require("matplotlib.pyplot", extra="eval", purpose="the evaluation plots")

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

    `points` are either `splits.split_rates` rows (the distribution over random calibration/test splits: one panel
    per guarantee, the mean and a 5-95% band per strength, marginal and PAC) or single-draw
    `evaluate.calibration_curve` rows (`guarantee`, `target`, `realised`). Per event the rate is the share of unsafe
    cues that exit; per question, the share of questions whose first exit is premature.

    Example:
        >>> calibration_plot([{"guarantee": "event", "target": 0.1, "realised": 0.05}], "/tmp/cal.png").name
        'cal.png'
        >>> calibration_plot([{"guarantee": "event", "risk_level": None, "rule": "envelope", "delta": 0.1,
        ...     "mean": 0.08, "p05": 0.05, "p95": 0.11, "n_splits": 100}], "/tmp/cal_splits.png").name
        'cal_splits.png'
    """
    if points and "p05" in points[0]:
        return _split_calibration_plot(points, path, title)
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


def _variant_style(risk_level, rule) -> tuple[str, str, str]:
    """(label, colour, line style) of one strength/rule in the split calibration plot."""
    if risk_level is not None:
        return f"PAC, α = {risk_level:g}", "tab:red", "-"
    if rule == "paper":
        return "marginal, paper's rule", "tab:gray", ":"
    return "marginal", "tab:blue", "-"


def _split_calibration_plot(rows: Sequence[dict], path: str | Path, title: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    guarantees = [g for g in ("event", "question") if any(r["guarantee"] == g for r in rows)]
    fig, axes = plt.subplots(1, len(guarantees), figsize=(5.2 * len(guarantees), 4.8), squeeze=False)
    names = {"event": "per event: unsafe cues that exit", "question": "per question: premature first exits"}
    n_splits = max(r.get("n_splits", 0) for r in rows)
    for ax, guarantee in zip(axes[0], guarantees):
        members = [r for r in rows if r["guarantee"] == guarantee]
        variants = sorted({(r.get("risk_level"), r.get("rule", "envelope")) for r in members},
                          key=lambda v: (v[0] is not None, v[1] == "paper"))
        top = max(max(r["delta"], r["p95"]) for r in members) * 1.05
        for risk_level, rule in variants:
            curve = sorted((r for r in members if (r.get("risk_level"), r.get("rule", "envelope")) == (risk_level, rule)),
                           key=lambda r: r["delta"])
            label, color, style = _variant_style(risk_level, rule)
            xs = [r["delta"] for r in curve]
            ax.plot(xs, [r["mean"] for r in curve], linestyle=style, marker="o", markersize=3, color=color,
                    label=f"{label}: mean")
            if rule != "paper":
                ax.fill_between(xs, [r["p05"] for r in curve], [r["p95"] for r in curve], color=color, alpha=0.18,
                                label=f"{label}: 5-95% of splits")
        ax.plot([0, top], [0, top], linestyle="--", color="black", linewidth=1, label="target (y = x)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("target premature-exit rate δ = 1 - c")
        ax.set_ylabel("realised rate on the test part")
        ax.set_title(names[guarantee], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title} ({n_splits} random calibration/test splits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(fig, ax, path: Path, title: str, legend_loc: str) -> Path:
    """Title, grid and legend, then write the PNG and free the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
