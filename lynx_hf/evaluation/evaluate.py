"""Evaluation: replay every exit method over an event table, compare with full reasoning (`lynx-hf eval`).

Replay (`evaluate`) reads one event table and the bundle's probe scores, so any confidence, the oracle and the
cue baselines cost nothing to evaluate; the live baselines (budget forcing, NoWait) run the model. The live
agreement check is in `agreement.py`, the tables and results files in `tables.py`.

Accuracy, thinking tokens saved and premature-exit rates come from the `lynx_exit` metric shipped inside the package
(`evaluate.load(lynx_hf.metrics.LYNX_EXIT)`, a local path, so it works offline); the rest of a row (total tokens,
helped / harmed) is counted here.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..runtime.answers import answers_match
from .cue_rules import DeerStyle, FirstCue, Full, LynxExit, Oracle
from .live_rules import BudgetForcing, LynxBudget, NoWait, matched_budget
from .replay import Method, Outcome, Replay
from .text_rules import TextProbe, TextProbeExit, answer_stated_rules
from ..runtime.conformal import DEFAULT_GUARANTEE, GUARANTEE_ORDER, LynxCalibrationWarning
from ..pipeline.events import EventTable
from ..runtime.probe import auroc
from .agreement import live_agreement
from .tables import _fmt, format_agreement, format_aurocs, format_compact, write_results

logger = logging.getLogger(__name__)

DEFAULT_CONFIDENCES = (0.8, 0.9, 0.95)
DEFAULT_METHOD = f"Lynx c=0.9 ({DEFAULT_GUARANTEE})"
DEFAULT_LAMBDAS = (0.8, 0.9, 0.95, 0.99)
CALIBRATION_GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


_checked = functools.lru_cache(maxsize=65536)(answers_match)


@functools.cache
def exit_metric():
    """The `lynx_exit` `evaluate` metric shipped in the package, loaded once (offline: it is a local path)."""
    from .._extras import require
    from ..metrics import LYNX_EXIT

    hf_evaluate = require("evaluate", extra="eval", purpose="the lynx_exit metric")

    return hf_evaluate.load(LYNX_EXIT)


def metrics(outcome: Outcome, full: Outcome, references: Sequence[str] | None = None) -> dict:
    """One results row: accuracy, tokens, savings vs `full`, exit and premature-exit rates, helped / harmed.

    Accuracy, savings and premature-exit rates come from the `lynx_exit` metric: with `references` (gold answers)
    it checks `outcome.answers` with the strict checker; without, it uses `outcome.correct` (the labels the collector
    made with the same checker). `premature_per_exit` is the share of exits whose answer is wrong;
    `premature_per_question` the share of all questions answered wrongly at an exit (what the per-question
    guarantee bounds); `unsafe_event_exit_rate` the share of unsafe cue events the rule would exit at (what the
    per-event guarantee bounds; threshold rules only).

    Example:
        >>> from lynx_hf.evaluation.replay import Outcome
        >>> t = torch.tensor
        >>> full = Outcome("Full", t([False, False]), t([-1, -1]), t([True, False]), t([10, 10]), t([12, 12]), t([0, 0]),
        ...                answers=["1", "3"])
        >>> fast = Outcome("X", t([True, True]), t([0, 1]), t([True, True]), t([5, 5]), t([9, 9]), t([0, 0]),
        ...                answers=["1", "2"])
        >>> row = metrics(fast, full, references=["1", "2"])
        >>> row["accuracy"], row["savings"], row["helped"], row["harmed"], row["premature_per_exit"]
        (1.0, 0.5, 1, 0, 0.0)
    """
    exited = outcome.exited
    info = outcome.info
    n = outcome.n
    answers = outcome.answers if outcome.answers is not None else [None] * n
    extra = {} if references is not None else {"correct": outcome.correct.tolist()}
    scores = exit_metric().compute(
        predictions=[a or "" for a in answers], references=list(references) if references is not None else [""] * n,
        exited=exited.tolist(), thinking_tokens=outcome.thinking_tokens.tolist(),
        full_thinking_tokens=full.thinking_tokens.tolist(), **extra,
    )
    if references is not None:
        correct = torch.tensor([_checked(a, r) for a, r in zip(answers, references)], dtype=torch.bool)
        full_correct = torch.tensor([_checked(a, r) for a, r in zip(full.answers or [None] * n, references)],
                                    dtype=torch.bool)
    else:
        correct, full_correct = outcome.correct, full.correct
    return {
        "method": outcome.method,
        "family": info.get("family", outcome.method),
        "knob": info.get("knob"),
        "confidence": info.get("confidence"),
        "guarantee": info.get("guarantee"),
        "target": info.get("target"),
        "tau": info.get("tau"),
        "n": outcome.n,
        "accuracy": scores["accuracy"],
        "thinking_tokens": scores["thinking_tokens"],
        "total_tokens": _mean(outcome.total_tokens),
        "extra_tokens": _mean(outcome.extra_tokens),
        "savings": scores["savings"],
        "exit_rate": scores["exit_rate"],
        "premature_per_exit": scores["premature_per_exit"],
        "premature_per_question": scores["premature_per_question"],
        "unsafe_event_exit_rate": info.get("unsafe_event_exit_rate"),
        "budget_exit_rate": info.get("budget_exits"),
        "exited_accuracy": scores["exited_accuracy"],
        "helped": int((~full_correct & correct).sum()),
        "harmed": int((full_correct & ~correct).sum()),
        "wall_time_s": outcome.wall_time,
    }


def lynx_methods(confidences: Sequence[float] = DEFAULT_CONFIDENCES,
                 guarantees: Sequence[str] = GUARANTEE_ORDER) -> list[Method]:
    """`LynxExit` at every (confidence, guarantee), the default guarantee first.

    Example:
        >>> [m.name for m in lynx_methods([0.9])]
        ['Lynx c=0.9 (question)', 'Lynx c=0.9 (event)']
    """
    return [LynxExit(c, g) for g in guarantees for c in confidences]


def text_probe_methods(text_probe: TextProbe, confidences: Sequence[float] = DEFAULT_CONFIDENCES,
                       guarantees: Sequence[str] = GUARANTEE_ORDER) -> list[Method]:
    """`TextProbeExit` at every (confidence, guarantee): the text-only control at LYNX's own operating points.

    Example:
        >>> [m.name for m in text_probe_methods(text_probe, [0.9], ["event"])]  # doctest: +SKIP
        ['TextProbe c=0.9 (event)']
    """
    return [TextProbeExit(text_probe, c, g) for g in guarantees for c in confidences]


def replay_methods(confidences: Sequence[float] = DEFAULT_CONFIDENCES,
                   lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, tokenizer=None,
                   text_probe: TextProbe | None = None) -> list[Method]:
    """Full, LYNX at each confidence and guarantee, the text-only baselines, FirstCue, Oracle and DEER at each lambda.

    The text-only baselines need what they read: `AnswerStated` (see `answer_stated_rules`) needs the `tokenizer`
    to decode the trace text, `TextProbeExit` a fitted `text_probe`; each is left out without it.

    Example:
        >>> [m.name for m in replay_methods([0.9], [0.95])][:2]
        ['Full', 'Lynx c=0.9 (question)']
    """
    text: list[Method] = []
    if text_probe is not None:
        text += text_probe_methods(text_probe, confidences)
    if tokenizer is not None:
        text += answer_stated_rules(tokenizer)
    return [Full(), *lynx_methods(confidences), *text, FirstCue(), Oracle(), *[DeerStyle(lam) for lam in lambdas]]


def probe_aurocs(replay: Replay, text_probe: TextProbe | None = None) -> dict:
    """AUROC of the LYNX probe and (if given) the `TextProbe` on the replay's events, with the event counts.

    Example:
        >>> probe_aurocs(replay, text_probe)["text_probe"]  # doctest: +SKIP
        0.91
    """
    table = replay.table
    safe = table.safe
    defined = len(table) > 0 and 0 < int(safe.sum()) < len(table)
    report = {"n_events": len(table), "n_safe": int(safe.sum()),
              "lynx_probe": auroc(replay.scores, safe) if defined else None}
    if text_probe is not None:
        report["text_probe"] = auroc(text_probe.scores(table), safe) if defined else None
        report["text_probe_window"] = text_probe.window
    return report


TEXT_ONLY_FAMILIES = ("Full", "FirstCue", "AnswerStated", "TextProbe (event)", "TextProbe (question)",
                      "Budget forcing")
"""Exit rules whose decision reads only the text (or nothing): the frontier LYNX is compared against."""


def _text_frontier_accuracy(points: list[tuple[float, float]], tokens: float) -> float:
    """Best accuracy a random per-question mix of the `(thinking tokens, accuracy)` points reaches on average
    with at most `tokens` thinking tokens (the upper hull); -inf if none is that cheap."""
    best = max((a for t, a in points if t <= tokens), default=-math.inf)
    for ti, ai in points:
        for tj, aj in points:
            if ti <= tokens < tj:
                best = max(best, ai + (aj - ai) * (tokens - ti) / (tj - ti))
    return best


def _text_frontier_tokens(points: list[tuple[float, float]], accuracy: float) -> float:
    """Fewest mean thinking tokens with which a mix of the points reaches `accuracy` on average (inf: never)."""
    best = min((t for t, a in points if a >= accuracy), default=math.inf)
    for ti, ai in points:
        for tj, aj in points:
            if ai < accuracy <= aj:
                best = min(best, ti + (tj - ti) * (accuracy - ai) / (aj - ai))
    return best


def text_only_margin(rows: Sequence[dict], method: str = DEFAULT_METHOD) -> dict:
    """How far `method` is ahead of the best text-only exit rule (issue 12's targets), on one results table.

    The text-only frontier holds every row whose exit decision reads only the text (`TEXT_ONLY_FAMILIES`: full
    reasoning, first cue, the AnswerStated rules, TextProbe at every confidence and guarantee, budget forcing) and
    every random per-question mix of two of them, which makes the baseline as strong as those rules allow. Returns
    `savings_margin` (method's savings minus the frontier's at the method's accuracy; None when no text-only mix
    reaches that accuracy) and `accuracy_margin` (method's accuracy minus the frontier's at the method's mean
    thinking tokens), both in absolute points (0.10 = 10 points).

    Example:
        >>> rows = [{"method": "Full", "family": "Full", "accuracy": 0.8, "thinking_tokens": 100.0},
        ...         {"method": "R", "family": "AnswerStated", "accuracy": 0.6, "thinking_tokens": 40.0},
        ...         {"method": "L", "family": "Lynx (event)", "accuracy": 0.8, "thinking_tokens": 40.0}]
        >>> m = text_only_margin(rows, "L")
        >>> round(m["savings_margin"], 3), round(m["accuracy_margin"], 3)  # the text mix needs 100 tokens at 0.8
        (0.6, 0.2)
    """
    by = {r["method"]: r for r in rows}
    if method not in by:
        raise ValueError(f"{method!r} is not in the results table: pick one of {sorted(by)}.")
    full = next((r for r in rows if r["family"] == "Full"), None)
    if full is None:
        raise ValueError("The results table has no Full row: savings are measured against it.")
    text = [r for r in rows if r["family"] in TEXT_ONLY_FAMILIES]
    points = [(float(r["thinking_tokens"]), float(r["accuracy"])) for r in text]
    row, full_tokens = by[method], float(full["thinking_tokens"])
    tokens = _text_frontier_tokens(points, float(row["accuracy"]))
    accuracy = _text_frontier_accuracy(points, float(row["thinking_tokens"]))
    savings = 1.0 - float(row["thinking_tokens"]) / full_tokens
    return {
        "method": method, "accuracy": float(row["accuracy"]), "savings": savings,
        "text_savings_at_equal_accuracy": None if math.isinf(tokens) else 1.0 - tokens / full_tokens,
        "text_accuracy_at_equal_tokens": None if math.isinf(accuracy) else accuracy,
        "savings_margin": None if math.isinf(tokens) else savings - (1.0 - tokens / full_tokens),
        "accuracy_margin": None if math.isinf(accuracy) else float(row["accuracy"]) - accuracy,
        "text_methods": [r["method"] for r in text],
    }


def evaluate(replay: Replay, methods: Sequence[Method], progress: bool = False) -> tuple[list[dict], list[Outcome]]:
    """Run each method on the replay; returns (results rows, outcomes). `Full` is added if missing (the reference).

    Example:
        >>> rows, _ = evaluate(replay, [Full(), Oracle()])  # doctest: +SKIP
        >>> rows[1]["savings"] >= 0  # doctest: +SKIP
        True
    """
    methods = list(methods)
    if not any(isinstance(m, Full) for m in methods):
        methods.insert(0, Full())
    outcomes = []
    for method in methods:
        started = time.perf_counter()
        outcome = method.run(replay)
        if outcome.wall_time is None and progress:
            logger.info("%s: %.2f s", method.name, time.perf_counter() - started)
        outcomes.append(outcome)
    full = next(o for o, m in zip(outcomes, methods) if isinstance(m, Full))
    return [metrics(o, full, replay.gold) for o in outcomes], outcomes


def live_methods(replay: Replay, rows: Sequence[dict], model, tokenizer, exit_ids: Sequence[int],
                 nowait: bool = True, thinking_budgets: Sequence[int] | None = None,
                 confidences: Sequence[float] = (0.9,)) -> list[Method]:
    """Budget forcing at budgets matched to each LYNX row's mean thinking tokens, LYNX + budget, and NoWait.

    `LynxBudget` runs at each of `confidences` under the default guarantee with each of `thinking_budgets`; by
    default two caps: the budget matched to the default LYNX row's thinking (beside budget forcing at that budget)
    and the 90th percentile of the full traces' thinking (a loose cap that only cuts the longest traces, with budget
    forcing at it too).

    Example:
        >>> methods = live_methods(replay, rows, model, tok, lynx.exit_ids)  # doctest: +SKIP
    """
    targets = sorted({round(r["thinking_tokens"], 6) for r in rows if r["family"].startswith("Lynx")})
    longest = int(replay.think_length.max())
    if thinking_budgets is None:
        default = next((r for r in rows if r["method"] == DEFAULT_METHOD), None)
        matched = [matched_budget(replay.think_length, default["thinking_tokens"])] if default else []
        loose = int(torch.quantile(replay.think_length.double(), 0.9))
        thinking_budgets = sorted({b for b in (*matched, loose) if 0 < b < longest})
    # a budget at or above the longest trace cuts nothing: that is Full again
    budgets = sorted({b for b in (*(matched_budget(replay.think_length, t) for t in targets), *thinking_budgets)
                      if b < longest})
    methods: list[Method] = [BudgetForcing(b, model, tokenizer, exit_ids) for b in budgets]
    methods += [LynxBudget(c, DEFAULT_GUARANTEE, b, model, tokenizer, exit_ids)
                for c in confidences for b in thinking_budgets]
    if nowait:
        methods.append(NoWait(model, tokenizer))
    return methods


def calibration_curve(replay: Replay, confidences: Sequence[float] = CALIBRATION_GRID,
                      guarantees: Sequence[str] = GUARANTEE_ORDER) -> list[dict]:
    """Realised premature-exit rate vs the target 1-c on this table, per guarantee, over a grid of confidences.

    Event guarantee: share of unsafe cue events that exit; question guarantee: share of questions whose first exit
    is premature. Free to compute (replay), so the calibration plot can use a finer grid than the results table.

    Example:
        >>> curve = calibration_curve(replay, [0.9])  # doctest: +SKIP
        >>> curve[0]["target"]  # doctest: +SKIP
        0.1
    """
    full = Full().run(replay)
    points = []
    for method in lynx_methods(confidences, guarantees):
        row = metrics(method.run(replay), full, replay.gold)
        realised = row["unsafe_event_exit_rate"] if method.guarantee == "event" else row["premature_per_question"]
        points.append({"guarantee": method.guarantee, "confidence": method.confidence,
                       "target": 1 - method.confidence, "realised": realised, "exit_rate": row["exit_rate"]})
    return points


def versus_text_rule(rows: Sequence[dict], method: str = DEFAULT_METHOD,
                     rule: str = "AnswerStated (answer phrases)") -> str:
    """One line: `method` against the practitioner's one-line text rule, accuracy and thinking saved side by side,
    and whether `method` is at least as accurate *and* saves more (else: a miss, and which way).

    Example:
        >>> rows = [{"method": "L", "accuracy": 0.9, "savings": 0.3}, {"method": "R", "accuracy": 0.8, "savings": 0.5}]
        >>> versus_text_rule(rows, "L", "R")
        'L: accuracy 0.900, 30.0% thinking saved; R: 0.800, 50.0%: miss (more accurate, saves less)'
    """
    by = {r["method"]: r for r in rows}
    if method not in by or rule not in by:
        return f"{method} vs {rule}: not both in this table"
    a, b = by[method], by[rule]
    saves = a["savings"] > b["savings"]
    if a["accuracy"] >= b["accuracy"] and saves:
        verdict = "at least as accurate and saves more"
    else:
        accuracy = "more accurate" if a["accuracy"] > b["accuracy"] else \
            "as accurate" if a["accuracy"] == b["accuracy"] else "less accurate"
        verdict = f"miss ({accuracy}, {'saves more' if saves else 'saves less'})"
    return (f"{method}: accuracy {_fmt(a['accuracy'])}, {100 * a['savings']:.1f}% thinking saved; {rule}: "
            f"{_fmt(b['accuracy'])}, {100 * b['savings']:.1f}%: {verdict}")


def check_table_matches_bundle(table: EventTable, lynx) -> None:
    """Raise if the table was collected with other layers, cues or exit text than the bundle's probe expects."""
    s, c = table.settings, lynx.config
    diff = []
    for key, expected in (("layers", list(c.layers)), ("cues", list(c.cues)), ("exit_text", c.exit_text),
                          ("exit_construction", c.exit_construction)):
        if key in s and s[key] != expected:
            diff.append(f"{key}: table {s[key]!r} vs bundle {expected!r}")
    if c.model_fingerprint and s.get("model_fingerprint") and s["model_fingerprint"] != c.model_fingerprint:
        diff.append("model fingerprint")
    if diff:
        raise ValueError("The event table does not match the bundle (" + "; ".join(diff) + "): collect it with "
                         "the bundle's settings (`lynx-hf eval --problems ...` does).")


def collector_for(model, tokenizer, lynx, prompt_fn=None, **options):
    """A `Collector` with the bundle's layers, cues, exit text and answer length (what its probe was trained on).

    Example:
        >>> collector = collector_for(model, tok, lynx, prompt_fn=organism.prompt)  # doctest: +SKIP
    """
    from ..pipeline.collect import Collector

    c = lynx.config
    return Collector(model, tokenizer, layers=c.layers, cues=c.cues, think_start=c.think_start, think_end=c.think_end,
                     exit_text=c.exit_text, exit_construction=c.exit_construction,
                     answer_max_new_tokens=c.answer_max_new_tokens, prompt_fn=prompt_fn, **options)


def run_all(lynx, table: EventTable, model=None, tokenizer=None, *, confidences=DEFAULT_CONFIDENCES,
            lambdas=DEFAULT_LAMBDAS, live: bool = True, text_probe: TextProbe | None = None,
            thinking_budgets: Sequence[int] | None = None) -> tuple[list[dict], list[Outcome], Replay]:
    """Replay methods (with the text-only baselines), then (with a model) budget forcing at matched budgets, LYNX +
    budget (at `thinking_budgets`, default: see `live_methods`) and NoWait; returns rows, outcomes, replay.
    `AnswerStated` reads the text with `tokenizer` (default: the attached bundle's); `TextProbeExit` rows need a
    fitted `text_probe`.

    Example:
        >>> rows, outcomes, replay = run_all(lynx, table, model, tok, text_probe=text_probe)  # doctest: +SKIP
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(lynx, "tokenizer", None)
    replay = Replay.from_bundle(table, lynx, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        rows, outcomes = evaluate(replay, replay_methods(confidences, lambdas, tokenizer=tokenizer,
                                                         text_probe=text_probe))
        if live and model is not None:
            methods = [Full(), *live_methods(replay, rows, model, tokenizer, lynx.exit_ids,
                                             thinking_budgets=thinking_budgets)]
            extra_rows, extra_outcomes = evaluate(replay, methods)
            rows += extra_rows[1:]
            outcomes += extra_outcomes[1:]
    return rows, outcomes, replay


def main(args) -> None:
    """`lynx-hf eval`: replay (and live) evaluation of a bundle on an event table; writes results and plots to --out.

    Args (argparse namespace): `model`, `gguf_file`, `bundle` (default: the organism's), `events` (an existing table,
    or where to collect one), `problems` + `n` (collect first), `confidences`, `live` (traces for the live check),
    `out`, `seed`, and optionally `text_probe_train` + `text_probe_calibration` (the bundle's own training and
    calibration tables, to fit the `TextProbe` control on).
    """
    from ..runtime.bundle import Lynx
    from ..loading import load_model, load_problems, prompt_fn
    from .plots import calibration_plot, pareto_plot
    from .splits import replay_split_rates
    from ..pipeline.events import relabel
    from ..pipeline.train import check_disjoint, check_test_disjoint, prompt_digests

    out = Path(args.out)
    if args.model == "organism":
        torch.set_num_threads(1)  # tiny matrices: extra threads only spin-wait on a shared CPU
    model, tokenizer = load_model(args.model, getattr(args, "gguf_file", None))
    bundle = args.bundle
    if bundle is None:
        from .. import organism

        bundle = organism.BUNDLE_DIR
    lynx = Lynx.from_pretrained(bundle, model=model, tokenizer=tokenizer)
    if args.events and Path(args.events).joinpath("settings.json").exists():
        table = EventTable.load(args.events)
    elif args.problems:
        problems = load_problems(args.problems, args.n, args.seed)
        folder = Path(args.events) if args.events else out / "events"
        collector = collector_for(model, tokenizer, lynx, prompt_fn=prompt_fn(args.model))
        table = collector.collect(problems, folder, batch_size=32, seed=args.seed)
    else:
        raise ValueError("Give --events (an existing event table) or --problems (to collect one into --out/events).")
    # replay reads a table's labels as "the answer is right": agreement labels say "unchanged", so go back to gold
    # (an unlabelled table raises, naming the fix: accuracy needs gold answers)
    table = relabel(table, "gold")
    check_table_matches_bundle(table, lynx)
    check_test_disjoint(table, lynx.metadata, f"the evaluation table {args.events or args.problems}")
    text_probe = None
    train_events, cal_events = getattr(args, "text_probe_train", None), getattr(args, "text_probe_calibration", None)
    if bool(train_events) != bool(cal_events):
        raise ValueError("Give both --text-probe-train and --text-probe-calibration (the event tables the bundle's "
                         "probe was trained and calibrated on), or neither.")
    if train_events:
        train_table, cal_table = EventTable.load(train_events), EventTable.load(cal_events)
        for t, part in ((train_table, "--text-probe-train"), (cal_table, "--text-probe-calibration")):
            check_table_matches_bundle(t, lynx)
            check_disjoint(prompt_digests(t), prompt_digests(table), f"{part} and the evaluation table: evaluate on "
                           "held-out problems")
        text_probe = TextProbe.fit(train_table, cal_table, model.get_input_embeddings().weight, seed=args.seed)
    budget = getattr(args, "max_thinking_tokens", None)
    rows, _, replay = run_all(lynx, table, model, tokenizer, confidences=args.confidences, text_probe=text_probe,
                              thinking_budgets=[budget] if budget else None,
                              live=not getattr(args, "replay_only", False))
    aurocs = probe_aurocs(replay, text_probe)
    extra = {"calibration_curve": calibration_curve(replay), "calibration_splits": replay_split_rates(replay),
             "aurocs": aurocs}
    if args.live:
        lynx.confidence = args.confidences[len(args.confidences) // 2]
        lynx.guarantee = getattr(args, "guarantee", DEFAULT_GUARANTEE)
        report = live_agreement(lynx, replay, args.live)
        extra["live_agreement"] = report
    md = write_results(rows, out, title=f"{args.model} on {args.events or args.problems}", extra=extra,
                       notes=[format_aurocs(aurocs)])
    pareto_plot(rows, out / "pareto.png", title=f"Accuracy vs tokens: {args.model}")
    calibration_plot(extra["calibration_splits"] or extra["calibration_curve"], out / "calibration.png",
                     title=f"Calibration: {args.model}")
    print(format_compact(rows))
    print(format_aurocs(aurocs))
    if text_probe is None:
        print("(no TextProbe rows: pass --text-probe-train/--text-probe-calibration to fit the text-only control)")
    if args.live:
        print(format_agreement(extra["live_agreement"]))
    print(f"every column in {md}; plots in {out}")
