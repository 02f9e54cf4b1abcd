"""What each guarantee strength delivers and costs on the organism's held-out problems.

1. Exceedance: over random calibration draws, how often the premature-exit rate lands above delta, for marginal and
   PAC thresholds (risk_level = alpha), per event and per question. Two kinds of draw from the held-out pool
   (`tests/fixtures/organism_test_events.json`, the shipped probe's scores on 500 test problems):
   * "population": 250 calibration questions drawn i.i.d. from the pool, the rate computed exactly on the whole pool
     (what a PAC guarantee is about: the true rate of the calibration set at hand);
   * "half split": half the questions calibrate, the rate is measured on the other half (adds the test half's own
     sampling noise on top).
2. Savings cost: thinking-token savings at c = 0.9 with marginal thresholds vs PAC at alpha = 0.1 and 0.05, per
   guarantee, side by side: with the shipped bundle's calibration (500 calibration problems) on the 500 test
   problems, and the mean over random half splits of the test problems. Needs the test problems' event table
   (token positions); `--events DIR` reads one (`runs/organism/test`, the bundle's own test table, when
   `scripts/build_organism_bundle.py` ran here), otherwise it is collected once into runs/guarantee/test with the
   bundle's sampling recipe (about 3 minutes on one CPU thread).
3. The calibration plot over random splits (mean and 5-95% band, marginal and PAC, both per-event rules), written to
   `--out`.

    .venv/bin/python benchmarks/guarantee.py [--events runs/guarantee/test] [--splits 200] [--out outputs/guarantee]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lynx_hf import Lynx, organism  # noqa: E402
from lynx_hf.evaluation.cue_rules import Full  # noqa: E402
from lynx_hf.evaluation.replay import Replay  # noqa: E402
from lynx_hf.runtime.conformal import Calibration, LynxCalibrationWarning, exits, first_exit  # noqa: E402
from lynx_hf.pipeline.events import EventTable  # noqa: E402
from lynx_hf.evaluation.plots import calibration_plot  # noqa: E402
from lynx_hf.evaluation.splits import split_rates  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "organism_test_events.json"
PAIRS = ((0.05, 0.1), (0.1, 0.05), (0.1, 0.1), (0.2, 0.05))  # (delta, alpha)
STRENGTHS = (None, 0.1, 0.05)


def _reindex(question: torch.Tensor) -> torch.Tensor:
    return torch.unique_consecutive(question, return_inverse=True)[1]


def _rate(scores, safe, question, tau, guarantee) -> float:
    if guarantee == "event":
        return float(exits(scores[~safe], tau).double().mean())
    first = first_exit(scores, question, tau)
    return float(((first >= 0) & ~safe[first.clamp_min(0)]).double().mean())


def exceedance(scores, safe, question, draws: int, seed: int = 0) -> dict:
    """{(kind, unit, guarantee, delta, alpha): share of draws above delta}; alpha None = marginal."""
    n = int(question.max()) + 1
    starts = torch.searchsorted(question, torch.arange(n))
    sizes = torch.searchsorted(question, torch.arange(n), right=True) - starts
    generator = torch.Generator().manual_seed(seed)
    counts: dict = {}
    for _ in range(draws):
        # population draw: 250 questions i.i.d. with replacement, the rate on the whole pool
        pick = torch.randint(0, n, (n // 2,), generator=generator)
        idx = torch.cat([torch.arange(int(starts[i]), int(starts[i] + sizes[i])) for i in pick.tolist()])
        cal = Calibration(scores=scores[idx], safe=safe[idx], question=torch.repeat_interleave(torch.arange(len(pick)),
                                                                                           sizes[pick]))
        # half split: half the questions calibrate, the other half measure
        is_cal = torch.zeros(n, dtype=torch.bool)
        is_cal[torch.randperm(n, generator=generator)[: n // 2]] = True
        mask = is_cal[question]
        half = Calibration(scores=scores[mask], safe=safe[mask], question=_reindex(question[mask]))
        test = (scores[~mask], safe[~mask], _reindex(question[~mask]))
        for guarantee in ("event", "question"):
            for delta, alpha in PAIRS:
                for level in (alpha, None):
                    for kind, calibration, data in (("population", cal, (scores, safe, question)),
                                                    ("half split", half, test)):
                        tau = calibration.threshold(1 - delta, guarantee, risk_level=level)
                        key = (kind, guarantee, delta, level, alpha)
                        counts[key] = counts.get(key, 0) + (_rate(*data, tau, guarantee) > delta)
    return {key: value / draws for key, value in counts.items()}


def savings_rows(replay: Replay, calibration: Calibration, confidence: float = 0.9) -> dict:
    """{(guarantee, alpha): (savings, accuracy, premature per question)} with `calibration`'s thresholds."""
    table = replay.table
    full = Full().run(replay)
    full_think = float(full.thinking_tokens.double().mean())
    with_events = torch.unique_consecutive(table.trace)
    out = {}
    for guarantee in ("event", "question"):
        for alpha in STRENGTHS:
            tau = calibration.threshold(confidence, guarantee, risk_level=alpha)
            event = torch.full((replay.n_traces,), -1, dtype=torch.long)
            event[with_events] = first_exit(replay.scores.double(), table.trace, tau)
            o = replay.outcome("lynx", event)
            wrong_exit = o.exited & ~o.correct
            out[guarantee, alpha] = (1 - float(o.thinking_tokens.double().mean()) / full_think,
                                     float(o.correct.double().mean()), float(wrong_exit.double().mean()))
    return out


def sub_replay(replay: Replay, traces: torch.Tensor) -> Replay:
    """The replay restricted to some traces (events renumbered), for random splits of the test problems."""
    table = replay.table
    keep = torch.isin(table.trace, traces)
    new_id = torch.full((replay.n_traces,), -1, dtype=torch.long)
    new_id[traces] = torch.arange(len(traces))
    rows = keep.nonzero().flatten()
    sub = EventTable(
        settings=table.settings, features=table.features[rows], safe=table.safe[rows], trace=new_id[table.trace[rows]],
        position=table.position[rows], start=table.start[rows], cue=table.cue[rows],
        answer_length=table.answer_length[rows], answer_confidence=table.answer_confidence[rows],
        answers=[table.answers[i] for i in rows.tolist()], traces=[table.traces[i] for i in traces.tolist()],
    )
    return Replay(sub, replay.scores[rows], replay.exit_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", default="runs/guarantee/test")
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--out", default="outputs/guarantee")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", LynxCalibrationWarning)
    data = json.loads(FIXTURE.read_text())
    scores = torch.tensor(data["scores"], dtype=torch.float64)
    safe, question = torch.tensor(data["safe"]), torch.tensor(data["question"])

    print(f"## 1. Share of calibration draws whose premature-exit rate exceeds delta ({args.splits} draws)\n")
    shares = exceedance(scores, safe, question, args.splits)
    print("| draw | guarantee | delta | alpha | PAC share above delta | marginal share above delta |")
    print("|---|---|---|---|---|---|")
    for kind in ("population", "half split"):
        for guarantee in ("event", "question"):
            for delta, alpha in PAIRS:
                print(f"| {kind} | per {guarantee} | {delta} | {alpha} | {shares[kind, guarantee, delta, alpha, alpha]:.3f}"
                      f" | {shares[kind, guarantee, delta, None, alpha]:.3f} |")

    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
    folder = Path(args.events)
    if (folder / "settings.json").exists():
        table = EventTable.load(folder)
    else:
        from lynx_hf.evaluation.demo import bundle_recipe
        from lynx_hf.evaluation.evaluate import collector_for

        recipe = bundle_recipe(lynx)  # sampled as the bundle's own tables were
        model, tok = organism.load()
        collector = collector_for(model, tok, lynx, prompt_fn=organism.prompt, max_new_tokens=recipe["max_new_tokens"],
                                  temperature=recipe["temperature"])
        table = collector.collect(organism.problems("arithmetic", "test", n=500, seed=0), folder, batch_size=64, seed=0)
    replay = Replay.from_bundle(table, lynx)
    print(f"\n## 2. What PAC costs at c = 0.9: thinking-token savings vs full reasoning ({table.n_traces} test problems)\n")
    shipped = savings_rows(replay, lynx.calibration)
    generator = torch.Generator().manual_seed(1)
    split_values: dict = {}
    for _ in range(args.splits):
        order = torch.randperm(table.n_traces, generator=generator)
        cal_part, test_part = sub_replay(replay, order[: table.n_traces // 2]), sub_replay(replay, order[table.n_traces // 2:])
        calibration = Calibration(scores=cal_part.scores.double(), safe=cal_part.table.safe,
                                  question=cal_part.table.trace)
        for key, value in savings_rows(test_part, calibration).items():
            split_values.setdefault(key, []).append(value)
    print("| guarantee | strength | savings (shipped calibration) | accuracy | premature/question | "
          f"savings (mean of {args.splits} half splits) | premature/question (mean) |")
    print("|---|---|---|---|---|---|---|")
    for guarantee in ("event", "question"):
        for alpha in STRENGTHS:
            s, acc, prem = shipped[guarantee, alpha]
            v = np.asarray(split_values[guarantee, alpha])
            name = "marginal" if alpha is None else f"PAC alpha={alpha}"
            print(f"| per {guarantee} | {name} | {100 * s:.1f}% | {acc:.3f} | {prem:.3f} | {100 * v[:, 0].mean():.1f}% |"
                  f" {v[:, 2].mean():.3f} |")

    rows = split_rates(scores, safe, question, n_splits=args.splits)
    path = calibration_plot(rows, Path(args.out) / "calibration_splits.png", "Organism held-out events")
    print(f"\n## 3. Threshold vs c on the shipped calibration ({lynx.calibration.n_questions} questions)\n")
    grid = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975)
    print("| c | " + " | ".join(f"{c:g}" for c in grid) + " |")
    print("|---|" + "---|" * len(grid))
    for rule in ("envelope", "paper"):
        taus = [lynx.calibration.threshold(c, "event", rule=rule) for c in grid]
        print(f"| per event, rule={rule} | " + " | ".join("never" if t == float("inf") else f"{t:.4f}" for t in taus)
              + " |")
    print(f"\ncalibration plot over {args.splits} random splits: {path}")


if __name__ == "__main__":
    main()
