"""Train the LYNX model organism: a ~1M-parameter Llama that reasons in R1-style traces and overthinks.

One file, nanoGPT style: the config is right below, every run is seeded, progress is printed. Each batch is
drawn fresh from the trace grammar in `lynx_hf/organism/tasks.py` (train split only), the model is a
`LlamaForCausalLM` trained from scratch with the loss on the assistant turn, and the result is saved with
`save_pretrained` (safetensors) together with its tokenizer and chat template into `lynx_hf/organism/model/`.

    .venv/bin/python scripts/train_organism.py                 # ~30 minutes on 2 (shared) CPU cores
    .venv/bin/python scripts/train_organism.py --minutes 2 --out /tmp/organism   # a quick trial

How the shipped weights were made (2026-11-25): one uninterrupted default run, `make organism`, on 2 idle CPU
cores: 1367 steps in 28 minutes (about 1.2 s per step), final greedy accuracy 0.97 / 0.92 (arithmetic / compare,
64 calibration problems each). A time budget is only as deterministic as the machine's speed: on a slower or busier
machine the same command does fewer steps and lands on other weights.

The learning-rate schedule follows the fraction of the time budget used, so a run always finishes on time; a
run stopped by `--steps` instead is deterministic given the seed (a time budget is only as deterministic as the
machine's speed).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import string
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lynx_hf.organism.tasks import (  # noqa: E402
    CUE_WORDS, EXIT_TEXT, PROMPT_SUFFIX, problems, render_trace, sample_problem, split_of, user_message,
)

# ----------------------------------------------------------------------------------------------- config
OUT_DIR = ROOT / "lynx_hf" / "organism" / "model"
SEED = 1234
MINUTES = 28.0  # wall-clock budget for the optimisation loop
MAX_STEPS = 10**9  # or stop after this many steps (deterministic)
BATCH_SIZE = 32
BUCKET = 16  # batches per length-sorted pool
MAX_LEN = 640  # longer examples are re-drawn (almost never happens)
FAMILY_MIX = {"arithmetic": 0.7, "compare": 0.3}
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 128, 4, 4, 384
LR, MIN_LR_FRAC, WARMUP_STEPS, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 0.05, 100, 0.01, 1.0
LOG_EVERY, EVAL_EVERY_MIN, EVAL_N = 25, 12.0, 32
THREADS = 2

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
CHAT_MARKERS = ("<|user|>", "<|assistant|>")
THINK = ("<think>", "</think>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------- tokenizer
def grammar_words(seed: int = 0, n: int = 3000) -> list[str]:
    """Every word the trace grammar and prompts use (collected from seeded samples), plus the cue words."""
    rng = random.Random(seed)
    words: set[str] = set(CUE_WORDS) | {"Final", "Answer", "boxed"}
    words |= set(re.findall(r"[A-Za-z]+", PROMPT_SUFFIX))
    for family in FAMILY_MIX:
        for _ in range(n):
            p = sample_problem(family, rng)
            words |= set(re.findall(r"[A-Za-z]+", p["question"] + render_trace(p, rng)))
    return sorted(w for w in words if len(w) > 1)


def build_tokenizer(words: list[str]):
    """A word-level tokenizer: grammar words (with and without a leading space) are single tokens, digits and
    every other printable ASCII character are single tokens, so any ASCII text round-trips exactly."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    symbols = [" + ", " - ", " * ", " = ", "\\boxed"]
    pieces = list(SPECIAL.values()) + chars + symbols + words + [" " + w for w in words]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}

    alternatives = [re.escape(s) for s in sorted(symbols, key=len, reverse=True)]
    alternatives.append(r" ?(?<![A-Za-z])(?:" + "|".join(sorted(words, key=len, reverse=True)) + r")(?![A-Za-z])")
    alternatives.append(r"[\s\S]")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(alternatives)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in
                            list(SPECIAL.values()) + list(CHAT_MARKERS)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"], additional_special_tokens=list(CHAT_MARKERS), clean_up_tokenization_spaces=False,
        padding_side="left", model_max_length=1024,
    )
    hf.chat_template = CHAT_TEMPLATE
    for text in [EXIT_TEXT, PROMPT_SUFFIX] + [f"\n{c}, ok\n {c} x {c}." for c in CUE_WORDS]:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text, (text, hf.convert_ids_to_tokens(ids))
    return hf


# ----------------------------------------------------------------------------------------------- data
def prompt_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message(question)}],
                                         tokenize=False, add_generation_prompt=True)


def draw_example(tokenizer, rng: random.Random) -> tuple[list[int], int]:
    """Token ids of prompt + trace + EOS, and where the assistant part (the loss) starts."""
    while True:
        family = rng.choices(list(FAMILY_MIX), list(FAMILY_MIX.values()))[0]
        p = sample_problem(family, rng)
        if split_of(p["question"]) != "train":
            continue
        prompt_ids = tokenizer.encode(prompt_text(tokenizer, p["question"]), add_special_tokens=False)
        trace = render_trace(p, rng)
        assert trace.startswith("<think>\n")
        completion = tokenizer.encode(trace[len("<think>\n"):], add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(completion) <= MAX_LEN:
            return prompt_ids + completion, len(prompt_ids)


def batches(tokenizer, rng: random.Random):
    """Endless training batches. Examples are drawn in pools of BUCKET batches and grouped by length, so that
    little compute is spent on padding."""
    while True:
        pool = sorted((draw_example(tokenizer, rng) for _ in range(BATCH_SIZE * BUCKET)), key=lambda e: len(e[0]))
        chunks = [pool[i: i + BATCH_SIZE] for i in range(0, len(pool), BATCH_SIZE)]
        rng.shuffle(chunks)
        for examples in chunks:
            yield collate(tokenizer, examples)


def collate(tokenizer, examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, start) in enumerate(examples):  # right padding for training
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start: len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def greedy_accuracy(model, tokenizer, family: str, n: int) -> tuple[float, float]:
    """Greedy full-trace accuracy on n calibration problems, and the share of well-formed traces."""
    model.eval()
    probs = problems(family, "calibration", n, seed=99)
    batch = tokenizer([prompt_text(tokenizer, p["question"]) for p in probs], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=450, do_sample=False)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = formed = 0
    for p, text in zip(probs, texts):
        m = re.search(r"</think>\n\nFinal Answer: \\boxed\{([^}]*)\}", text)
        formed += m is not None
        correct += m is not None and m.group(1).strip() == p["answer"]
    model.train()
    return correct / n, formed / n


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=MINUTES, help="wall-clock budget for training")
    ap.add_argument("--steps", type=int, default=MAX_STEPS, help="stop after this many steps")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where to save model + tokenizer")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue training a saved organism (same tokenizer) instead of starting from scratch")
    args = ap.parse_args()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(THREADS)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    if args.init_from is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = LlamaForCausalLM.from_pretrained(args.init_from)
        print(f"continuing from {args.init_from}")
    else:
        tokenizer = build_tokenizer(grammar_words())
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    print(f"tokenizer: {len(tokenizer)} tokens")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
                            lr=args.lr, betas=(0.9, 0.95))

    budget = args.minutes * 60
    t0 = time.time()
    next_eval = EVAL_EVERY_MIN * 60
    step, ema = 0, None
    model.train()
    data = batches(tokenizer, rng)
    while step < args.steps:
        elapsed = time.time() - t0
        frac = max(elapsed / budget, step / args.steps if args.steps < MAX_STEPS else 0.0)
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS) * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(data)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % LOG_EVERY == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  train loss {loss.item():.4f} (ema {ema:.4f})",
                  flush=True)
        if elapsed > next_eval:
            next_eval += EVAL_EVERY_MIN * 60
            accs = {"arithmetic": greedy_accuracy(model, tokenizer, "arithmetic", EVAL_N)}
            print("  greedy accuracy (calibration split): " +
                  ", ".join(f"{f} {a:.2f} (well-formed {w:.2f})" for f, (a, w) in accs.items()), flush=True)
    print(f"trained {step} steps in {(time.time() - t0) / 60:.1f} min, final train loss (ema) {ema:.4f}")

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_LEN, do_sample=True, temperature=0.6, top_p=0.95,
    )
    accs = {f: greedy_accuracy(model, tokenizer, f, 2 * EVAL_N) for f in FAMILY_MIX}
    print("final greedy accuracy (calibration split): " +
          ", ".join(f"{f} {a:.2f} (well-formed {w:.2f})" for f, (a, w) in accs.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved to {args.out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
