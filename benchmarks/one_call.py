"""The one call (`stopping_criteria=[lynx]`) against the exact stop-then-answer path (`lynx.stopper()` + `lynx.answer`).

(a) Rows that come back with a finished answer (thinking closed, then a closed `\\boxed{...}`) from the line users
    copy, `model.generate(**inputs, stopping_criteria=[Lynx.from_pretrained(bundle)])`, and from
    `pipeline("text-generation")` with the same criterion, on held-out organism problems sampled at the organism's
    temperature: the one call beside `lynx.stopper()`, which is what `stopping_criteria=[lynx]` meant before
    (halt at the cue, answer only through a second call to `lynx.answer(out)`).
(b) How often the one call's answers agree with the exact path's, per family, on held-out problems: both runs
    use the same batch and the same sampling seed, so every row's trace is identical up to its exit (checked and
    printed); the exact path drops the cue and answers greedily from the labels' construction, the one call keeps
    the cue word and the token that ended it before the exit text.

    PYTHONPATH=. python benchmarks/one_call.py                 # (a) on 12 problems, (b) on 200 per family
    PYTHONPATH=. python benchmarks/one_call.py --n 12 --agreement-n 0
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import pipeline

from lynx_hf import Lynx, organism

SAMPLING = dict(do_sample=True, temperature=organism.TEMPERATURE, top_p=0.95)


def _finished(tok, ids) -> bool:
    text = tok.decode(ids, skip_special_tokens=True)
    return "</think>" in text and organism.extract_answer(text.split("</think>", 1)[1]) is not None


def _stopper(lynx):
    return lynx.stopper() if hasattr(lynx, "stopper") else lynx  # (before this change: the Lynx itself)


def finished_rows(model, tok, n: int, seed: int, max_new_tokens: int) -> None:
    prompts = [organism.prompt(tok, p["question"]) for p in organism.problems("arithmetic", "test", n=n)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc.input_ids.shape[1]
    rows = []
    for name, make in (("generate, stopping_criteria=[lynx.stopper()] (before)", _stopper),
                       ("generate, stopping_criteria=[lynx]", lambda lynx: lynx)):
        lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
        torch.manual_seed(seed)
        out = model.generate(**enc, stopping_criteria=[make(lynx)], max_new_tokens=max_new_tokens, **SAMPLING)
        done = sum(_finished(tok, out[i, width:]) for i in range(n))
        rows.append((name, done, n, sum(r.exited for r in lynx.last_exits)))
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    for name, make in (("pipeline, stopping_criteria=[lynx.stopper()] (before)", _stopper),
                       ("pipeline, stopping_criteria=[lynx]", lambda lynx: lynx)):
        lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
        torch.manual_seed(seed)
        texts = [r[0]["generated_text"] for r in pipe(prompts, stopping_criteria=[make(lynx)], return_full_text=False,
                                                      max_new_tokens=max_new_tokens, **SAMPLING)]
        done = sum("</think>" in t and organism.extract_answer(t.split("</think>", 1)[1]) is not None for t in texts)
        rows.append((name, done, n, None))
    print(f"(a) rows with a finished answer, {n} held-out arithmetic problems, T={organism.TEMPERATURE}, top_p 0.95, "
          f"seed {seed}, max_new_tokens {max_new_tokens}, default settings (confidence 0.9, per-question guarantee)")
    print(f"    {'path':58s} {'finished':>9s} {'exited':>7s}")
    for name, done, total, exited in rows:
        print(f"    {name:58s} {f'{done}/{total}':>9s} {exited if exited is not None else '-':>7}")


def agreement(model, tok, family: str, n: int, seed: int, batch: int, max_new_tokens: int) -> dict:
    problems = organism.problems(family, "test", n=n)
    totals = dict(rows=0, exited=0, same_exit=0, identical_prefix=0, agree=0, one_call_unfinished=0)
    for start in range(0, n, batch):
        prompts = [organism.prompt(tok, p["question"]) for p in problems[start:start + batch]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
        torch.manual_seed(seed + start)
        stop = model.generate(**enc, stopping_criteria=[lynx.stopper()], max_new_tokens=max_new_tokens, **SAMPLING)
        stop_records = lynx.last_exits
        exact = lynx.answer(stop)
        torch.manual_seed(seed + start)
        one = model.generate(**enc, stopping_criteria=[lynx], max_new_tokens=max_new_tokens, **SAMPLING)
        one_records = lynx.last_exits
        in_call = lynx.answer(one)
        for row, (s, o) in enumerate(zip(stop_records, one_records)):
            totals["rows"] += 1
            if not s.exited:
                continue
            totals["exited"] += 1
            if not (o.exited and (o.position, o.start) == (s.position, s.start)):
                continue
            totals["same_exit"] += 1
            end = s.position + 2  # the cue and the token that ended its word: where the two paths part
            totals["identical_prefix"] += bool(torch.equal(stop[row, :end], one[row, :end]))
            totals["one_call_unfinished"] += in_call[row].answer is None
            totals["agree"] += exact[row].answer == in_call[row].answer
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=12, help="problems for (a)")
    parser.add_argument("--agreement-n", type=int, default=200, help="problems per family for (b); 0 skips it")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=768)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = organism.load()
    began = time.time()
    finished_rows(model, tok, args.n, args.seed, args.max_new_tokens)
    if args.agreement_n:
        print(f"\n(b) one call vs exact path (lynx.stopper() + lynx.answer), {args.agreement_n} held-out problems per "
              f"family, same batch and seed per row, T={organism.TEMPERATURE}, top_p 0.95, default settings")
        print(f"    {'family':10s} {'exited':>7s} {'same exit':>9s} {'same trace':>10s} {'agree':>6s} "
              f"{'differ':>7s} {'unfinished':>10s}")
        for family in organism.FAMILIES:
            t = agreement(model, tok, family, args.agreement_n, args.seed, args.batch, args.max_new_tokens)
            differ = t["same_exit"] - t["agree"]
            share = 100 * differ / t["same_exit"] if t["same_exit"] else float("nan")
            print(f"    {family:10s} {t['exited']:>7d} {t['same_exit']:>9d} {t['identical_prefix']:>10d} "
                  f"{t['agree']:>6d} {f'{share:.1f}%':>7s} {t['one_call_unfinished']:>10d}")
        print("    (exited: rows the exact path exited; same exit: the one call exited at the same cue; same trace: "
              "tokens identical up to the exit;\n     agree: equal boxed answers; differ: share of same-exit rows "
              "whose answers differ; unfinished: one-call rows whose box never closed)")
    print(f"\n{time.time() - began:.0f} s, torch {torch.__version__}, CPU, 1 thread")


if __name__ == "__main__":
    main()
