"""Do the two answer paths agree? The KV cache `generate` returns (masked at each row's cut) vs re-prefilling
`sequence[:cut] + exit text`, on SmolLM2-135M-Instruct, in float32 and bfloat16, and why they can differ.

Both paths compute the same function of the prefix in real arithmetic. In floating point the cached path's keys and
values for the generated positions were written one decoding step at a time, while a re-prefill writes them all in
one forward; matrix products of different shapes round differently, and in bfloat16 (8 bits of mantissa) that can
flip a greedy choice between near-tied tokens. The script prints the answer agreement per dtype and the largest
difference between the two caches' keys.

    .venv/bin/python benchmarks/answer_paths.py [--n 100] [--batch 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from transformers import DynamicCache

from lynx_hf.runtime.exit import answer_after_exit, cache_kwargs, exit_token_ids
from overhead import QUESTIONS, smollm2

TOPICS = ["apples", "trains", "coins", "books", "eggs", "pens", "cars", "birds", "chairs", "cups"]


def prompts(tok, n: int) -> list[str]:
    out = []
    for i in range(n):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} Then add {i} {TOPICS[i % len(TOPICS)]}."
        out.append(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False) + "<think>\n")
    return out


def run(model, tok, texts, batch: int, new_tokens: int, exit_ids, seed: int) -> tuple[int, int, float]:
    """(agreeing answers, answers, largest |key difference| between the decoded and the prefilled cache)."""
    agree = total = 0
    key_gap = 0.0
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(texts), batch):
        enc = tok(texts[start:start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc.input_ids.shape[1]
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        rows = out.sequences.shape[0]
        cuts = width + torch.randint(4, new_tokens - 1, (rows,), generator=generator)
        mask = torch.cat([enc.attention_mask, torch.ones(rows, new_tokens, dtype=torch.long)], dim=-1)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        decoded_keys = cache.layers[-1].keys.clone()
        cached = answer_after_exit(model, tok, out.sequences, cuts, exit_ids, attention_mask=mask,
                                   past_key_values=cache, max_new_tokens=12)
        fresh = answer_after_exit(model, tok, out.sequences, cuts, exit_ids, attention_mask=mask, max_new_tokens=12)
        agree += sum(a.token_ids == b.token_ids for a, b in zip(cached, fresh))
        total += rows
        # The same positions written by one prefill forward, compared with the cache generate wrote step by step.
        prefill = DynamicCache(config=model.config)
        length = decoded_keys.shape[2]
        with torch.no_grad():
            model(input_ids=out.sequences[:, :length], attention_mask=mask[:, :length],
                  position_ids=(mask[:, :length].cumsum(-1) - 1).clamp(min=0), use_cache=True,
                  **cache_kwargs(model, prefill))
        valid = mask[:, None, :length, None].bool()
        gap = (prefill.layers[-1].keys.float() - decoded_keys.float()).abs().masked_fill(~valid, 0).max().item()
        key_gap = max(key_gap, gap)
    return agree, total, key_gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    tok.padding_side = "left"
    exit_ids = exit_token_ids(tok, "\n</think>\n\nFinal Answer: \\boxed{")
    texts = prompts(tok, args.n)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"torch {torch.__version__}, SmolLM2-135M, {args.n} prompts, greedy trace of {args.new_tokens} tokens, "
          "one random cut per row, 12-token answers")
    print("| dtype | answers equal (cached vs re-prefill) | max abs key difference, last layer (decoded vs prefilled cache) |")
    print("|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        agree, total, gap = run(model, tok, texts, args.batch, args.new_tokens, exit_ids, seed=0)
        print(f"| {str(dtype).replace('torch.', '')} | {agree}/{total} ({agree / total:.1%}) | {gap:.2e} |")


if __name__ == "__main__":
    main()
