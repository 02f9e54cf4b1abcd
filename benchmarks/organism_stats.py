"""How much does the shipped model organism overthink? Sampled traces, cue events, forced exits, oracle savings.

For each task family, samples traces for held-out test problems at the organism's temperature
(`organism.TEMPERATURE`, 1.2; `--temperature`), top_p 0.95 (batched, left padded), then forces an exit at every
reflection cue inside the thinking block (the prefix is cut just before the cue word's first token, EXIT_TEXT is
appended, the answer is decoded greedily up to "}") and prints:

* full-trace accuracy and the share of well-formed traces;
* mean cue events per trace, and how often a forced exit at a cue is right;
* oracle thinking-token savings: exit at the first cue whose forced exit is right (total tokens saved / total
  thinking tokens);
* the share of traces whose first cue is unsafe (its forced exit is wrong);
* the share of traces that end wrong although an earlier forced exit was right (overthinking that hurts);
* what a text rule cannot see (grammar v3): the share of traces with a safe cue before the thinking states any
  answer ("answer is"; done but not said), and with an unsafe cue after it stated one (a misstated answer).

    .venv/bin/python benchmarks/organism_stats.py            # 500 problems per family, a few minutes on a CPU
    .venv/bin/python benchmarks/organism_stats.py --n 20     # a smoke run
    .venv/bin/python benchmarks/organism_stats.py --n 100 --model-dir /tmp/o1   # a freshly trained variant
    .venv/bin/python benchmarks/organism_stats.py --split calibration --model-dir /tmp/o1   # choose variants here
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lynx_hf import organism  # noqa: E402
from lynx_hf.organism.tasks import SPLITS  # noqa: E402

CUE_RE = re.compile(r"(?<![A-Za-z])(wait|hmm|alternatively)(?![A-Za-z])", re.IGNORECASE)


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def sample_traces(model, tok, prompts: list[list[int]], batch: int, max_new_tokens: int,
                  temperature: float) -> list[list[int]]:
    """Generated ids per prompt (up to and excluding EOS / padding)."""
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s: s + batch]
        enc = {k: v.to(model.device) for k, v in left_pad(chunk, tok.pad_token_id).items()}
        gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            out.append([t for t in row if t != tok.pad_token_id])
    return out


@torch.no_grad()
def forced_exit_answers(model, tok, prefixes: list[list[int]], batch: int) -> list[str | None]:
    """Greedy answers (text up to "}") after each prefix, which already ends with the exit text."""
    answers: list[str | None] = []
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))  # similar lengths share a batch
    by_index: dict[int, str | None] = {}
    for s in range(0, len(order), batch):
        idx = order[s: s + batch]
        enc = {k: v.to(model.device) for k, v in left_pad([prefixes[i] for i in idx], tok.pad_token_id).items()}
        gen = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for i, row in zip(idx, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            by_index[i] = row.split("}", 1)[0].strip() if "}" in row else None
    answers = [by_index[i] for i in range(len(prefixes))]
    return answers


def cue_token_starts(tok, ids: list[int]) -> list[int]:
    """Index of the first token of every whole-word cue in the decoded ``ids``."""
    pieces = [tok.decode([i]) for i in ids]
    ends, pos = [], 0
    for p in pieces:
        pos += len(p)
        ends.append(pos)
    text = "".join(pieces)
    starts = []
    for m in CUE_RE.finditer(text):
        starts.append(next(k for k, e in enumerate(ends) if e > m.start()))
    return starts


def family_stats(model, tok, family: str, split: str, n: int, seed: int, batch: int, max_new_tokens: int,
                 temperature: float) -> dict:
    probs = organism.problems(family, split, n, seed=seed)
    prompts = [tok(organism.prompt(tok, p["question"]), add_special_tokens=False)["input_ids"] for p in probs]
    t0 = time.time()
    gens = sample_traces(model, tok, prompts, batch, max_new_tokens, temperature)
    t_sample = time.time() - t0
    end_think = tok.convert_tokens_to_ids("</think>")
    exit_ids = tok(organism.EXIT_TEXT, add_special_tokens=False)["input_ids"]

    traces = []
    prefixes: list[list[int]] = []
    for p, prompt_ids, gen in zip(probs, prompts, gens):
        closed = end_think in gen
        think = gen[: gen.index(end_think)] if closed else gen
        # the thinking block ends with "\n" before "</think>": the tokens up to there are the thinking
        final = organism.extract_answer(tok.decode(gen[len(think):])) if closed else None
        starts = cue_token_starts(tok, think)
        stated = [("answer is" in tok.decode(think[:k])) for k in starts]
        first_prefix = len(prefixes)
        for k in starts:
            prefixes.append(prompt_ids + think[:k] + exit_ids)
        traces.append({"answer": p["answer"], "final": final, "formed": closed and final is not None,
                       "think_len": len(think), "cues": starts, "stated": stated, "first": first_prefix})
    t0 = time.time()
    exit_answers = forced_exit_answers(model, tok, prefixes, batch)
    t_exit = time.time() - t0

    correct = formed = n_cues = n_cue_right = saved = think_total = 0
    with_cue = first_unsafe = wrong_but_right_earlier = safe_unstated = unsafe_stated = 0
    for tr in traces:
        right = tr["final"] == tr["answer"]
        correct += right
        formed += tr["formed"]
        think_total += tr["think_len"]
        oks = [exit_answers[tr["first"] + j] == tr["answer"] for j in range(len(tr["cues"]))]
        n_cues += len(oks)
        n_cue_right += sum(oks)
        if oks:
            with_cue += 1
            first_unsafe += not oks[0]
        safe_unstated += any(ok and not st for ok, st in zip(oks, tr["stated"]))
        unsafe_stated += any(st and not ok for ok, st in zip(oks, tr["stated"]))
        if any(oks):
            saved += tr["think_len"] - tr["cues"][oks.index(True)]
            wrong_but_right_earlier += not right
    return {
        "family": family, "n": n, "accuracy": correct / n, "well_formed": formed / n,
        "cues_per_trace": n_cues / n, "cue_exit_right": n_cue_right / max(n_cues, 1),
        "mean_thinking_tokens": think_total / n, "oracle_savings": saved / max(think_total, 1),
        "traces_with_cue": with_cue / n, "first_cue_unsafe": first_unsafe / max(with_cue, 1),
        "first_cue_unsafe_of_all": first_unsafe / n, "wrong_but_right_earlier": wrong_but_right_earlier / n,
        "safe_before_stated": safe_unstated / n, "unsafe_after_stated": unsafe_stated / n,
        "sample_s": t_sample, "exit_s": t_exit, "forced_exits": len(prefixes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="problems per family")
    ap.add_argument("--split", default="test", choices=SPLITS,
                    help="problems to sample (choose among trained variants on 'calibration', report on 'test')")
    ap.add_argument("--families", nargs="+", default=list(organism.FAMILIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=organism.TEMPERATURE, help="sampling temperature of the traces")
    ap.add_argument("--max-new-tokens", type=int, default=768)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="an organism folder written by scripts/train_organism.py --out (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu", help="torch device for sampling and forced exits (e.g. cuda)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = organism.load(model_dir=args.model_dir)
    model.to(args.device)
    print(f"organism: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.model_dir or organism.MODEL_DIR}")
    print(f"sampling: T={args.temperature:g}, top_p=0.95, {args.n} held-out {args.split} problems per family, seed {args.seed}")
    for family in args.families:
        s = family_stats(model, tok, family, args.split, args.n, args.seed, args.batch, args.max_new_tokens,
                         args.temperature)
        print(f"\n== {family} (n={s['n']}; sampling {s['sample_s']:.0f} s, {s['forced_exits']} forced exits "
              f"{s['exit_s']:.0f} s)")
        print(f"  full-trace accuracy              {s['accuracy']:6.1%}   (well-formed traces {s['well_formed']:.1%})")
        print(f"  thinking tokens per trace        {s['mean_thinking_tokens']:6.1f}")
        print(f"  cue events per trace             {s['cues_per_trace']:6.2f}   (forced exit right at "
              f"{s['cue_exit_right']:.1%} of cues)")
        print(f"  oracle thinking-token savings    {s['oracle_savings']:6.1%}")
        print(f"  first cue unsafe                 {s['first_cue_unsafe']:6.1%}   of traces with a cue "
              f"({s['traces_with_cue']:.1%} have one; {s['first_cue_unsafe_of_all']:.1%} of all)")
        print(f"  wrong at end, right earlier      {s['wrong_but_right_earlier']:6.1%}")
        print(f"  safe cue before a stated answer  {s['safe_before_stated']:6.1%}   of traces (done but not said)")
        print(f"  unsafe cue after a stated answer {s['unsafe_after_stated']:6.1%}   of traces (a text rule exits wrong)")


if __name__ == "__main__":
    main()
