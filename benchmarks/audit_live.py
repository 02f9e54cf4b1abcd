"""The live audit on the organism, checked against its replay on the same traces.

Samples held-out problems in batches with `stopping_criteria=[lynx.stopper()]` and `audit_rate=1.0` (every row audited, so
no row exits and every full trace exists), prints `lynx.audit()` after every batch (the repeated looks), then
re-labels exactly those traces with `Collector` (gold labels, the rollout replaced by the live generations) and
prints the replayed audit (`lynx_hf.evaluation.audit_replay.replay_rows`) and the gold-labelled premature rate. Live and replay
rows must agree row for row; the script also prints the audit's cost (forwards and tokens per audited row).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/audit_live.py --family arithmetic --temperature 1.6 --n 100
"""

from __future__ import annotations

import argparse

import torch

from lynx_hf import Lynx, organism
from lynx_hf.evaluation.audit_replay import gold_rate, replay_rows
from lynx_hf.runtime.audit import audit_report
from lynx_hf.pipeline.collect import Collector
from lynx_hf.pipeline.rollout import cut_at_eos


class Given:
    """A rollout that returns generations sampled elsewhere (the live ones), in prompt order."""

    name = "given"

    def __init__(self, generations):
        self.generations = list(generations)

    def generate(self, prompts, **_):
        out, self.generations = self.generations[: len(prompts)], self.generations[len(prompts):]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="arithmetic", choices=organism.FAMILIES)
    parser.add_argument("--temperature", type=float, default=organism.TEMPERATURE)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--guarantee", default="question", choices=["question", "event"])
    parser.add_argument("--max-new-tokens", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=args.confidence,
                                guarantee=args.guarantee, audit_rate=1.0)
    problems = organism.problems(args.family, "test", n=args.n)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    generations = []
    torch.manual_seed(args.seed)
    for start in range(0, len(problems), args.batch):
        batch = problems[start:start + args.batch]
        enc = tok([organism.prompt(tok, p["question"]) for p in batch], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        out = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=True, temperature=args.temperature,
                             top_p=0.95, max_new_tokens=args.max_new_tokens)
        lynx.answer(out)  # settles the audit of this call
        generations += [cut_at_eos(row[enc.input_ids.shape[1]:].tolist(), eos) for row in out]
        print(f"live, after {start + len(batch)} rows\n{lynx.audit()}\n")

    c = lynx.config
    collector = Collector(model, tok, layers=c.layers, cues=c.cues, think_start=c.think_start, think_end=c.think_end,
                          exit_text=c.exit_text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          prompt_fn=organism.prompt, rollout=Given(generations))
    table = collector.collect_batch(problems, seed=args.seed)
    scores = lynx.probe.predict_proba(table.features).float()
    settings = dict(guarantee=lynx.guarantee, confidence=lynx.confidence, risk_level=lynx.risk_level, rule=lynx.rule)
    replayed = replay_rows(table, scores, lynx.threshold, settings)
    live = lynx.audit_log.rows
    keys = ("reference", "would_exit", "changed", "unsafe_cues", "unsafe_exits")
    same = sum(all(getattr(a, k) == getattr(b, k) for k in keys) for a, b in zip(live, replayed))
    print(f"replay on the same {len(replayed)} traces\n"
          f"{audit_report(replayed, max_unsafe=lynx.calibration.max_unsafe_per_question)}")
    print(f"live and replay rows identical: {same}/{len(live)}")
    count, total = gold_rate(table, scores, lynx.threshold, lynx.guarantee)
    print(f"gold-labelled premature rate: {count}/{total} = {count / max(total, 1):.3f} (delta = "
          f"{1 - lynx.confidence:.3f})")


if __name__ == "__main__":
    main()
