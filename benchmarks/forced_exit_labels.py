"""Forced-exit labelling, naive vs cached, on the same traces in one run: labels must be identical; prints the ratio.

naive:  one teacher-forced forward per trace for the features, then for every cue event re-prefill
        `trace[:cut] + exit_text` and greedy-decode the answer, one event at a time.
cached: the same forward also keeps its KV cache, and all of the trace's events are answered in one batch from it
        (`Collector.label_trace`, what `lynx-hf collect` runs).

    .venv/bin/python benchmarks/forced_exit_labels.py [--traces 24] [--min-events 8]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lynx_hf import organism
from lynx_hf.capture import HiddenStateCapture
from lynx_hf.collect import Collector
from lynx_hf.exit import answer_after_exit, exit_cut


def naive_answers(collector: Collector, token_ids: list[int], events) -> list[str | None]:
    with HiddenStateCapture(collector.model, collector.layers, last_only=False) as capture:
        collector.model(torch.tensor([token_ids]))
        capture.features()
    answers = []
    for event in events:
        cut = exit_cut(event.position, event.start, collector.exit_construction)
        prefix = torch.tensor([token_ids[:cut]])
        answers.append(answer_after_exit(collector.model, collector.tokenizer, prefix, [cut], collector.exit_ids,
                                         max_new_tokens=collector.answer_max_new_tokens)[0].answer)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=24)
    parser.add_argument("--min-events", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = organism.load()
    collector = Collector(model, tok, prompt_fn=organism.prompt, max_new_tokens=400)
    # sample until enough traces have >= min_events cue events
    traces, seed = [], 0
    while len(traces) < args.traces and seed < 50:
        for token_ids, prompt_length in collector.sample(organism.problems("arithmetic", "test", 64, seed=seed), seed):
            events = collector.detector.find_events(token_ids, prompt_length)
            if len(events) >= args.min_events and len(traces) < args.traces:
                traces.append((token_ids, prompt_length, events))
        seed += 1
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
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {args.threads} threads, organism, "
          f"{len(traces)} traces (mean {mean_len:.0f} tokens), {n_events} events (>= {args.min_events} per trace)")
    print(f"naive (features forward + re-prefill each prefix): {naive_time:.2f} s; cached + batched: {cached_time:.2f} s; "
          f"speed-up {naive_time / cached_time:.1f}x; identical answers {same}/{n_events}")
    if same != n_events:
        raise SystemExit("labels differ between the naive and the cached path")


if __name__ == "__main__":
    main()
