"""Agreement labels vs gold labels on the organism: the same problems, the same traces, two ways to label them.

For each organism family (arithmetic, compare) this collects train / calibration / test event tables once with
gold labels (a cue is safe when its forced answer matches the gold answer), then relabels the same forced answers
by agreement (safe when the forced answer matches the trace's own full answer, `pipeline.events.relabel`: exactly
what `collect --labels agreement` writes for these traces, without re-sampling). It trains one probe per labelling
on the training problems, calibrates each on the calibration problems with its own labels, and replays both on the
test problems at c in {0.8, 0.9, 0.95} with the per-question guarantee:

- probe AUROC on the test cues, against gold labels and against agreement labels;
- accuracy (final answer vs gold; Full: every trace thinks to the end) and thinking saved (vs Full);
- the realised rate under both definitions: wrong-answer rate (questions whose exit answer is wrong vs gold: what
  gold labels bound) and changed-answer rate (questions with a full answer whose exit answer differs from it: what
  agreement labels bound and the live audit measures), each beside δ = 1 - c.

Tables are cached under `--out` (collection resumes); a rerun with the same arguments only replays.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agreement_labels.py [--train 120 --calibration 120 \\
        --test 120] [--out runs/agreement_labels]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from lynx_hf import organism
from lynx_hf.evaluation.demo import MAX_NEW_TOKENS
from lynx_hf.evaluation.replay import Replay
from lynx_hf.evaluation.cue_rules import Full, LynxExit
from lynx_hf.pipeline.collect import Collector
from lynx_hf.pipeline.events import relabel
from lynx_hf.pipeline.train import calibrate, describe, score, train
from lynx_hf.runtime.answers import answers_match
from lynx_hf.runtime.conformal import LynxCalibrationWarning, guarantee_statement
from lynx_hf.runtime.exit import exit_token_ids
from lynx_hf.runtime.probe import auroc

FAMILIES = ("arithmetic", "compare")
CONFIDENCES = (0.8, 0.9, 0.95)
LABELS = ("gold", "agreement")


def tables_for(collector: Collector, family: str, sizes: dict, seed: int, out: Path) -> dict:
    """Gold-labelled train / calibration / test tables of one family (collected, or resumed from `out`)."""
    tables = {}
    for split, n in sizes.items():
        started = time.perf_counter()
        problems = organism.problems(family, split, n=n, seed=seed)
        tables[split] = collector.collect(problems, out / family / split, batch_size=60, seed=seed, progress=False)
        print(f"  {family} {split}: {describe(tables[split])} ({time.perf_counter() - started:.0f} s)", flush=True)
    return tables


def evaluate(family: str, tables: dict, exit_length: int, seed: int) -> list[dict]:
    """One row per (labels, confidence): the probe and calibration of those labels, replayed on the gold test table."""
    test = tables["test"]
    test_agree = relabel(test, "agreement")
    # for the changed-answer rate: the full answer of each test trace (None: no reference, as in the audit)
    full_answers = [t.get("answer") for t in test.traces]
    referenced = sum(a is not None for a in full_answers)
    rows = []
    for labels in LABELS:
        train_table = relabel(tables["train"], labels)
        cal_table = relabel(tables["calibration"], labels)
        probe, report = train(train_table, seed=seed)
        calibration = calibrate(probe, cal_table)
        scores = score(probe, test)
        agree_scores = score(probe, test_agree)
        replay = Replay(test, scores, exit_length, calibration)
        full = Full().run(replay)
        base = {"family": family, "labels": labels, "train": describe(train_table), "cal": describe(cal_table),
                "auroc_gold": auroc(scores, test.safe), "auroc_agreement": auroc(agree_scores, test_agree.safe),
                "full_accuracy": float(full.correct.double().mean()), "n": test.n_traces, "referenced": referenced}
        for c in CONFIDENCES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LynxCalibrationWarning)
                outcome = LynxExit(c, "question").run(replay)
            exited = outcome.exited
            wrong = exited & ~outcome.correct  # the exit answer is wrong (gold): what gold labels bound
            changed = torch.tensor([bool(x) and ref is not None and not answers_match(a, ref)
                                    for x, a, ref in zip(exited.tolist(), outcome.answers, full_answers)])
            rows.append({**base, "confidence": c, "tau": outcome.info["tau"],
                         "accuracy": float(outcome.correct.double().mean()),
                         "saved": 1 - float(outcome.thinking_tokens.sum()) / float(full.thinking_tokens.sum()),
                         "exited": float(exited.double().mean()),
                         "wrong_rate": float(wrong.double().sum()) / test.n_traces,
                         "changed_rate": float(changed.double().sum()) / max(referenced, 1)})
    return rows


def print_tables(rows: list[dict]) -> None:
    print("\n### Probe AUROC on the test cues\n")
    print("| family | labels (probe + calibration) | training data | AUROC vs gold labels | AUROC vs agreement labels |")
    print("|---|---|---|---|---|")
    seen = set()
    for r in rows:
        if (r["family"], r["labels"]) in seen:
            continue
        seen.add((r["family"], r["labels"]))
        print(f"| {r['family']} | {r['labels']} | {r['train']} | {r['auroc_gold']:.3f} | {r['auroc_agreement']:.3f} |")
    print("\n### Exits on the test problems (per-question guarantee)\n")
    print("wrong: share of questions whose exit answer is wrong (gold); changed: share of questions with a full answer "
          "whose exit answer differs from it. Gold labels bound the first, agreement labels the second, by δ.\n")
    print("| family | labels | c | δ | threshold | accuracy (Full) | thinking saved | questions exited | wrong | "
          "changed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tau = "never" if r["tau"] == float("inf") else f"{r['tau']:.3f}"
        bound = "wrong" if r["labels"] == "gold" else "changed"
        wrong = f"**{r['wrong_rate']:.3f}**" if bound == "wrong" else f"{r['wrong_rate']:.3f}"
        changed = f"**{r['changed_rate']:.3f}**" if bound == "changed" else f"{r['changed_rate']:.3f}"
        print(f"| {r['family']} | {r['labels']} | {r['confidence']:g} | {1 - r['confidence']:.2f} | {tau} | "
              f"{r['accuracy']:.3f} ({r['full_accuracy']:.3f}) | {100 * r['saved']:.1f}% | {r['exited']:.3f} | "
              f"{wrong} | {changed} |")
    print("\n(bold: the rate the labels' guarantee bounds: "
          f"gold, {guarantee_statement('gold')}; agreement, {guarantee_statement('agreement')})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--calibration", type=int, default=120)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/agreement_labels", help="event tables (resumable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} CPU, {os.cpu_count()} "
          f"cores (shared), torch {torch.__version__}; organism, temperature {organism.TEMPERATURE}, "
          f"{args.train} / {args.calibration} / {args.test} train / calibration / test problems per family, "
          f"seed {args.seed}", flush=True)
    model, tok = organism.load()
    collector = Collector(model, tok, prompt_fn=organism.prompt, max_new_tokens=MAX_NEW_TOKENS,
                          temperature=organism.TEMPERATURE)
    exit_length = len(exit_token_ids(tok, collector.thinking.exit_text))
    sizes = {"train": args.train, "calibration": args.calibration, "test": args.test}
    rows = []
    for family in FAMILIES:
        tables = tables_for(collector, family, sizes, args.seed, Path(args.out))
        rows += evaluate(family, tables, exit_length, args.seed)
    print_tables(rows)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
