"""Self-supervised labels: sample full traces, force an exit at every cue, check the answer.

For each batch of problems: sample one trace per problem (R1 settings by default), find the cue events with the
same `CueDetector` the plug-ins use, run one teacher-forced forward over each trace that yields both the features
at the configured layers and a KV cache, then answer every event's forced exit from that cache in one batch: the
same construction (`exit_cut`, exit text) and greedy decoding as the plug-ins' `answer_after_exit`, with the events'
rows packed after the one shared cache (`runtime.forced.answer_from_shared_prefix`) where the model's attention allows it, tested
equal to re-prefilling each prefix. Each batch is written as a shard, so an interrupted run resumes where it stopped.

What "the answer is right" means is the collector's `labels`:

- ``"gold"`` (the default): a cue is safe when its forced answer matches the problem's gold ``answer``; every
  problem needs one.
- ``"agreement"``: a cue is safe when its forced answer matches the trace's own full answer (the answer after the
  model's full thinking, compared with `answers_match` in the same order as the live audit does), so problems need
  no gold answer: a file of prompts is enough. A trace whose full answer cannot be extracted has no reference; it is
  dropped (no events) and counted in the table's `dropped` list. Where a problem does have a gold answer it is still
  recorded in the trace (for reporting accuracy), never used for the labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._extras import require
from ..errors import LynxConfigError
from ..runtime.answers import answers_match, extract_boxed
from ..runtime.capture import default_layers, layer_modules
from ..runtime.conformal import DEFAULT_LABELS, check_labels
from ..runtime.config import layer_sample, model_fingerprint, short_digest, tokenizer_fingerprint, weights_sample
from ..runtime.cues import DEFAULT_CUES, CueDetector, CueEvent
from .data import R1_INSTRUCTION, build_prompt
from .events import EventTable, write_settings
from ..runtime.exit import eos_token_ids, pad_token_id
from ..runtime.forced import force_exits
from .rollout import Rollout, TransformersRollout
from ..runtime.thinking import resolve_thinking, thinking_exit_ids

logger = logging.getLogger(__name__)


def check_problems(problems: Sequence[dict], labels: str = DEFAULT_LABELS) -> None:
    """Raise a clear error for problems without an id or a question, or (gold labels) without a gold answer.

    Args:
        problems: dicts with `id`, `question` and, for ``labels="gold"``, `answer`.
        labels: ``"gold"`` or ``"agreement"`` (which needs no answers).

    Raises:
        ValueError: a problem lacks an id or a question, ids repeat, or gold labels meet a problem without an answer
            (the message names ``labels="agreement"``, the fix for unlabelled prompts).

    Example:
        >>> check_problems([{"id": "p0", "question": "What is 2 + 2?"}], labels="agreement")
        >>> check_problems([{"id": "p0", "question": "What is 2 + 2?"}])
        Traceback (most recent call last):
        ...
        lynx_hf.errors.LynxConfigError: 1 of 1 problems have no gold 'answer' (first: 'p0'): label by agreement instead (labels="agreement", `--labels agreement`: a cue is safe when its forced answer matches the trace's own full answer, no gold needed), or give every problem an 'answer'.
    """
    check_labels(labels)
    if not problems:
        raise ValueError("No problems given: pass a non-empty list of {'id', 'question', 'answer'} dicts.")
    for i, problem in enumerate(problems):
        missing = [k for k in ("id", "question") if problem.get(k) in (None, "")]
        if missing:
            raise ValueError(f"Problem {i} has no {missing}: every problem needs an 'id' and a 'question'.")
    ids = [p["id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("Problem ids are not unique: give each problem its own 'id'.")
    if labels == "gold":
        unlabelled = [p["id"] for p in problems if p.get("answer") in (None, "")]
        if unlabelled:
            raise LynxConfigError(
                f"{len(unlabelled)} of {len(problems)} problems have no gold 'answer' (first: {unlabelled[0]!r}): "
                'label by agreement instead (labels="agreement", `--labels agreement`: a cue is safe when its forced '
                "answer matches the trace's own full answer, no gold needed), or give every problem an 'answer'."
            )


class Collector:
    """Collects event tables for one model, tokenizer and setting (layers, cues, exit text, sampling).

    Example:
        >>> from lynx_hf import organism
        >>> from lynx_hf.pipeline.collect import Collector
        >>> model, tok = organism.load()
        >>> collector = Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=64)
        >>> table = collector.collect_batch(organism.problems("arithmetic", "train", 2), seed=0)
        >>> table.n_traces
        2
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        layers: Sequence[int] | None = None,
        cues: Sequence[str] = DEFAULT_CUES,
        think_start: str | None = None,
        think_end: str | None = None,
        exit_text: str | None = None,
        thinking: str | None = None,
        exit_construction: str = "drop_cue",
        max_new_tokens: int = 1024,
        temperature: float = 0.6,
        top_p: float = 0.95,
        answer_max_new_tokens: int = 16,
        prompt_fn: Callable[[object, str], str] | None = None,
        instruction: str = R1_INSTRUCTION,
        rollout: Rollout | None = None,
        labels: str = DEFAULT_LABELS,
    ):
        for name, value in (("max_new_tokens", max_new_tokens), ("answer_max_new_tokens", answer_max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive number of tokens.")
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature}, top_p={top_p}: give temperature >= 0 (0: greedy) and "
                             "top_p in (0, 1].")
        self.labels = check_labels(labels)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layers = tuple(layers) if layers is not None else default_layers(model)
        layer_modules(model, self.layers)  # an index out of range fails here, before a folder is written
        # Markers and exit text from the model's own tokenizer and chat template unless given (lynx_hf.runtime.thinking).
        fmt = resolve_thinking(tokenizer, think_start, think_end, exit_text, thinking)
        think_start, think_end, exit_text = fmt.think_start, fmt.think_end, fmt.exit_text
        self.thinking = fmt
        self.detector = CueDetector.for_tokenizer(tokenizer, cues=cues, think_start=think_start, think_end=think_end)
        missing = self.detector.missing_cues()
        if missing:
            raise ValueError(f"The tokenizer cannot spell the cue(s) {missing}: choose cues it can encode.")
        self.exit_ids = thinking_exit_ids(tokenizer, fmt)
        self.exit_construction = exit_construction
        self.think_end_ids = tokenizer(think_end, add_special_tokens=False)["input_ids"]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.answer_max_new_tokens = answer_max_new_tokens
        template_kwargs = dict(fmt.chat_template_kwargs)
        self.prompt_fn = prompt_fn or (lambda tok, q: build_prompt(tok, q, instruction, **template_kwargs))
        self.rollout = rollout if rollout is not None else \
            TransformersRollout(model, pad_token_id=pad_token_id(model, tokenizer))
        if hasattr(self.rollout, "check_tokenizer"):
            self.rollout.check_tokenizer(tokenizer)
        self.settings = {
            "base_model": getattr(model, "name_or_path", "") or type(model).__name__,
            "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "weights_sample": weights_sample(model),
            "layer_sample": layer_sample(model),
            "layers": list(self.layers),
            "hidden_size": int(model.config.get_text_config().hidden_size),
            "cues": list(self.detector.cues),
            "think_start": think_start,
            "think_end": think_end,
            "exit_text": exit_text,
            "thinking": fmt.name,
            "exit_construction": exit_construction,
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "answer_max_new_tokens": answer_max_new_tokens,
            "rollout": self.rollout.name,
            "labels": self.labels,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sample(self, problems: Sequence[dict], seed: int) -> list[tuple[list[int], int]]:
        """One sampled trace per problem: (prompt + generated ids, prompt length), sampled by the rollout."""
        prompts = [self.tokenizer(self.prompt_fn(self.tokenizer, p["question"]), add_special_tokens=False)["input_ids"]
                   for p in problems]
        generated = self.rollout.generate(
            prompts, seed=seed, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, eos_token_ids=eos_token_ids(self.model, self.tokenizer),
        )
        return [(prompt + ids, len(prompt)) for prompt, ids in zip(prompts, generated)]

    @torch.no_grad()
    def label_trace(self, token_ids: list[int], prompt_length: int, events: list[CueEvent] | None = None):
        """Events of one finished trace, their features and forced-exit answers (`force_exits`).

        `events` may be passed when already found (`find_events_batch` over a whole batch is faster).
        """
        if events is None:
            events = self.detector.find_events(token_ids, prompt_length)
        features, answers = force_exits(self.model, self.tokenizer, self.layers, token_ids, events, self.exit_ids,
                                        exit_construction=self.exit_construction,
                                        answer_max_new_tokens=self.answer_max_new_tokens)
        return events, features, answers

    def think_length(self, generated: list[int]) -> int:
        """Generated tokens before the end-of-thinking marker (all of them if it never came)."""
        return think_length(generated, self.think_end_ids)

    def collect_batch(self, problems: Sequence[dict], seed: int) -> EventTable:
        """Sample, find events, label them (by the collector's `labels`): the event table of one batch of problems.

        With agreement labels, traces without an extractable full answer are left out and their ids listed in the
        table's `dropped`."""
        check_problems(problems, self.labels)
        cue_index = {c: i for i, c in enumerate(self.detector.cues)}
        rows = {k: [] for k in ("features", "safe", "trace", "position", "start", "cue", "answer_length",
                                "answer_confidence")}
        answers, traces, dropped = [], [], []
        sampled = self.sample(problems, seed)
        found = self.detector.find_events_batch([ids for ids, _ in sampled], [n for _, n in sampled])
        for problem, (token_ids, prompt_length), trace_events in zip(problems, sampled, found):
            generated = token_ids[prompt_length:]
            full_answer = extract_boxed(self.tokenizer.decode(generated, skip_special_tokens=True))
            gold = problem.get("answer")
            gold = None if gold in (None, "") else str(gold)
            # The reference a forced answer is checked against: the gold answer, or (agreement) the trace's own full
            # answer, compared as the live audit compares them (`runtime.audit.observe_row`).
            reference = gold if self.labels == "gold" else full_answer
            if reference is None:
                dropped.append(str(problem["id"]))
                continue
            events, features, forced = self.label_trace(token_ids, prompt_length, trace_events)
            t = len(traces)
            traces.append({
                "id": str(problem["id"]), "gold": gold, "answer": full_answer,
                "correct": answers_match(full_answer, gold) if gold is not None else None,
                "prompt_length": prompt_length, "think_length": self.think_length(generated),
                "length": len(generated), "token_ids": token_ids,
            })
            rows["features"].append(features)
            rows["safe"] += [answers_match(a.answer, reference) for a in forced]
            rows["answer_length"] += [len(a.token_ids) for a in forced]
            rows["answer_confidence"] += [a.confidence for a in forced]
            rows["trace"] += [t] * len(events)
            rows["position"] += [e.position for e in events]
            rows["start"] += [e.start for e in events]
            rows["cue"] += [cue_index[e.cue] for e in events]
            answers += [a.answer for a in forced]
        long = {k: torch.tensor(rows[k], dtype=torch.long) for k in ("trace", "position", "start", "cue",
                                                                     "answer_length")}
        feature_size = len(self.layers) * self.settings["hidden_size"]
        return EventTable(
            settings=self.settings,
            features=torch.cat(rows["features"]) if rows["features"] else torch.zeros(0, feature_size),
            safe=torch.tensor(rows["safe"], dtype=torch.bool),
            answer_confidence=torch.tensor(rows["answer_confidence"], dtype=torch.float32),
            answers=answers, traces=traces, dropped=dropped, **long,
        )

    def collect(self, problems: Sequence[dict], output_dir: str | os.PathLike, *, batch_size: int = 16,
                seed: int = 0, progress: bool = True, rank: int | None = None,
                world_size: int | None = None) -> EventTable | None:
        """Collect event tables for `problems` into `output_dir`, one shard per batch; resumes finished shards.

        Data-parallel: process `rank` of `world_size` collects shards `rank, rank + world_size, ...` into the same
        folder (under `accelerate launch` both default to accelerate's process index and count). Shards are seeded
        by their index, so any number of processes produces exactly the tables one process would. Every process
        returns None except the main one, which waits for the others and returns the merged table.
        """
        check_problems(problems, self.labels)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number of problems per shard.")
        rank, world_size = _process_position(rank, world_size)
        output_dir = Path(output_dir)
        batches = [problems[i:i + batch_size] for i in range(0, len(problems), batch_size)]
        settings = {**self.settings, "seed": seed, "batch_size": batch_size, "n_shards": len(batches),
                    "problem_ids": short_digest([p["id"] for p in problems])}
        if rank == 0:
            write_settings(output_dir, settings)
        _barrier(world_size)
        if rank != 0:
            write_settings(output_dir, settings)  # checks that this process agrees with the folder
        done = {int(p.stem.split("-")[1]) for p in output_dir.glob("shard-*.safetensors")}
        mine = [i for i in range(len(batches)) if i % world_size == rank]
        if done & set(mine):
            logger.info("Resuming %s: %d of %d shards already collected.", output_dir, len(done & set(mine)),
                        len(mine))
        tqdm = require("tqdm.auto", extra="build", purpose="the collection progress bar").tqdm
        # the bar counts problems whose trace is sampled and whose cues are labelled, not steps of the run
        desc = "traces sampled and labelled" + (f" (process {rank} of {world_size})" if world_size > 1 else "")
        bar = tqdm(total=sum(len(batches[i]) for i in mine), desc=desc, unit="trace", disable=not progress)
        for index in mine:
            if index not in done:
                # Seeded per shard, so a resumed or differently sharded run samples exactly the same traces.
                self.collect_batch(batches[index], seed=seed * 1_000_003 + index).save_shard(output_dir, index)
            bar.update(len(batches[index]))
        bar.close()
        _barrier(world_size)
        if rank != 0:
            return None
        table = EventTable.load(output_dir)
        cueless = sum(1 for t in range(table.n_traces) if not bool((table.trace == t).any()))
        if cueless:
            logger.warning("%d of %d traces had no cue event (they contribute no labels).", cueless, table.n_traces)
        if table.dropped:
            logger.warning("%d of %d traces had no extractable full answer and were dropped (agreement labels need "
                           "one as the reference).", len(table.dropped), table.n_traces + len(table.dropped))
        return table


def _process_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        from accelerate import PartialState

        state = PartialState()
        rank = state.process_index if rank is None else rank
        world_size = state.num_processes if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
    return rank, world_size


def _barrier(world_size: int) -> None:
    if world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def think_length(generated: list[int], think_end_ids: list[int]) -> int:
    """Tokens of `generated` before the first occurrence of `think_end_ids` (all of them if it never occurs)."""
    n = len(think_end_ids)
    for i in range(len(generated) - n + 1):
        if generated[i:i + n] == think_end_ids:
            return i
    return len(generated)
