"""`make demo`: the whole LYNX evaluation on the shipped model organism, in a few minutes on a CPU.

For each task family of the organism (arithmetic, which the probe was trained on, and compare, a multiple-choice
format the probe never saw: transfer without retraining) it collects event tables for `n` held-out test problems
(reused if already in `out`), replays Full, LYNX at c in {0.8, 0.9, 0.95} under both guarantees, FirstCue, Oracle
and DEER, runs budget forcing at matched budgets and NoWait live, checks live-vs-replay agreement of the plug-ins
(sampled and greedy), prints the tables, writes results and plots into `out/<family>/`, and shows one trace before
and after its exit.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from .conformal import LynxCalibrationWarning

logger = logging.getLogger(__name__)

FAMILIES = ("arithmetic", "compare")
CONFIDENCES = (0.8, 0.9, 0.95)
LAMBDAS = (0.9, 0.95, 0.99, 0.999)
MAX_NEW_TOKENS = 400  # the organism's traces are 100-300 tokens; the shipped bundle was collected with 400
BATCH_SIZE = 50  # problems per collection batch (= shard); the live check regenerates whole batches
LIVE_CONFIDENCE = 0.9


def _collect(model, tok, lynx, family: str, split: str, n: int, seed: int, folder: Path, temperature: float = 0.6):
    from . import organism
    from .evaluate import collector_for

    collector = collector_for(model, tok, lynx, prompt_fn=organism.prompt, max_new_tokens=MAX_NEW_TOKENS,
                              temperature=temperature)
    problems = organism.problems(family, split, n=n, seed=seed)
    return collector.collect(problems, folder, batch_size=BATCH_SIZE, seed=seed)


def show_trace(tok, lynx, replay, outcome) -> str:
    """One trace before and after its exit: the exit that saved the most thinking with a right answer.

    Example:
        >>> print(show_trace(tok, lynx, replay, outcomes[1]))  # doctest: +SKIP
    """
    table = replay.table
    saved = torch.where(outcome.exited & outcome.correct, replay.think_length - outcome.thinking_tokens, -1)
    t = int(saved.argmax())
    if saved[t] < 0:
        return "(no trace exited with a right answer at this confidence)"
    e = int(outcome.event[t])
    trace = table.traces[t]
    prompt, ids = trace["prompt_length"], trace["token_ids"]
    full = tok.decode(ids[prompt:], skip_special_tokens=True)
    exited = tok.decode(ids[prompt:int(table.start[e])], skip_special_tokens=True) + lynx.config.exit_text + \
        f"{table.answers[e]}}}"
    rule = "=" * 100
    return (f"{rule}\nTrace {trace['id']} (gold {trace['gold']}), {outcome.method}: exit at the cue on token "
            f"{int(table.position[e]) - prompt} with probe score {float(replay.scores[e]):.3f} >= tau "
            f"{outcome.info['tau']:.3f}; thinking {int(replay.think_length[t])} -> {int(outcome.thinking_tokens[t])} "
            f"tokens\n{rule}\nBEFORE (full reasoning):\n{full}\n{rule}\nAFTER (LYNX exit, cue dropped, exit text "
            f"appended, model answers):\n{exited}\n{rule}")


def run_family(model, tok, lynx, family: str, n: int, out: Path, seed: int, live: int, quiet: bool = False) -> dict:
    """Collect (or reuse), evaluate, check live agreement and plot one family; returns rows and reports.

    Example:
        >>> result = run_family(model, tok, lynx, "arithmetic", 50, Path("outputs/demo/arithmetic"), 0, 32)  # doctest: +SKIP
    """
    from .evaluate import calibration_curve, format_agreement, format_table, live_agreement, run_all, write_results
    from .plots import calibration_plot, pareto_plot

    say = (lambda *a: None) if quiet else print
    started = time.perf_counter()
    table = _collect(model, tok, lynx, family, "test", n, seed, out / "events")
    say(f"{family}: {table.n_traces} traces, {len(table)} cue events "
        f"({float(table.safe.double().mean()) if len(table) else float('nan'):.1%} safe), "
        f"collected in {time.perf_counter() - started:.0f} s")
    rows, outcomes, replay = run_all(lynx, table, model, tok, confidences=CONFIDENCES, lambdas=LAMBDAS)
    reports = []
    if live:
        lynx.confidence, lynx.guarantee = LIVE_CONFIDENCE, "event"
        reports.append(live_agreement(lynx, replay, live))
        greedy = _collect(model, tok, lynx, family, "test", live, seed, out / "events-greedy", temperature=0.0)
        from .baselines import Replay

        reports.append(live_agreement(lynx, Replay.from_bundle(greedy, lynx), live))
    curve = calibration_curve(replay)
    transfer = " (held-out format: probe never trained on it)" if family == "compare" else ""
    write_results(rows, out, title=f"organism, {family} test{transfer}", extra={
        "calibration_curve": curve, "live_agreement": reports, "n_traces": table.n_traces, "n_events": len(table)})
    pareto_plot(rows, out / "pareto.png", title=f"Organism, {family}{transfer}: accuracy vs tokens")
    calibration_plot(curve, out / "calibration.png", title=f"Organism, {family}: premature exits vs target")
    say(f"\n### {family}{transfer}: {table.n_traces} held-out problems\n")
    say(format_table(rows))
    for report in reports:
        say(format_agreement(report))
    # the example trace: from LYNX at the live-check confidence if one of its exits is right, else any LYNX run
    preferred = f"Lynx c={LIVE_CONFIDENCE:g} (event)"
    candidates = sorted((o for o in outcomes if o.info.get("family", "").startswith("Lynx")),
                        key=lambda o: o.method != preferred)
    example = next((show_trace(tok, lynx, replay, o) for o in candidates if bool((o.exited & o.correct).any())),
                   "(no LYNX exit answered correctly, so there is no before/after example)")
    return {"rows": rows, "live_agreement": reports, "example": example, "seconds": time.perf_counter() - started}


def main(args) -> dict:
    """`lynx-hf demo` / `make demo`: args `n` (problems per family), `out`, `seed` (optional: `live`, `quiet`)."""
    from . import organism
    from .bundle import Lynx

    # One intra-op thread: the organism's matrices are tiny, and on a shared CPU extra threads spin-wait for cores
    # (measured here: a collection batch took 179 s with 2 threads under load and 3 s with 1).
    torch.set_num_threads(1)
    out = Path(args.out)
    if not (organism.BUNDLE_DIR / "config.json").exists():
        raise FileNotFoundError(f"No bundle in {organism.BUNDLE_DIR}: build it with "
                                "`python scripts/build_organism_bundle.py`.")
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    live = getattr(args, "live", None)
    live = min(64, args.n) if live is None else live
    quiet = bool(getattr(args, "quiet", False))
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        for family in FAMILIES:
            results[family] = run_family(model, tok, lynx, family, args.n, out / family, args.seed, live, quiet)
    if not quiet:
        print(results["arithmetic"]["example"])
        print(f"results, plots and event tables in {out}/<family>/")
    return results
