"""`make demo`: the whole LYNX evaluation on the shipped model organism, in a few minutes on a CPU.

For each task family of the organism (arithmetic, which the probe was trained on, and compare, a multiple-choice
format the probe never saw: transfer without retraining) it collects event tables for `n` held-out test problems
(reused if already in `out`), replays Full, LYNX at c in {0.8, 0.9, 0.95} under both guarantees, the text-only
baselines (AnswerStated rules and TextProbe at LYNX's confidences), FirstCue, Oracle and DEER, runs budget forcing at
matched budgets and NoWait live, checks live-vs-replay agreement of the plug-ins (sampled and greedy), prints a
compact table and the probe-vs-TextProbe AUROC, writes the full results and plots into `out/<family>/`, and shows
one trace before and after its exit.

TextProbe is trained and calibrated on the bundle's own training and calibration tables: their text side ships next
to the bundle (`text_events.safetensors`, written by `scripts/build_organism_bundle.py`); without it they are reused
from `runs/organism/` or re-collected once into `out/bundle-events/` with the recipe the bundle records (minutes).
Either way they are verified against the bundle (labels and question ids of the calibration table equal the
bundle's stored calibration, and its training note matches).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from ..runtime.conformal import DEFAULT_GUARANTEE, LynxCalibrationWarning
from ..pipeline.events import EventTable
from ..organism import TEMPERATURE

logger = logging.getLogger(__name__)

FAMILIES = ("arithmetic", "compare")
CONFIDENCES = (0.8, 0.9, 0.95)
LAMBDAS = (0.9, 0.95, 0.99, 0.999)
MAX_NEW_TOKENS = 768  # v3 traces average 203 (arithmetic) and 275 (compare) thinking tokens; 768 is its training length
BATCH_SIZE = 50  # problems per collection batch (= shard); the live check regenerates whole batches
LIVE_CONFIDENCE = 0.9
RUNS = Path("runs/organism")  # where scripts/build_organism_bundle.py keeps the bundle's event tables
TEXT_EVENTS = "text_events.safetensors"  # the text side of those tables, shipped next to the bundle
# how scripts/build_organism_bundle.py collects the bundle's tables (a bundle that records `tables` overrides it)
BUNDLE_RECIPE = {"family": "arithmetic", "seed": 0, "batch_size": 64, "max_new_tokens": MAX_NEW_TOKENS,
                 "temperature": TEMPERATURE, "splits": {"train": 700, "calibration": 500}}


def _collect(model, tok, lynx, family: str, split: str, n: int, seed: int, folder: Path, temperature: float = 0.6,
             batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS):
    from .. import organism
    from .evaluate import collector_for

    collector = collector_for(model, tok, lynx, prompt_fn=organism.prompt, max_new_tokens=max_new_tokens,
                              temperature=temperature)
    problems = organism.problems(family, split, n=n, seed=seed)
    return collector.collect(problems, folder, batch_size=batch_size, seed=seed)


def is_bundle_table(lynx, split: str, table) -> bool | None:
    """Whether `table` (an `EventTable` or its `TextEvents`) is the bundle's own `split` table.

    Calibration: its labels and question ids equal those stored in the bundle's calibration, and for an event
    table the LYNX probe's scores on it equal the stored scores too. Train: its description (events, traces, share
    safe) equals the bundle's training note (None: the bundle records none).

    Example:
        >>> is_bundle_table(lynx, "calibration", EventTable.load("runs/organism/calibration"))  # doctest: +SKIP
        True
    """
    from ..pipeline.train import describe, score

    if split == "calibration":
        cal = lynx.calibration
        same = (len(table) == cal.scores.numel() and torch.equal(table.safe.bool(), cal.safe.bool())
                and torch.equal(table.trace.long(), cal.question.long()))
        if same and isinstance(table, EventTable):
            same = bool(torch.allclose(score(lynx.probe, table).double(), cal.scores, atol=1e-6))
        return same
    note = lynx.metadata.get("train")
    return None if not note else describe(table) == note


def write_text_events(path: Path, train: EventTable, calibration: EventTable) -> Path:
    """Ship the text side of a bundle's training and calibration tables next to it (`TEXT_EVENTS`), so `make demo`
    trains the TextProbe control on them without re-collecting. Called by `scripts/build_organism_bundle.py`.

    Example:
        >>> write_text_events(organism.BUNDLE_DIR / TEXT_EVENTS, train, cal)  # doctest: +SKIP
    """
    from .text_rules import TextEvents, save_text_events
    from ..pipeline.train import describe

    settings = train.settings
    save_text_events(path, {"train": TextEvents.from_table(train), "calibration": TextEvents.from_table(calibration)},
                     metadata={"model_fingerprint": settings.get("model_fingerprint"),
                               "weights_sample": settings.get("weights_sample"),
                               "train": describe(train), "calibration": describe(calibration)})
    return path


def bundle_text_events(model, tok, lynx, out: Path, runs: Path = RUNS, bundle_dir: Path | None = None):
    """The text side of the bundle's training and calibration tables, and a note on where it came from.

    Shipped next to the bundle (`TEXT_EVENTS`, checked against the bundle's weights sample and calibration), else
    from `bundle_tables` (reused from `runs` or re-collected: minutes).

    Example:
        >>> train, cal, note = bundle_text_events(model, tok, lynx, Path("outputs/demo"))  # doctest: +SKIP
    """
    from .. import organism
    from .text_rules import TextEvents, load_text_events

    path = Path(bundle_dir or organism.BUNDLE_DIR) / TEXT_EVENTS
    if path.exists():
        splits, meta = load_text_events(path)
        weights = list(lynx.config.weights_sample or [])
        same_weights = (meta.get("weights_sample") or []) == weights
        if same_weights and is_bundle_table(lynx, "calibration", splits["calibration"]) \
                and is_bundle_table(lynx, "train", splits["train"]) is not False:
            return splits["train"], splits["calibration"], f"the bundle's own tables, shipped as {path.name} (verified)"
        logger.warning("%s does not belong to this bundle (rebuilt without it?): re-collecting the bundle's tables; "
                       "rerun scripts/build_organism_bundle.py to ship a matching one.", path)
    train, cal, note = bundle_tables(model, tok, lynx, out, runs)
    return TextEvents.from_table(train), TextEvents.from_table(cal), note


def bundle_recipe(lynx) -> dict:
    """How the bundle's training and calibration tables were collected (`BUNDLE_RECIPE` where it records nothing;
    the temperature is the one its calibration traces were sampled at)."""
    sampled = {k: v for k, v in lynx.metadata.get("sampling", {}).items() if k == "temperature"}
    return {**BUNDLE_RECIPE, **lynx.metadata.get("tables", {}), **sampled}


def bundle_tables(model, tok, lynx, out: Path, runs: Path = RUNS) -> tuple[EventTable, EventTable, str]:
    """The bundle's training and calibration tables: from `runs` if they are there and verify, else collected into
    `out/bundle-events/` with the bundle's recipe. Returns (train, calibration, a note on where they came from).

    Example:
        >>> train, cal, note = bundle_tables(model, tok, lynx, Path("outputs/demo"))  # doctest: +SKIP
    """
    recipe = bundle_recipe(lynx)
    tables, sources = {}, []
    for split in ("train", "calibration"):
        table = None
        if (runs / split / "settings.json").exists():
            try:
                table = EventTable.load(runs / split)
            except Exception as error:  # noqa: BLE001 - any unreadable table is simply re-collected
                logger.info("not reusing %s: %s", runs / split, error)
            if table is not None and is_bundle_table(lynx, split, table) is False:
                table = None
        if table is None:
            started = time.perf_counter()
            table = _collect(model, tok, lynx, recipe["family"], split, recipe["splits"][split], recipe["seed"],
                             out / "bundle-events" / split, temperature=recipe["temperature"],
                             batch_size=recipe["batch_size"], max_new_tokens=recipe["max_new_tokens"])
            sources.append(f"{split} collected in {time.perf_counter() - started:.0f} s")
        else:
            sources.append(f"{split} from {runs / split}")
        tables[split] = table
    checks = {split: is_bundle_table(lynx, split, t) for split, t in tables.items()}
    if all(checks.values()):
        verdict = "the bundle's own tables (verified)"
    elif checks["calibration"] and checks["train"] is None:
        verdict = "the bundle's calibration table (verified); the bundle records no training note to check"
    else:
        verdict = (f"NOT the bundle's tables ({', '.join(s for s, ok in checks.items() if ok is False)} differ): "
                   "TextProbe is trained on other problems than the LYNX probe; rebuild the bundle")
        logger.warning("TextProbe tables: %s", verdict)
    return tables["train"], tables["calibration"], f"{verdict}; {', '.join(sources)}"


def fit_text_probe(model, tok, lynx, out: Path, runs: Path = RUNS, bundle_dir: Path | None = None):
    """The TextProbe control, fitted on the bundle's training and calibration tables with the bundle's seed;
    returns (text_probe, note).

    Example:
        >>> text_probe, note = fit_text_probe(model, tok, lynx, Path("outputs/demo"))  # doctest: +SKIP
    """
    from .text_rules import TextProbe
    from ..pipeline.train import describe

    train, cal, note = bundle_text_events(model, tok, lynx, out, runs, bundle_dir)
    started = time.perf_counter()
    seed = {**BUNDLE_RECIPE, **lynx.metadata.get("tables", {})}["seed"]
    text_probe = TextProbe.fit(train, cal, model.get_input_embeddings().weight, seed=seed)
    validation = {w: round(r.val_auroc, 3) if r.val_auroc is not None else None for w, r in text_probe.reports.items()}
    return text_probe, (f"TextProbe: trained on {describe(train)}, calibrated on {describe(cal)} ({note}); window "
                        f"{text_probe.window} tokens chosen by validation AUROC {validation}, fitted in "
                        f"{time.perf_counter() - started:.0f} s")


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


def run_family(model, tok, lynx, family: str, n: int, out: Path, seed: int, live: int, quiet: bool = False,
               text_probe=None, notes: tuple[str, ...] = ()) -> dict:
    """Collect (or reuse), evaluate, check live agreement and plot one family; returns rows and reports.

    Example:
        >>> result = run_family(model, tok, lynx, "arithmetic", 50, Path("outputs/demo/arithmetic"), 0, 32)  # doctest: +SKIP
    """
    from .agreement import live_agreement
    from .evaluate import DEFAULT_METHOD, calibration_curve, probe_aurocs, run_all, text_only_margin, versus_text_rule
    from .tables import (
        format_agreement, format_aurocs, format_compact, format_guarantee_table, format_text_margin, write_results,
    )
    from .plots import calibration_plot, pareto_plot
    from .splits import replay_split_rates

    say = (lambda *a: None) if quiet else print
    started = time.perf_counter()
    temperature = bundle_recipe(lynx)["temperature"]  # test events sampled as the calibration events were
    table = _collect(model, tok, lynx, family, "test", n, seed, out / "events", temperature=temperature)
    say(f"{family}: {table.n_traces} traces, {len(table)} cue events "
        f"({float(table.safe.double().mean()) if len(table) else float('nan'):.1%} safe), "
        f"collected in {time.perf_counter() - started:.0f} s")
    rows, outcomes, replay = run_all(lynx, table, model, tok, confidences=CONFIDENCES, lambdas=LAMBDAS,
                                     text_probe=text_probe)
    aurocs = probe_aurocs(replay, text_probe)
    margin = text_only_margin(rows, DEFAULT_METHOD)
    reports = []
    if live:
        lynx.confidence, lynx.guarantee = LIVE_CONFIDENCE, DEFAULT_GUARANTEE
        reports.append(live_agreement(lynx, replay, live))
        greedy = _collect(model, tok, lynx, family, "test", live, seed, out / "events-greedy", temperature=0.0)
        from .replay import Replay

        reports.append(live_agreement(lynx, Replay.from_bundle(greedy, lynx), live))
    curve = calibration_curve(replay)
    transfer = " (held-out format: probe never trained on it)" if family == "compare" else ""
    write_results(rows, out, title=f"organism, {family} test{transfer}", extra={
        "calibration_curve": curve, "live_agreement": reports, "n_traces": table.n_traces, "n_events": len(table),
        "aurocs": aurocs, "text_margin": margin}, notes=(format_aurocs(aurocs), format_text_margin(margin), *notes))
    pareto_plot(rows, out / "pareto.png", title=f"Organism, {family}{transfer}: accuracy vs tokens")
    calibration_plot(replay_split_rates(replay) or curve, out / "calibration.png",
                     title=f"Organism, {family}: premature exits vs target")
    say(f"\n### {family}{transfer}: {table.n_traces} held-out problems\n")
    say(format_compact(rows))
    say(f"\nthe default guarantee ({DEFAULT_GUARANTEE}) at each confidence:\n")
    say(format_guarantee_table(rows))
    say(f"\n{versus_text_rule(rows)}")
    say(f"\n{format_aurocs(aurocs)}")
    say(format_text_margin(margin))
    say(f"every column: {out / 'results.md'}")
    for report in reports:
        say(format_agreement(report))
    # the example trace: from LYNX at the live-check confidence if one of its exits is right, else any LYNX run
    preferred = DEFAULT_METHOD
    candidates = sorted((o for o in outcomes if o.info.get("family", "").startswith("Lynx")),
                        key=lambda o: o.method != preferred)
    example = next((show_trace(tok, lynx, replay, o) for o in candidates if bool((o.exited & o.correct).any())),
                   "(no LYNX exit answered correctly, so there is no before/after example)")
    return {"rows": rows, "live_agreement": reports, "example": example, "aurocs": aurocs, "text_margin": margin,
            "seconds": time.perf_counter() - started}


def main(args) -> dict:
    """`lynx-hf demo` / `make demo`: args `n` (problems per family), `out`, `seed` (optional: `live`, `quiet`,
    `runs`: where the bundle's training and calibration tables may already be)."""
    from .. import organism
    from ..runtime.bundle import Lynx

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
    runs = Path(getattr(args, "runs", None) or RUNS)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        text_probe, note = fit_text_probe(model, tok, lynx, out, runs)
        if not quiet:
            print(note)
        results["text_probe"] = note
        for family in FAMILIES:
            results[family] = run_family(model, tok, lynx, family, args.n, out / family, args.seed, live, quiet,
                                         text_probe=text_probe, notes=(note,))
    if not quiet:
        print(results["arithmetic"]["example"])
        print(f"results, plots and event tables in {out}/<family>/")
    return results
