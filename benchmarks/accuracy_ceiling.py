"""What accuracy can any probe reach under the per-event guarantee? Lynx against two reference probes, held out.

The per-event guarantee (class-conditional conformal) sets tau so that about delta of the *unsafe* cues score above
it, whatever the probe: a better probe lets more safe cues exit, not fewer unsafe ones. So at c = 0.9 some unsafe
cues exit, and accuracy depends on *which* ones. An unsafe exit costs an answer only in a "harmful position": before
the trace's first safe cue, in a trace that ends right. Elsewhere it is harmless (a safe cue already exited
earlier, or the trace ends wrong anyway).

With k = the number of unsafe cues Lynx's threshold lets exit on these events, the script prints the first-exit
accuracy of:

* Lynx (the bundle's probe and threshold);
* a perfect-ranking probe that ranks unsafe cues at random: every safe cue exits, k unsafe cues chosen uniformly
  (mean over draws), i.e. perfect safe-vs-unsafe separation with no idea which unsafe cues are harmless;
* the ideal probe: every safe cue exits, the k unsafe exits go to harmless cues first, then to as few traces as
  possible: the best any probe can do with k unsafe exits;

next to full-trace accuracy and the issue-12 target (full - 0.01), plus where Lynx's own unsafe exits fell.

    .venv/bin/python benchmarks/accuracy_ceiling.py outputs/demo/arithmetic/events outputs/demo/compare/events
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lynx_hf import Lynx, organism  # noqa: E402
from lynx_hf.evaluation.replay import Replay  # noqa: E402
from lynx_hf.pipeline.events import EventTable  # noqa: E402


def ceiling(replay: Replay, tau: float, draws: int = 400) -> dict:
    """First-exit accuracies of Lynx at `tau`, the random-among-unsafe and the ideal probe (see the module doc)."""
    table, n = replay.table, replay.n_traces
    safe, trace = table.safe, table.trace
    exits = replay.scores >= tau
    first_safe = replay.first_event(safe)[trace]
    index = torch.arange(len(table))
    harmful = ~safe & ((first_safe < 0) | (index < first_safe)) & replay.correct[trace]
    harmless = ~safe & ~harmful
    k = int((exits & ~safe).sum())

    generator = torch.Generator().manual_seed(0)
    unsafe = (~safe).nonzero().squeeze(1)
    random_acc = 0.0
    for _ in range(draws):
        chosen = torch.zeros(len(table), dtype=torch.bool)
        chosen[unsafe[torch.randperm(len(unsafe), generator=generator)[:k]]] = True
        random_acc += replay.outcome("random", replay.first_event(safe | chosen)).correct.double().mean().item() / draws

    # ideal: harmless first; the rest on the traces holding the most harmful-position cues (fewest traces lost)
    left = k - int(harmless.sum())
    per_trace = torch.zeros(n, dtype=torch.long).index_add_(0, trace[harmful], torch.ones(int(harmful.sum()),
                                                                                          dtype=torch.long))
    lost = 0
    for count in sorted(per_trace.tolist(), reverse=True):
        if left <= 0:
            break
        lost, left = lost + 1, left - count
    ideal = replay.outcome("ideal", replay.first_event(safe)).correct.sum().item() - lost

    return {"n": n, "cues": len(table), "unsafe": int((~safe).sum()), "k": k,
            "harmful_cues": int(harmful.sum()), "harmless_cues": int(harmless.sum()),
            "lynx_harmful": int((exits & harmful).sum()), "lynx_harmless": int((exits & harmless).sum()),
            "full": replay.correct.double().mean().item(),
            "lynx": replay.outcome("lynx", replay.first_event(exits)).correct.double().mean().item(),
            "random": random_acc, "ideal": ideal / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("events", nargs="+", type=Path, help="event-table folders (e.g. a demo's <family>/events)")
    ap.add_argument("--bundle", default=str(organism.BUNDLE_DIR))
    ap.add_argument("--confidence", type=float, default=0.9)
    args = ap.parse_args()
    lynx = Lynx.from_pretrained(args.bundle)
    tau = lynx.calibration.threshold(args.confidence, "event")
    print(f"per-event guarantee at c = {args.confidence:g}: tau = {tau:.3f}")
    print("| events | traces / cues / unsafe | unsafe cues exiting (k) | harmful-position cues per trace | full | "
          "target | Lynx | perfect ranking, unsafe at random | ideal probe | Lynx's unsafe exits: harmful / harmless |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.events:
        replay = Replay.from_bundle(EventTable.load(folder), lynx)
        r = ceiling(replay, tau)
        print(f"| {folder} | {r['n']} / {r['cues']} / {r['unsafe']} | {r['k']} ({r['k'] / r['unsafe']:.1%}) | "
              f"{r['harmful_cues'] / r['n']:.2f} | {r['full']:.3f} | {r['full'] - 0.01:.3f} | {r['lynx']:.3f} | "
              f"{r['random']:.3f} | {r['ideal']:.3f} | {r['lynx_harmful']} / {r['lynx_harmless']} |")


if __name__ == "__main__":
    main()
