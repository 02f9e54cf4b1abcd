"""Build the shipped LYNX bundle for the model organism: collect -> train -> calibrate -> save.

Runs the same steps as the CLI (`lynx-hf collect/train/calibrate`) on the organism's arithmetic family, with
disjoint train / calibration / test problems, writes the bundle into `lynx_hf/organism/bundle/` (with the text side
of its training and calibration tables, `text_events.safetensors`, for the demo's TextProbe control), and the test
split's probe scores and labels into `tests/fixtures/organism_test_events.json` (for the statistical test of the
guarantee). Prints the probe's AUROC and the realised premature-exit rates.

    .venv/bin/python scripts/build_organism_bundle.py [--train 700 --calibration 500 --test 500] [--runs runs/organism]
    .venv/bin/python scripts/build_organism_bundle.py --card-only   # after a change to how thresholds are computed

`--card-only` keeps the probe, calibration and test events, and recomputes the held-out rates in the bundle's
metadata and its model card from `tests/fixtures/organism_test_events.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lynx_hf import organism
from lynx_hf.pipeline.collect import Collector
from lynx_hf.evaluation.demo import MAX_NEW_TOKENS, TEXT_EVENTS, write_text_events
from lynx_hf import Lynx
from lynx_hf.pipeline.train import describe, fit, rates_on_scores, score

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "organism_test_events.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=700)
    parser.add_argument("--calibration", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--runs", default="runs/organism", help="where the event tables go (resumable)")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=organism.TEMPERATURE,
                        help="sampling temperature of every table (the demo samples its test events alike)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1 is fastest here)")
    parser.add_argument("--card-only", action="store_true",
                        help="recompute the held-out rates and the card of the shipped bundle from the test fixture")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.card_only:
        refresh_card()
        return
    model, tok = organism.load()
    collector = Collector(model, tok, layers=args.layers, prompt_fn=organism.prompt, max_new_tokens=MAX_NEW_TOKENS,
                          temperature=args.temperature)
    tables = {}
    for split, n in (("train", args.train), ("calibration", args.calibration), ("test", args.test)):
        start = time.perf_counter()
        problems = organism.problems("arithmetic", split, n=n, seed=args.seed)
        tables[split] = collector.collect(problems, Path(args.runs) / split, batch_size=64, seed=args.seed)
        print(f"{split}: {describe(tables[split])} in {time.perf_counter() - start:.0f} s")
    lynx = fit(tables["train"], tables["calibration"], tables["test"], seed=args.seed, tokenizer=tok,
               datasets=["lynx_hf.organism arithmetic (synthetic)"])
    lynx.config.base_model = "lynx_hf/organism"
    # the recipe of the training and calibration tables, so `make demo` can re-collect them for the TextProbe control
    # (their temperature and top_p are in metadata["sampling"], recorded by `fit`)
    lynx.metadata["tables"] = {"family": "arithmetic", "seed": args.seed, "batch_size": 64, "max_new_tokens": MAX_NEW_TOKENS,
                               "splits": {"train": args.train, "calibration": args.calibration}}
    out = ROOT / "lynx_hf" / "organism" / "bundle"
    shutil.rmtree(out, ignore_errors=True)
    lynx.save_pretrained(out)
    # the text side of the training and calibration tables: `make demo` trains the TextProbe control on it
    write_text_events(out / TEXT_EVENTS, tables["train"], tables["calibration"])
    test = tables["test"]
    fixture = {
        "description": "probe scores of the shipped organism bundle on held-out arithmetic test problems",
        "scores": score(lynx.probe, test).tolist(), "safe": test.safe.tolist(), "question": test.trace.tolist(),
    }
    path = FIXTURE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fixture) + "\n", encoding="utf-8")
    meta = lynx.metadata
    print(f"layers {lynx.config.layers}; validation AUROC {meta['probe_validation_auroc']:.3f}, "
          f"calibration AUROC {meta['calibration_auroc']:.3f}, test AUROC {meta['test_auroc']:.3f}")
    print_rates(meta)
    print(f"bundle written to {out}; test scores to {path}")


def refresh_card() -> None:
    """Held-out rates and card of the shipped bundle, recomputed with the current thresholds (probe unchanged)."""
    out = ROOT / "lynx_hf" / "organism" / "bundle"
    lynx = Lynx.from_pretrained(out)
    events = json.loads(FIXTURE.read_text(encoding="utf-8"))
    lynx.metadata["test_realised_rates"] = rates_on_scores(
        torch.tensor(events["scores"], dtype=torch.float64), torch.tensor(events["safe"]),
        torch.tensor(events["question"]), lynx.metadata["test_questions"], lynx.calibration)
    with tempfile.TemporaryDirectory() as tmp:  # rewrite only what changes (the weights file stays byte-identical)
        lynx.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "calibration.json", out / "calibration.json")
    lynx.generate_model_card().save(out / "README.md")
    print_rates(lynx.metadata)
    print(f"metadata and card of {out} refreshed")


def print_rates(meta: dict) -> None:
    for row in meta["test_realised_rates"]:
        print(f"c={row['confidence']}, risk_level={row['risk_level']}: per event: unsafe cues that exit {row['event']['unsafe_event_exit_rate']:.3f}"
              f" (target <= {1 - row['confidence']:.2f}); per question: premature first exits "
              f"{row['question']['question_premature_rate']:.3f}, questions exited "
              f"{row['question']['question_exit_rate']:.3f}")


if __name__ == "__main__":
    main()
