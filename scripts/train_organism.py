"""Train the LYNX model organism: a ~1M-parameter Llama that reasons in R1-style traces and overthinks.

One file, nanoGPT style: the config is right below, every run is seeded and step-based, progress is printed. Each
batch is drawn fresh from the trace grammar in `lynx_hf/organism/tasks.py` (train split only), the model is a
`LlamaForCausalLM` trained from scratch with the loss on the assistant turn, and the result is saved with
`save_pretrained` (safetensors) together with its tokenizer, chat template and a `training.json` (the arguments
and grammar knobs used) into `lynx_hf/organism/model/`.

    .venv/bin/python scripts/train_organism.py                     # the shipped recipe (make organism)
    .venv/bin/python scripts/train_organism.py --steps 50 --out /tmp/organism     # a quick trial
    PYTHONPATH=. python3 scripts/train_organism.py --device cuda --p-harmful 0.08 --out /tmp/o1   # a variant

The shipped weights (`lynx_hf/organism/model/`, grammar v3) come from this script's defaults on one NVIDIA H100:
`--device cuda --steps 2400 --seed 1234 --p-harmful 0.08 --p-misstate 0.35` (plus `--eval-n 32`, a shorter final
evaluation, and `--stop-after-min 2.9`, which never triggered), 2400 steps in 1.4 min (0.04 s/step); final
greedy accuracy on 32 calibration problems: arithmetic 0.88, compare 0.97. Its `training.json` ships next to the
weights. Plain `make organism` reproduces those settings (on a GPU if one is there; a run is deterministic given
seed and device, so CPU weights differ numerically). On 2 CPU cores it is slow: CPU runs of 10 and 32 steps
(`--device cpu --steps N --eval-n 0 --out /tmp/x`, 2 threads, 2026-11-26, cores shared with other jobs at load
~2.6-2.9, data pools included) measured 4.15 and 5.71 s/step, so the 2400 steps take about 2.8-3.8 h there (about
50 min at the ~1.2-1.3 s/step that v2 batches took on idle cores): issue 12's "make organism <= 30 min on 2 cores"
is missed. 1200 steps (the earlier default, ~27 min on idle cores) gave an organism with
90% sampled arithmetic accuracy but 37.6% oracle savings (the shipped one: 99% and 62.6%, n=100).

The run is a fixed number of steps (`--steps`) and the learning-rate schedule follows the steps, so a run is
deterministic given its seed and device (training data are drawn in pools whose random state depends only on the
seed and the pool's index, so `--workers` does not change them). Several variants can train at once as separate
processes (`--seed`, `--out` and the grammar knobs `--p-*`, which override `tasks.P_*` for that run).
"""

from __future__ import annotations

import argparse
import json
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

from lynx_hf.organism import TEMPERATURE, tasks  # noqa: E402
from lynx_hf.organism.tasks import (  # noqa: E402
    CUE_WORDS, EXIT_TEXT, GRAMMAR_KNOBS, PROMPT_SUFFIX, problems, render_trace, sample_problem, split_of, user_message,
)

# ----------------------------------------------------------------------------------------------- config
OUT_DIR = ROOT / "lynx_hf" / "organism" / "model"
SEED = 1234
STEPS = 2400  # the shipped run (H100: 1.4 min); 1.3-5.7 s per step on 2 CPU cores (idle-shared): 1-3.8 h
BATCH_SIZE = 32
BUCKET = 16  # batches per length-sorted pool
MAX_LEN = 768  # longer examples are re-drawn (almost never happens)
FAMILY_MIX = {"arithmetic": 0.7, "compare": 0.3}
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 128, 4, 4, 384
LR, MIN_LR_FRAC, WARMUP_STEPS, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 0.05, 100, 0.01, 1.0
LOG_EVERY, EVAL_N, EVAL_MAX_NEW_TOKENS = 25, 32, 640
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


def draw_pool(tokenizer, seed: int, index: int) -> list[tuple[list[int], int]]:
    """Pool ``index`` of BATCH_SIZE * BUCKET training examples (prompt + trace + EOS ids, and where the assistant
    part, the loss, starts), sorted by length. Its random state depends only on ``seed`` and ``index``."""
    rng = random.Random(f"{seed}/pool/{index}")
    head, tail = prompt_text(tokenizer, "\x00").split("\x00")  # the chat template around the user message
    pool: list[tuple[list[int], int]] = []
    while len(pool) < BATCH_SIZE * BUCKET:
        prompts, traces = [], []
        while len(prompts) < BATCH_SIZE * BUCKET - len(pool):
            family = rng.choices(list(FAMILY_MIX), list(FAMILY_MIX.values()))[0]
            p = sample_problem(family, rng)
            if split_of(p["question"]) != "train":
                continue
            trace = render_trace(p, rng)
            assert trace.startswith("<think>\n")
            prompts.append(head + user_message(p["question"]) + tail)
            traces.append(trace[len("<think>\n"):])
        enc_p = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        enc_t = tokenizer(traces, add_special_tokens=False)["input_ids"]
        for prompt_ids, completion in zip(enc_p, enc_t):
            ids = prompt_ids + completion + [tokenizer.eos_token_id]
            if len(ids) <= MAX_LEN:
                pool.append((ids, len(prompt_ids)))
    pool.sort(key=lambda e: len(e[0]))
    return pool


def pool_batches(tokenizer, pool: list[tuple[list[int], int]], seed: int, index: int):
    """The pool's examples grouped by length into BATCH_SIZE batches (little compute spent on padding), shuffled."""
    chunks = [pool[i: i + BATCH_SIZE] for i in range(0, len(pool), BATCH_SIZE)]
    random.Random(f"{seed}/order/{index}").shuffle(chunks)
    return [collate(tokenizer, examples) for examples in chunks]


_WORKER_TOKENIZER = None


def _worker_pool(job: tuple[int, int]) -> list[tuple[list[int], int]]:
    return draw_pool(_WORKER_TOKENIZER, *job)


def batches(tokenizer, seed: int, n_steps: int, workers: int):
    """Exactly the training batches of a run (deterministic given ``seed``), drawn in ``workers`` background
    processes (0: in this process) so that data generation keeps up with a GPU step."""
    global _WORKER_TOKENIZER
    n_pools = -(-n_steps // BUCKET)
    jobs = [(seed, j) for j in range(n_pools)]
    executor = None
    if workers <= 0:
        pools = (draw_pool(tokenizer, *job) for job in jobs)
    else:
        import multiprocessing as mp

        _WORKER_TOKENIZER = tokenizer  # inherited by the forked workers (the grammar knobs are too)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; no fork warning
        executor = mp.get_context("fork").Pool(workers)
        pools = executor.imap(_worker_pool, jobs)  # results come back in order
    try:
        for (_, j), pool in zip(jobs, pools):
            yield from pool_batches(tokenizer, pool, seed, j)
    finally:
        if executor is not None:
            executor.terminate()


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
    device = next(model.parameters()).device
    probs = problems(family, "calibration", n, seed=99)
    batch = tokenizer([prompt_text(tokenizer, p["question"]) for p in probs], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(device)
    out = model.generate(**batch, max_new_tokens=EVAL_MAX_NEW_TOKENS, do_sample=False)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = formed = 0
    for p, text in zip(probs, texts):
        m = re.search(r"</think>\n\nFinal Answer: \\boxed\{([^}]*)\}", text)
        formed += m is not None
        correct += m is not None and m.group(1).strip() == p["answer"]
    model.train()
    return correct / n, formed / n


# ----------------------------------------------------------------------------------------------- main
def knob_flag(name: str) -> str:
    return "--" + name.lower().replace("_", "-")


def parse_knob(text: str) -> float | tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    return values if "," in text else values[0]


def main() -> None:
    global BATCH_SIZE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="optimisation steps (the LR schedule follows them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where to save model + tokenizer")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training sequences per step")
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast for the forward pass (weights and optimizer stay float32)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the training forward (dynamic shapes; about 45 s of compiling first)")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=None,
                    help="background processes drawing training data (default: 0 on cpu, 2 otherwise)")
    ap.add_argument("--eval-every", type=int, default=0, help="greedy arithmetic accuracy every N steps (0: never)")
    ap.add_argument("--stop-after-min", type=float, default=None,
                    help="safety net: stop (and save) after this many minutes of training even if steps remain; "
                         "the schedule still follows --steps, so such a run is cut short and recorded as such")
    ap.add_argument("--eval-n", type=int, default=2 * EVAL_N,
                    help="calibration problems per family for the final greedy accuracy (0: skip)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue training a saved organism (same tokenizer) instead of starting from scratch")
    for name in GRAMMAR_KNOBS:
        ap.add_argument(knob_flag(name), type=parse_knob, default=None, metavar="P[,P...]",
                        help=f"override tasks.{name} (default {getattr(tasks, name)})")
    args = ap.parse_args()
    BATCH_SIZE = args.batch_size  # read by draw_pool / pool_batches (and by the forked data workers)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    knobs = {}
    for name in GRAMMAR_KNOBS:
        value = getattr(args, name.lower())
        if value is not None:
            default = getattr(tasks, name)
            if isinstance(default, tuple) != isinstance(value, tuple):
                shape = "a comma-separated list" if isinstance(default, tuple) else "one number"
                ap.error(f"{knob_flag(name)} takes {shape} like the default {default}")
            setattr(tasks, name, value)
        knobs[name] = getattr(tasks, name)
    print("grammar: " + ", ".join(f"{k}={v}" for k, v in knobs.items()))

    device = torch.device(args.device)
    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 2)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

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
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, "
          f"{args.steps} steps, seed {args.seed}, {workers} data workers")
    data = batches(tokenizer, args.seed, args.steps, workers)  # workers fork before the model touches the device
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
                            lr=args.lr, betas=(0.9, 0.95))

    forward = torch.compile(model, dynamic=True) if args.compile else model

    t0 = time.time()
    ema, done = None, 0
    model.train()
    for step in range(args.steps):
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS) * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        done = step + 1
        if done % LOG_EVERY == 0 or done == args.steps:
            value = loss.item()
            ema = value if ema is None else 0.8 * ema + 0.2 * value
            elapsed = time.time() - t0
            print(f"step {done:5d}  {elapsed / 60:5.1f} min ({elapsed / done:.2f} s/step)  lr {lr:.2e}  "
                  f"train loss {value:.4f} (ema {ema:.4f})", flush=True)
        if args.stop_after_min is not None and time.time() - t0 > 60 * args.stop_after_min and done < args.steps:
            print(f"stopping early after {done} of {args.steps} steps (--stop-after-min {args.stop_after_min})")
            break
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            acc, formed = greedy_accuracy(model, tokenizer, "arithmetic", EVAL_N)
            print(f"  greedy accuracy (calibration split): arithmetic {acc:.2f} (well-formed {formed:.2f})", flush=True)
    data.close()
    elapsed = time.time() - t0
    print(f"trained {done} steps in {elapsed / 60:.1f} min ({elapsed / max(done, 1):.2f} s/step), "
          f"final train loss (ema) {ema}")

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_LEN, do_sample=True, temperature=TEMPERATURE, top_p=0.95,
    )
    accs = {f: greedy_accuracy(model, tokenizer, f, args.eval_n) for f in FAMILY_MIX} if args.eval_n > 0 else {}
    print("final greedy accuracy (calibration split): " +
          ", ".join(f"{f} {a:.2f} (well-formed {w:.2f})" for f, (a, w) in accs.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    record = {"steps": args.steps, "steps_done": done, "seed": args.seed, "lr": args.lr,
              "batch_size": BATCH_SIZE, "bf16": args.bf16, "compile": args.compile, "device": str(device),
              "init_from": str(args.init_from) if args.init_from else None, "grammar": knobs,
              "train_minutes": round(elapsed / 60, 2),
              "greedy_accuracy_calibration": {f: a for f, (a, _) in accs.items()}}
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved to {args.out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
