"""Recalibration on the user's own traffic, measured on the organism: transfer, drift, and the live loop.

Three parts (`--parts`, default all), each printing markdown tables:

* **transfer**: the shipped arithmetic bundle on compare traffic (a format its probe never saw). Its shipped
  calibration, vs the same probe recalibrated on N audited compare rows (labels by agreement: the audit's forced
  answer vs the row's own full answer, `Lynx.recalibrate`'s construction, replayed on a collected table), vs a
  compare calibration with gold labels on the same N rows. Held-out compare test problems, disjoint from the N rows;
  per question at c in {0.8, 0.9, 0.95}: thinking saved, accuracy, changed-answer rate (exit answer differs from the
  full answer) and the gold premature rate. N in {100, 200, 400}: the first N calibration rows, and (N < pool) the
  mean over 50 random draws of N rows from the pool.
* **drift**: arithmetic traffic sampled hotter (T = 1.6) than the bundle's calibration (T = 1.2). The shipped
  calibration's audit on it, then recalibration on N rows of it, then the audit of the new calibration and its
  rates on fresh T = 1.6 test rows.
* **live**: the loop a user runs, with real `generate` calls: `audit_rate=1.0` on compare calibration-split
  problems (stop mode, `lynx.stopper()` + `lynx.answer(out)`), `lynx.recalibrate()`, then held-out compare
  test problems sampled three times with the same seeds (so every row's trace is the same up to its exit): fully
  (the recalibrated Lynx with every row audited: full answers, and the new calibration's own audit), with the
  shipped Lynx exiting, and with the recalibrated Lynx exiting. Thinking saved and changed-answer rate per Lynx.

Event tables are collected once into `--out` (`lynx-hf collect`, minutes each) and reused.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/recalibration.py --parts transfer drift live
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lynx_hf import Lynx, organism
from lynx_hf.errors import TooFewAuditedRowsError
from lynx_hf.evaluation.audit_replay import replay_rows
from lynx_hf.evaluation.replay import Replay
from lynx_hf.pipeline.events import EventTable
from lynx_hf.runtime.answers import answers_match
from lynx_hf.runtime.audit import audit_report, probe_digest, recalibrate_rows
from lynx_hf.runtime.conformal import Calibration, LynxCalibrationWarning, first_exit

CONFIDENCES = (0.8, 0.9, 0.95)
SIZES = (100, 200, 400)
DRAWS = 50
MAX_NEW_TOKENS = 768
# name -> (family, split, n, temperature)
TABLES = {
    "compare-calibration": ("compare", "calibration", 400, organism.TEMPERATURE),
    "compare-test": ("compare", "test", 200, organism.TEMPERATURE),
    "arithmetic-t1.6-calibration": ("arithmetic", "calibration", 200, 1.6),
    "arithmetic-t1.6-test": ("arithmetic", "test", 100, 1.6),
}
SETTINGS = dict(guarantee="question", confidence=0.9, risk_level=None, rule="envelope")


def table(out: Path, name: str) -> EventTable:
    """The named table, collected with `lynx-hf collect` unless already in `out`."""
    from lynx_hf.cli import main as cli

    folder = out / name
    if not (folder / "settings.json").exists() or not list(folder.glob("shard-*.safetensors")):
        family, split, n, temperature = TABLES[name]
        cli(["collect", "--model", "organism", "--problems", f"organism:{family}:{split}", "--n", str(n),
             "--temperature", str(temperature), "--max-new-tokens", str(MAX_NEW_TOKENS), "--layers", "1", "2", "3",
             "4", "--batch-size", "50", "--out", str(folder)])
    return EventTable.load(folder)


def rows_of(lynx: Lynx, replay: Replay, traces=None):
    """The audited rows `lynx` would log on (a subset of) a replay's traces."""
    rows = replay_rows(replay.table, replay.scores, lynx.threshold, SETTINGS, probe=probe_digest(lynx.probe))
    return rows if traces is None else [rows[i] for i in traces]


def gold_calibration(replay: Replay, traces) -> Calibration:
    """A calibration of the same probe on the same traces with their gold labels (what `lynx-hf calibrate` builds)."""
    sub = replay.table.select_traces(traces)
    return Calibration(scores=_scores_of(replay, traces), safe=sub.safe, question=sub.trace)


def _scores_of(replay: Replay, traces) -> torch.Tensor:
    """The replay's scores of the given traces' events, in `select_traces` order."""
    pieces = []
    for t in traces:
        pieces.append(replay.scores[replay.table.trace == t])
    return torch.cat(pieces).double()


def measure(replay: Replay, calibration: Calibration, confidence: float, guarantee: str = "question",
            risk_level: float | None = None) -> dict:
    """Per-question replay of the first exit at the calibration's threshold on a test replay."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        tau = calibration.threshold(confidence, guarantee, risk_level=risk_level)
    t = replay.table
    event = torch.full((replay.n_traces,), -1, dtype=torch.long)
    if len(t):
        event[torch.unique_consecutive(t.trace)] = first_exit(replay.scores, t.trace, tau)
    out = replay.outcome("lynx", event)
    full_thinking = float(replay.think_length.sum())
    referenced = changed = unsafe_events = unsafe_exits = 0
    for i, (e, trace) in enumerate(zip(event.tolist(), t.traces)):
        if trace["answer"] is None:
            continue
        referenced += 1
        changed += e >= 0 and not answers_match(t.answers[e], trace["answer"])
    above = replay.scores.double() >= tau
    for k in range(len(t)):
        ref = t.traces[int(t.trace[k])]["answer"]
        if ref is None:
            continue
        if not answers_match(t.answers[k], ref):
            unsafe_events += 1
            unsafe_exits += bool(above[k])
    return {
        "tau": tau,
        "saved": 1 - float(out.thinking_tokens.sum()) / full_thinking,
        "accuracy": float(out.correct.double().mean()),
        "changed": changed / max(referenced, 1),
        "changed_event": unsafe_exits / max(unsafe_events, 1),
        "premature": float((out.exited & ~t.safe[out.event.clamp_min(0)]).double().mean()) if len(t) else 0.0,
        "exited": float(out.exited.double().mean()),
    }


def fmt(x: float) -> str:
    return "never exits" if math.isinf(x) else f"{x:.3f}"


def transfer(out: Path, lynx: Lynx, seed: int) -> None:
    cal_table, test_table = table(out, "compare-calibration"), table(out, "compare-test")
    cal, test = Replay.from_bundle(cal_table, lynx), Replay.from_bundle(test_table, lynx)
    full_acc = float(test.correct.double().mean())
    print(f"\n### Transfer: arithmetic bundle on compare traffic ({test.n_traces} held-out compare test problems, "
          f"T = {TABLES['compare-test'][3]}; full reasoning accuracy {full_acc:.3f})\n")
    print("Per question, marginal. changed = exit answer differs from the row's full answer (the guarantee of an "
          "agreement-labelled calibration); premature = gold-labelled (the exit answer is wrong where a gold-labelled "
          "calibration bounds it).\n")
    print("| calibration | N | c | δ | τ | thinking saved | accuracy | changed-answer rate | premature (gold) |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_rows = rows_of(lynx, cal)
    digest = probe_digest(lynx.probe)
    results = {}
    for c in CONFIDENCES:
        m = measure(test, lynx.calibration, c)
        results["shipped", None, c] = m
        print(f"| shipped (arithmetic, gold, 500 problems) | - | {c:g} | {1 - c:.2f} | {fmt(m['tau'])} | "
              f"{m['saved']:.1%} | {m['accuracy']:.3f} | {m['changed']:.3f} | {m['premature']:.3f} |")
    sizes = sorted({min(n, cal.n_traces) for n in SIZES})
    for n in sizes:
        traces = list(range(n))
        for c in CONFIDENCES:
            for kind in ("agreement", "gold"):
                try:
                    if kind == "agreement":
                        calibration = recalibrate_rows([all_rows[i] for i in traces], confidence=c,
                                                       guarantee="question", probe=digest).calibration
                    else:
                        calibration = gold_calibration(cal, traces)
                except TooFewAuditedRowsError as error:
                    print(f"| {kind} | {n} | {c:g} | refused: {error} |")
                    continue
                m = measure(test, calibration, c)
                results[kind, n, c] = m
                label = "recalibrated (audited rows, agreement)" if kind == "agreement" else "compare, gold labels"
                print(f"| {label} | {n} | {c:g} | {1 - c:.2f} | {fmt(m['tau'])} | {m['saved']:.1%} | "
                      f"{m['accuracy']:.3f} | {m['changed']:.3f} | {m['premature']:.3f} |")
    # the target at c = 0.9
    print("\nTarget at c = 0.9 per question: saved within 3 points of the gold-labelled compare calibration and "
          ">= 10 points above the shipped one, changed-answer rate <= δ = 0.10 (within tolerance):\n")
    print("| N | recalibrated saved | gold saved | gap | shipped saved | above shipped | changed | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    shipped = results["shipped", None, 0.9]
    for n in sizes:
        a, g = results.get(("agreement", n, 0.9)), results.get(("gold", n, 0.9))
        if a is None or g is None:
            continue
        tol = 2 * math.sqrt(0.1 * 0.9 / test.n_traces)
        hit = abs(a["saved"] - g["saved"]) <= 0.03 and a["saved"] - shipped["saved"] >= 0.10 and \
            a["changed"] <= 0.1 + tol
        print(f"| {n} | {a['saved']:.1%} | {g['saved']:.1%} | {100 * (a['saved'] - g['saved']):+.1f} pts | "
              f"{shipped['saved']:.1%} | {100 * (a['saved'] - shipped['saved']):+.1f} pts | {a['changed']:.3f} | "
              f"{'hit' if hit else 'miss'} |")
    # random draws of N audited rows from the pool: the spread one deployment would see
    rng = np.random.default_rng(seed)
    print(f"\nOver {DRAWS} random draws of N audited rows from the {cal.n_traces} compare calibration rows (c = 0.9 per "
          "question; mean ± s.d. on the same test problems):\n")
    print("| N | recalibrated saved | gold saved | recalibrated changed | gold changed | recalibrated premature | "
          "draws above δ (changed) |")
    print("|---|---|---|---|---|---|---|")
    for n in SIZES:
        if n >= cal.n_traces:
            continue
        stats = {"agreement": [], "gold": []}
        for _ in range(DRAWS):
            traces = sorted(rng.choice(cal.n_traces, size=n, replace=False).tolist())
            for kind in stats:
                try:
                    calibration = recalibrate_rows([all_rows[i] for i in traces], confidence=0.9,
                                                   guarantee="question", probe=digest).calibration \
                        if kind == "agreement" else gold_calibration(cal, traces)
                except TooFewAuditedRowsError:
                    continue
                stats[kind].append(measure(test, calibration, 0.9))
        a, g = stats["agreement"], stats["gold"]

        def ms(values, key):
            v = np.array([x[key] for x in values])
            return f"{v.mean():.3f} ± {v.std():.3f}" if key != "saved" else f"{v.mean():.1%} ± {v.std():.1%}"

        above = np.mean([x["changed"] > 0.1 for x in a])
        print(f"| {n} | {ms(a, 'saved')} | {ms(g, 'saved')} | {ms(a, 'changed')} | {ms(g, 'changed')} | "
              f"{ms(a, 'premature')} | {above:.2f} |")


def drift(out: Path, lynx: Lynx) -> None:
    cal_table, test_table = table(out, "arithmetic-t1.6-calibration"), table(out, "arithmetic-t1.6-test")
    cal, test = Replay.from_bundle(cal_table, lynx), Replay.from_bundle(test_table, lynx)
    bound = lynx.calibration.max_unsafe_per_question
    print(f"\n### Drift: arithmetic traffic sampled at T = 1.6 (the bundle was calibrated at T = "
          f"{lynx.metadata.get('sampling', {}).get('temperature', 1.2)})\n")
    shipped_rows = rows_of(lynx, cal)
    report = audit_report(shipped_rows, max_unsafe=bound)
    g = report.groups[0]
    print(f"Shipped calibration, audit of {g.rows} T = 1.6 rows at c = 0.9 per question: {g.disagreements}/"
          f"{g.denominator} = {g.rate:.3f} changed, 95% CS [{g.lower:.3f}, {g.upper:.3f}]: **{g.verdict}**\n")
    print(f"Then recalibrated on the first N of those rows; fresh rows: {test.n_traces} held-out T = 1.6 test problems "
          f"(per question, marginal; full reasoning accuracy {float(test.correct.double().mean()):.3f}).\n")
    print("| calibration | N | c | δ | τ | thinking saved | accuracy | changed-answer rate | premature (gold) | "
          "audit of it on the fresh rows (95% CS) | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    digest = probe_digest(lynx.probe)
    for n in [None] + sorted({min(n, cal.n_traces) for n in (100, 200)}):
        for c in CONFIDENCES:
            if n is None:
                calibration, label = lynx.calibration, "shipped (T = 1.2)"
            else:
                try:
                    calibration = recalibrate_rows(shipped_rows[:n], confidence=c, guarantee="question",
                                                   probe=digest).calibration
                except TooFewAuditedRowsError as error:
                    print(f"| recalibrated | {n} | {c:g} | refused: {error} |")
                    continue
                label = "recalibrated (T = 1.6 rows, agreement)"
            m = measure(test, calibration, c)
            settings = dict(SETTINGS, confidence=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LynxCalibrationWarning)
                tau = calibration.threshold(c, "question")
            fresh = replay_rows(test.table, test.scores, tau, settings)
            fg = audit_report(fresh, max_unsafe=calibration.max_unsafe_per_question).groups[0]
            print(f"| {label} | {n or '-'} | {c:g} | {1 - c:.2f} | {fmt(m['tau'])} | {m['saved']:.1%} | "
                  f"{m['accuracy']:.3f} | {m['changed']:.3f} | {m['premature']:.3f} | "
                  f"{fg.disagreements}/{fg.denominator} [{fg.lower:.3f}, {fg.upper:.3f}] | {fg.verdict} |")


def live(lynx_dir, n_cal: int, n_test: int, batch: int, seed: int, n_check: int) -> None:
    """The live loop (module docstring). On the test problems both Lynx objects ride in the same `generate` calls
    with every row audited: each one's plug-in decides live where it would exit (`last_exits`), and its audit forces
    that exit with the construction `answer(out)` uses and compares it with the row's full answer. With `n_check`,
    the first test batch is also run with each Lynx exiting for real, to check that the exits match the audit's."""
    from lynx_hf.pipeline.collect import think_length
    from lynx_hf.pipeline.rollout import cut_at_eos

    model, tok = organism.load()
    sample = dict(do_sample=True, temperature=organism.TEMPERATURE, top_p=0.95, max_new_tokens=MAX_NEW_TOKENS)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]

    def encode(problems):
        return tok([organism.prompt(tok, p["question"]) for p in problems], return_tensors="pt", padding=True,
                   add_special_tokens=False)

    t0 = time.time()
    shipped = Lynx.from_pretrained(lynx_dir, model=model, tokenizer=tok, audit_rate=1.0)
    end_ids = tok(shipped.thinking.think_end, add_special_tokens=False).input_ids
    cal_problems = organism.problems("compare", "calibration", n=n_cal, seed=seed)
    for k, start in enumerate(range(0, len(cal_problems), batch)):
        enc = encode(cal_problems[start:start + batch])
        torch.manual_seed(seed * 1000 + k)
        out = model.generate(**enc, stopping_criteria=[shipped.stopper()], **sample)
        shipped.answer(out)  # settles this call's audit
        print(f"calibration traffic: {start + enc.input_ids.shape[0]}/{n_cal} rows audited "
              f"({time.time() - t0:.0f} s)", flush=True)
    print(f"\n### Live: audit_rate=1.0 on {n_cal} compare calibration-split problems, then `lynx.recalibrate()`\n")
    print("```\n" + str(shipped.audit()) + "\n```\n")
    recal = shipped.recalibrate()
    r = recal.metadata["recalibration"]
    print(f"recalibrated on {r['rows_used']} audited rows ({r['events']} cue events, {r['rows_with_cues']} rows with "
          f"a cue); threshold at c = 0.9 per question: shipped {shipped.threshold:.4f}, recalibrated "
          f"{recal.threshold:.4f} ({time.time() - t0:.0f} s)\n", flush=True)
    shipped.reset_audit()  # the test rows' audit starts here, for both
    test_problems = organism.problems("compare", "test", n=n_test, seed=seed)
    gold = [p["answer"] for p in test_problems]
    full_thinking, full_answers, seen = [], [], 0
    thinking = {"shipped": [], "recalibrated": []}
    for k, start in enumerate(range(0, len(test_problems), batch)):
        chunk = test_problems[start:start + batch]
        enc = encode(chunk)
        width = enc.input_ids.shape[1]
        torch.manual_seed(seed * 1000 + 500 + k)
        out = model.generate(**enc, stopping_criteria=[shipped.stopper(), recal.stopper()],
                             **sample)
        for name, which in (("shipped", shipped), ("recalibrated", recal)):
            records = which.last_exits
            which.answer(out)
            for i, record in enumerate(records):
                generated = cut_at_eos(out[i, width:].tolist(), eos)
                full = think_length(generated, end_ids)
                exits_here = record.would_exit and not record.by_budget
                thinking[name].append(record.start - width if exits_here else full)
                if name == "shipped":
                    full_thinking.append(full)
                    full_answers.append(organism.extract_answer(tok.decode(generated, skip_special_tokens=True)))
        seen += len(chunk)
        if k == 0 and n_check:  # the same batch and seed, so the same samples up to each exit
            check(model, tok, lynx_dir, recal, chunk, seed * 1000 + 500, sample, shipped.audit_log.rows,
                  recal.audit_log.rows, encode)
        print(f"\n#### Held-out compare test problems: {seen}/{n_test} ({time.time() - t0:.0f} s)\n")
        print("c = 0.9 per question, δ = 0.10. Exit decisions by each Lynx's live plug-in (both in the same "
              "generate calls, every row audited, so every row also ran in full); the answer at the exit is the "
              "audit's forced exit, the construction `lynx.answer(out)` uses; changed = it differs from the row's "
              "full answer.\n")
        print("| Lynx | τ | rows that exit | thinking saved | changed-answer rate | accuracy (gold) |")
        print("|---|---|---|---|---|---|")
        acc_full = np.mean([a is not None and answers_match(a, g) for a, g in zip(full_answers, gold[:seen])])
        print(f"| full reasoning | - | 0/{seen} | 0.0% | - | {acc_full:.3f} |")
        for name, which in (("shipped", shipped), ("recalibrated", recal)):
            rows = which.audit_log.rows
            referenced = [x for x in rows if x.reference is not None]
            changed = sum(x.changed for x in referenced)
            answers = [x.exit_answer if x.would_exit else f for x, f in zip(rows, full_answers)]
            acc = np.mean([a is not None and answers_match(a, g) for a, g in zip(answers, gold[:seen])])
            saved = 1 - sum(thinking[name]) / sum(full_thinking)
            print(f"| {name} | {which.threshold:.4f} | {sum(x.would_exit for x in rows)}/{len(rows)} | {saved:.1%} | "
                  f"{changed}/{len(referenced)} = {changed / max(len(referenced), 1):.3f} | {acc:.3f} |")
        print(f"\nThe recalibrated Lynx's audit on these test rows (fresh traffic, its first audit):\n")
        print("```\n" + str(recal.audit()) + "\n```", flush=True)
    print(f"\nlive part: {time.time() - t0:.0f} s")


def check(model, tok, lynx_dir, recal, problems, seed, sample, shipped_rows, recal_rows, encode) -> None:
    """Run `problems` (the first test batch, same seed) with each Lynx exiting for real (stop mode,
    `answer(out)`), and count rows whose exit position and answer equal what the audit recorded."""
    enc = encode(problems)
    for name, which, rows in (("shipped", Lynx.from_pretrained(lynx_dir, model=model, tokenizer=tok), shipped_rows),
                              ("recalibrated", copy.copy(recal), recal_rows)):
        which.audit_rate = 0.0
        torch.manual_seed(seed)
        out = model.generate(**enc, stopping_criteria=[which.stopper()], **sample)
        answers = which.answer(out)
        same = sum((rec.exited == row.would_exit) and (not rec.exited or answers_match(a.answer, row.exit_answer))
                   for rec, a, row in zip(which.last_exits, answers, rows))
        print(f"check, {name} exiting for real on {len(problems)} test problems: {same}/{len(problems)} rows exit "
              "where the audit said and give the audit's exit answer", flush=True)


def write_fixture(out: Path, lynx: Lynx, path: Path, names=("compare-calibration", "compare-test")) -> None:
    """The audited rows the shipped bundle would log on the compare tables (scores and agreement labels per cue;
    rows without a full answer left out): the pool of `tests/test_recalibration.py`'s statistical tests."""
    import json

    rows = []
    for name in names:
        replay = Replay.from_bundle(table(out, name) if name in TABLES else EventTable.load(name), lynx)
        rows += [{"scores": list(r.scores), "agrees": list(r.agrees)} for r in rows_of(lynx, replay)
                 if r.agrees is not None]
    path.write_text(json.dumps({"description": "the shipped organism bundle's audited rows on compare traffic "
                                f"({', '.join(names)}): per cue, probe score and agreement label", "rows": rows})
                    + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["transfer", "drift", "live"],
                        choices=["transfer", "drift", "live"])
    parser.add_argument("--out", default="outputs/recalibration", help="where the event tables are kept")
    parser.add_argument("--bundle", default=str(organism.BUNDLE_DIR))
    parser.add_argument("--live-cal", type=int, default=200)
    parser.add_argument("--live-test", type=int, default=200)
    parser.add_argument("--live-check", type=int, default=1, help="1: also run the first test batch with each Lynx "
                        "exiting for real, to check the audit's exits (0: skip)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixture", help="write the statistical tests' pool of audited rows here and stop")
    parser.add_argument("--fixture-tables", nargs="+", default=["compare-calibration", "compare-test"])
    args = parser.parse_args()
    if args.fixture:
        write_fixture(Path(args.out), Lynx.from_pretrained(args.bundle), Path(args.fixture), args.fixture_tables)
        return
    out = Path(args.out)
    start = time.time()
    lynx = Lynx.from_pretrained(args.bundle)
    if "transfer" in args.parts:
        transfer(out, lynx, args.seed)
    if "drift" in args.parts:
        drift(out, lynx)
    if "live" in args.parts:
        live(args.bundle, args.live_cal, args.live_test, args.batch, args.seed, args.live_check)
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
