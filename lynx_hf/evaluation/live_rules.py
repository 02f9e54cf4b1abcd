"""Exit methods that run the model: budget forcing (`BudgetForcing`, `matched_budget`, and `LynxBudget`, LYNX with
a thinking budget; `answers_at_budget` decodes their forced answers) and NoWait (`CueSuppressor`, `NoWait`), with the
collection's batches regenerated token for token (`shard_batches`, `regenerate`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import torch
from transformers import LogitsProcessor

from ..runtime.answers import answers_match, extract_boxed
from ..pipeline.events import EventTable
from ..pipeline.collect import think_length
from ..runtime.exit import answer_after_exit, eos_token_ids, pad_token_id
from ..pipeline.rollout import TransformersRollout, left_pad
from .cue_rules import LynxExit
from .replay import Method, Outcome, Replay

__all__ = ["BudgetForcing", "CueSuppressor", "NoWait", "matched_budget", "regenerate", "shard_batches"]


def shard_batches(table: EventTable, limit: int | None = None) -> Iterator[tuple[list[int], int]]:
    """The collection's batches: (trace indices, sampling seed) per shard, whole shards covering `limit` traces.

    `Collector.collect` samples shard i (traces `i*batch_size ...`) with seed `seed * 1_000_003 + i`; regenerating
    the same batch with the same seed reproduces the traces, because sampling draws the same random numbers.

    Example:
        >>> table = EventTable.empty({"seed": 1, "batch_size": 2}, 1)
        >>> table.traces = [{}] * 3
        >>> list(shard_batches(table))
        [([0, 1], 1000003), ([2], 1000004)]
    """
    settings = table.settings
    if "batch_size" not in settings or "seed" not in settings:
        raise ValueError("This event table does not record its batch size and seed: live runs need a table written "
                         "by `Collector.collect` / `lynx-hf collect`.")
    size, seed = int(settings["batch_size"]), int(settings["seed"])
    n = table.n_traces if limit is None else min(limit, table.n_traces)
    for index, begin in enumerate(range(0, n, size)):
        yield list(range(begin, min(begin + size, table.n_traces))), seed * 1_000_003 + index


@torch.no_grad()
def regenerate(model, tokenizer, table: EventTable, indices: Sequence[int], seed: int, **generate_kwargs):
    """Re-run the collection's `generate` call for the traces `indices` (one batch) with extra plug-ins.

    Prompts are the traces' own prompt tokens, left-padded as `Collector.sample` pads them, and the sampling
    settings come from `table.settings`. Returns `(sequences, prompt_width)`.

    Example:
        >>> out, width = regenerate(model, tok, table, [0, 1], seed=0, stopping_criteria=[lynx.stopper()])  # doctest: +SKIP
    """
    settings = table.settings
    if settings.get("rollout", "transformers") != "transformers":
        raise ValueError(f"These traces were sampled by {settings['rollout']}, which transformers cannot replay token "
                         "for token: run live methods on a table collected with the default transformers rollout.")
    prompts = [table.traces[i]["token_ids"][: table.traces[i]["prompt_length"]] for i in indices]
    return TransformersRollout(model, pad_token_id=pad_token_id(model, tokenizer)).sequences(
        prompts, seed=seed, temperature=float(settings.get("temperature", 0.6)),
        top_p=float(settings.get("top_p", 0.95)), max_new_tokens=int(settings.get("max_new_tokens", 1024)),
        **generate_kwargs,
    )


def matched_budget(think_lengths: torch.Tensor, target_mean: float) -> int:
    """Smallest budget B whose capped thinking, mean(min(think_length, B)), reaches `target_mean`.

    Matches budget forcing to another method's mean thinking tokens (equal compute), not its per-trace budget.

    Example:
        >>> matched_budget(torch.tensor([10, 100]), 30.0)  # (10 + 50) / 2 = 30
        50
    """
    lengths = think_lengths.long()
    lo, hi = 0, int(lengths.max()) if lengths.numel() else 0
    while lo < hi:
        mid = (lo + hi) // 2
        if float(lengths.clamp_max(mid).double().mean()) >= target_mean:
            hi = mid
        else:
            lo = mid + 1
    return lo


class BudgetForcing(Method):
    """Budget forcing (s1): cut thinking after `budget` tokens, append the exit text, let the model answer.

    Traces that finished thinking within the budget are left as they are. Runs the model (batched, greedy answers
    with the same `answer_after_exit` the plug-ins use); the answer is checked with `answers_match`.

    Example:
        >>> BudgetForcing(64, model, tok, lynx.exit_ids).run(replay).thinking_tokens.max() <= 64  # doctest: +SKIP
        tensor(True)
    """

    def __init__(self, budget: int, model, tokenizer, exit_ids: Sequence[int], batch_size: int = 64,
                 answer_max_new_tokens: int | None = None):
        self.budget = int(budget)
        self.model, self.tokenizer, self.exit_ids = model, tokenizer, list(exit_ids)
        self.batch_size = batch_size
        self.answer_max_new_tokens = answer_max_new_tokens
        self.name = f"Budget B={self.budget}"

    def run(self, replay: Replay) -> Outcome:
        started = time.perf_counter()
        n = replay.n_traces
        exited = replay.think_length > self.budget
        thinking = torch.where(exited, torch.full_like(replay.think_length, self.budget), replay.think_length)
        total, correct = replay.length.clone(), replay.correct.clone()
        answers = [t.get("answer") for t in replay.table.traces]
        rows = exited.nonzero().flatten().tolist()
        for i, a in zip(rows, answers_at_budget(replay, rows, self.budget, self.model, self.tokenizer, self.exit_ids,
                                                self.batch_size, self.answer_max_new_tokens)):
            total[i] = self.budget + len(self.exit_ids) + len(a.token_ids)
            correct[i] = answers_match(a.answer, replay.gold[i])
            answers[i] = a.answer
        return Outcome(self.name, exited, torch.full((n,), -1, dtype=torch.long), correct, thinking, total,
                       torch.zeros(n, dtype=torch.long), info={"family": "Budget forcing", "knob": self.budget},
                       answers=answers, wall_time=time.perf_counter() - started)


def answers_at_budget(replay: Replay, rows: Sequence[int], budget: int, model, tokenizer, exit_ids: Sequence[int],
                      batch_size: int = 64, answer_max_new_tokens: int | None = None) -> list:
    """The forced-exit answers (`LynxAnswer`) of traces `rows` cut after `budget` thinking tokens: the prompt and the
    first `budget` generated tokens, the exit text, then the greedy answer (`answer_after_exit`, batched).

    Example:
        >>> [a.answer for a in answers_at_budget(replay, [0, 3], 64, model, tok, lynx.exit_ids)]  # doctest: +SKIP
        ['12', '7']
    """
    device = next(model.parameters()).device
    pad = pad_token_id(model, tokenizer)
    max_new = answer_max_new_tokens or int(replay.table.settings.get("answer_max_new_tokens", 16))
    answers = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin:begin + batch_size]
        prefixes = [replay.table.traces[i]["token_ids"][: int(replay.prompt_length[i]) + budget] for i in chunk]
        ids, mask = left_pad(prefixes, pad, device)
        answers += answer_after_exit(model, tokenizer, ids, [ids.shape[1]] * len(chunk), list(exit_ids),
                                     attention_mask=mask, max_new_tokens=max_new)
    return answers


class LynxBudget(Method):
    """LYNX with a thinking budget (`Lynx(..., max_thinking_tokens=B)`): exit at the first confident cue as
    `LynxExit` does, and a trace still thinking after `budget` tokens without one exits there (forced answer from
    the first B thinking tokens, as the live plug-ins cut it). Only the cue exits are under the conformal guarantee.

    The live plug-ins decide a cue exit one token after the cue and a budget exit at the budget's last token; at the
    same step the cue wins. Replay follows that order: the cue exit stands when its deciding token (`position + 1`)
    comes no later than the budget's last thinking token, and a trace whose thinking reaches `budget` tokens exits
    by the budget otherwise. Runs the model for the budget exits' answers.

    Example:
        >>> LynxBudget(0.9, "question", 128, model, tok, lynx.exit_ids).run(replay).info["budget_exits"]  # doctest: +SKIP
        0.12
    """

    def __init__(self, confidence: float, guarantee: str, budget: int, model, tokenizer, exit_ids: Sequence[int],
                 batch_size: int = 64, answer_max_new_tokens: int | None = None):
        self.lynx = LynxExit(confidence, guarantee)
        self.confidence, self.guarantee, self.budget = float(confidence), guarantee, int(budget)
        self.model, self.tokenizer, self.exit_ids = model, tokenizer, list(exit_ids)
        self.batch_size, self.answer_max_new_tokens = batch_size, answer_max_new_tokens
        self.name = f"Lynx c={self.confidence:g} ({guarantee}) + budget B={self.budget}"

    def run(self, replay: Replay) -> Outcome:
        started = time.perf_counter()
        cue = self.lynx.run(replay)
        event = cue.event.clone()
        if len(replay.table):
            deciding = replay.table.position[event.clamp_min(0)] + 1 - replay.prompt_length
            event = torch.where((event >= 0) & (deciding > self.budget - 1), -1, event)
        budget = (event < 0) & (replay.think_length >= self.budget)
        outcome = replay.outcome(self.name, event, family="Lynx + budget", knob=self.budget,
                                 confidence=self.confidence, target=1 - self.confidence, tau=cue.info["tau"])
        rows = budget.nonzero().flatten().tolist()
        for i, a in zip(rows, answers_at_budget(replay, rows, self.budget, self.model, self.tokenizer, self.exit_ids,
                                                self.batch_size, self.answer_max_new_tokens)):
            outcome.thinking_tokens[i] = self.budget
            outcome.total_tokens[i] = self.budget + len(self.exit_ids) + len(a.token_ids)
            outcome.correct[i] = answers_match(a.answer, replay.gold[i])
            outcome.answers[i] = a.answer
        outcome.exited = outcome.exited | budget
        outcome.info["budget_exits"] = float(budget.double().mean())
        outcome.wall_time = time.perf_counter() - started
        return outcome


def cue_token_ids(tokenizer, cues: Sequence[str]) -> list[int]:
    """Token ids whose text, stripped and lower-cased, is a cue word, optionally followed by punctuation.

    Example:
        >>> from lynx_hf.runtime.cues import _example_tokenizer
        >>> tok = _example_tokenizer()
        >>> tok.convert_ids_to_tokens(cue_token_ids(tok, ["hmm", "wait"]))
        ['Hmm', 'Ġwait']
    """
    cues = {c.lower() for c in cues}
    punctuation = ".,;:!?…-—"
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False).strip().lower()
        if text and text.rstrip(punctuation) in cues:
            ids.append(i)
    return ids


class CueSuppressor(LogitsProcessor):
    """NoWait: forbids every token that spells a reflection cue (see `cue_token_ids`), so the model never reflects.

    Cue words a tokenizer spells with several tokens are only suppressed through their single-token spellings.

    Examples:
        >>> from lynx_hf.runtime.cues import _example_tokenizer
        >>> tok = _example_tokenizer()
        >>> processor = CueSuppressor(cue_token_ids(tok, ["wait"]))
        >>> scores = processor(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, len(tok)))
        >>> bool(torch.isinf(scores[0, tok.convert_tokens_to_ids("Ġwait")]))
        True
    """

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = self.token_ids.to(scores.device)
        ids = ids[ids < scores.shape[-1]]
        return scores.index_fill(-1, ids, -math.inf)


class NoWait(Method):
    """NoWait: regenerate every trace with cue tokens suppressed (same prompts, batches, seeds and sampling).

    Thinking tokens and accuracy come from the new traces; nothing exits.

    Example:
        >>> NoWait(model, tok).run(replay).exited.any().item()  # doctest: +SKIP
        False
    """

    name = "NoWait"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def run(self, replay: Replay) -> Outcome:
        started = time.perf_counter()
        table = replay.table
        suppressor = CueSuppressor(cue_token_ids(self.tokenizer, table.settings.get("cues", ["hmm", "wait",
                                                                                             "alternatively"])))
        think_end = self.tokenizer(table.settings.get("think_end", "</think>"), add_special_tokens=False)["input_ids"]
        eos = set(eos_token_ids(self.model, self.tokenizer))
        n = replay.n_traces
        thinking, total = replay.think_length.clone(), replay.length.clone()
        correct = replay.correct.clone()
        answers = [t.get("answer") for t in table.traces]
        for indices, seed in shard_batches(table):
            out, width = regenerate(self.model, self.tokenizer, table, indices, seed, logits_processor=[suppressor])
            for i, row in zip(indices, out[:, width:].tolist()):
                generated = []
                for token in row:
                    if token in eos:
                        break
                    generated.append(token)
                answer = extract_boxed(self.tokenizer.decode(generated, skip_special_tokens=True))
                thinking[i], total[i] = think_length(generated, think_end), len(generated)
                correct[i], answers[i] = answers_match(answer, replay.gold[i]), answer
        return Outcome(self.name, torch.zeros(n, dtype=torch.bool), torch.full((n,), -1, dtype=torch.long), correct,
                       thinking, total, torch.zeros(n, dtype=torch.long), info={"family": "NoWait"}, answers=answers,
                       wall_time=time.perf_counter() - started)
