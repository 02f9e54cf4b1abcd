"""Exit methods compared by `lynx_hf.evaluation.evaluate`: LYNX itself and the baselines, each a small class with one `run`.

Replay methods read only the event table and the per-event probe scores (computed once, in `Replay`): no token is
generated. Live methods (`BudgetForcing`, `NoWait`) need the model and run it. Every method returns an `Outcome`:
per trace, whether it exited, at which event, whether the final answer is right, and the tokens it cost.

Token accounting (`Replay.outcome`): an exit at event e uses `start[e] - prompt_length` thinking tokens (the
drop_cue construction cuts before the cue word) plus `len(exit_ids) + answer_length[e]` answer tokens; a trace
that never exits uses its own `think_length` thinking tokens and `length` generated tokens. Trial decodes (DEER)
are `extra_tokens` and are included in `total_tokens`.

Text-only baselines are the control for LYNX's claim that the hidden state knows more than the text: `AnswerStated`
exits at the first cue after the thinking text states an answer (regexes over the decoded prefix), and `TextProbe`
(+ `TextProbeExit`) is the LYNX probe, labels, split and conformal calibration with features from the text alone.

Adding a baseline is one class with a `name` and a `run(replay) -> Outcome`:

```python
class LastCue(Method):
    name = "LastCue"
    def run(self, replay):
        last = replay.first_event(torch.ones(len(replay.table), dtype=torch.bool), last=True)
        return replay.outcome(self.name, last)
```
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria

from ..runtime.answers import answers_match, extract_boxed
from ..runtime.conformal import DEFAULT_GUARANTEE, Calibration, LynxCalibrationWarning, exits, first_exit
from ..pipeline.events import EventTable
from ..pipeline.collect import think_length
from ..runtime.exit import answer_after_exit, eos_token_ids, pad_token_id
from ..pipeline.rollout import TransformersRollout, left_pad

__all__ = [
    "AnswerStated", "AnswerStatedCriteria", "BudgetForcing", "CueSuppressor", "DEFAULT_ANSWER_PATTERNS",
    "DeerStyle", "FirstCue", "Full", "LynxExit", "Method", "NoWait", "Oracle", "Outcome", "Replay", "TextEvents",
    "TextProbe", "TextProbeExit", "answer_stated_rules", "conformal_exit", "load_text_events", "matched_budget",
    "regenerate", "save_text_events", "shard_batches", "text_features",
]

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Per-trace result of one method on one event table (tensors of length `n_traces`).

    `event` is the exit event's index into the table (-1: no exit at a cue; budget forcing exits without one).
    `extra_tokens` counts trial decodes (DEER) and is already included in `total_tokens`. `info` holds what the
    metrics and plots need to know about the method (family, knob, confidence, guarantee, threshold, ...).

    Example:
        >>> o = Outcome("Full", torch.tensor([False]), torch.tensor([-1]), torch.tensor([True]), torch.tensor([10]),
        ...             torch.tensor([14]), torch.tensor([0]))
        >>> o.n
        1
    """

    method: str
    exited: torch.Tensor
    event: torch.Tensor
    correct: torch.Tensor
    thinking_tokens: torch.Tensor
    total_tokens: torch.Tensor
    extra_tokens: torch.Tensor
    info: dict = field(default_factory=dict)
    answers: list[str | None] | None = None
    wall_time: float | None = None

    @property
    def n(self) -> int:
        """Number of traces."""
        return int(self.exited.numel())


class Replay:
    """An event table with its probe scores (float32, as the plug-ins compute them) and the bundle's calibration.

    Computes the scores once; every replay method reads them. `exit_length` is `len(exit_ids)`, the tokens of the
    exit text an exit costs on top of the answer.

    Example:
        >>> table = EventTable(settings={}, features=torch.zeros(2, 1), safe=torch.tensor([False, True]),
        ...     trace=torch.tensor([0, 0]), position=torch.tensor([12, 20]), start=torch.tensor([12, 20]),
        ...     cue=torch.tensor([0, 0]), answer_length=torch.tensor([2, 2]), answer_confidence=torch.tensor([.5, .9]),
        ...     answers=["3", "4"], traces=[{"id": "q0", "gold": "4", "answer": "4", "correct": True,
        ...     "prompt_length": 10, "think_length": 30, "length": 40, "token_ids": []}])
        >>> replay = Replay(table, scores=torch.tensor([0.2, 0.9]), exit_length=3)
        >>> replay.outcome("FirstCue", torch.tensor([0])).total_tokens.tolist()  # 2 thinking + 3 exit + 2 answer
        [7]
    """

    def __init__(self, table: EventTable, scores: torch.Tensor, exit_length: int,
                 calibration: Calibration | None = None):
        scores = torch.as_tensor(scores).detach().cpu().reshape(-1)
        if scores.numel() != len(table):
            raise ValueError(f"Got {scores.numel()} probe scores for {len(table)} events: score every event once.")
        if table.n_traces == 0:
            raise ValueError("The event table has no traces: collect some first.")
        self.table = table
        self.scores = scores
        self.exit_length = int(exit_length)
        self.calibration = calibration
        self.n_traces = table.n_traces
        self.prompt_length = torch.tensor([t["prompt_length"] for t in table.traces], dtype=torch.long)
        self.think_length = torch.tensor([t["think_length"] for t in table.traces], dtype=torch.long)
        self.length = torch.tensor([t["length"] for t in table.traces], dtype=torch.long)
        self.correct = torch.tensor([bool(t["correct"]) for t in table.traces], dtype=torch.bool)
        self.gold = [str(t["gold"]) for t in table.traces]

    @classmethod
    def from_bundle(cls, table: EventTable, bundle, tokenizer=None) -> "Replay":
        """Score `table` with `bundle.probe`; `exit_length` from the attached bundle, its config or `tokenizer`.

        Example:
            >>> replay = Replay.from_bundle(EventTable.load("events/test"), lynx)  # doctest: +SKIP
        """
        exit_ids = list(getattr(bundle, "exit_ids", None) or bundle.config.exit_token_ids or [])
        if not exit_ids:
            if tokenizer is None:
                raise ValueError("The bundle is not attached and records no exit_token_ids: pass tokenizer=... "
                                 "so the exit text's length can be counted.")
            from ..runtime.exit import exit_token_ids

            exit_ids = exit_token_ids(tokenizer, bundle.config.exit_text)
        with torch.no_grad():
            if len(table):
                device = next(bundle.probe.parameters()).device
                scores = bundle.probe.predict_proba(table.features.to(device)).float().cpu()
            else:
                scores = torch.zeros(0)
        return cls(table, scores, len(exit_ids), bundle.calibration)

    def first_event(self, mask: torch.Tensor, last: bool = False) -> torch.Tensor:
        """Per trace, the index of its first (or last) event where `mask` holds, else -1.

        Example:
            >>> replay.first_event(torch.tensor([False, True])).tolist()  # doctest: +SKIP
            [1]
        """
        n = len(self.table)
        index = torch.arange(n)
        fill = -1 if last else n
        candidate = torch.where(mask.cpu().bool(), index, torch.full_like(index, fill))
        out = torch.full((self.n_traces,), fill, dtype=torch.long)
        out = out.scatter_reduce(0, self.table.trace, candidate, reduce="amax" if last else "amin", include_self=True)
        return torch.where(out == n, torch.full_like(out, -1), out)

    def outcome(self, method: str, event: torch.Tensor, extra: torch.Tensor | None = None, **info) -> Outcome:
        """Token accounting and correctness for exits at `event` (per trace; -1 = run to the end).

        Example:
            >>> replay.outcome("Full", torch.full((replay.n_traces,), -1)).correct.tolist()  # doctest: +SKIP
            [True]
        """
        event = event.long()
        exited = event >= 0
        e = event.clamp_min(0)
        t = self.table
        if len(t):
            thinking_at_exit = t.start[e] - self.prompt_length
            answer_tokens = self.exit_length + t.answer_length[e]
            safe = t.safe[e]
        else:
            thinking_at_exit = answer_tokens = torch.zeros(self.n_traces, dtype=torch.long)
            safe = torch.zeros(self.n_traces, dtype=torch.bool)
        extra = torch.zeros(self.n_traces, dtype=torch.long) if extra is None else extra.long()
        thinking = torch.where(exited, thinking_at_exit, self.think_length)
        total = torch.where(exited, thinking_at_exit + answer_tokens, self.length) + extra
        correct = torch.where(exited, safe, self.correct)
        answers = [t.answers[i] if i >= 0 else tr.get("answer") for i, tr in zip(event.tolist(), t.traces)]
        return Outcome(method, exited, event, correct, thinking, total, extra, info=info, answers=answers)


class Method:
    """A way to end thinking. Subclasses set `name` and implement `run(replay) -> Outcome`."""

    name: str = "method"

    def run(self, replay: Replay) -> Outcome:  # pragma: no cover - interface
        raise NotImplementedError


class Full(Method):
    """No early exit: every trace thinks to its own end (the reference for savings, helped and harmed).

    Example:
        >>> Full().run(replay).exited.any().item()  # doctest: +SKIP
        False
    """

    name = "Full"

    def run(self, replay: Replay) -> Outcome:
        return replay.outcome(self.name, torch.full((replay.n_traces,), -1, dtype=torch.long), family="Full")


class FirstCue(Method):
    """Always exit at the first cue (no probe): the most aggressive cue-based rule.

    Example:
        >>> FirstCue().run(replay).event.tolist()  # doctest: +SKIP
        [0]
    """

    name = "FirstCue"

    def run(self, replay: Replay) -> Outcome:
        return replay.outcome(self.name, replay.first_event(torch.ones(len(replay.table), dtype=torch.bool)),
                              family="FirstCue")


class Oracle(Method):
    """Exit at the first safe cue (knows the labels): an upper bound on the savings of any cue-based exit.

    Example:
        >>> Oracle().run(replay).correct.all().item()  # doctest: +SKIP
        True
    """

    name = "Oracle"

    def run(self, replay: Replay) -> Outcome:
        return replay.outcome(self.name, replay.first_event(replay.table.safe), family="Oracle")


class LynxExit(Method):
    """LYNX: exit at the first cue whose probe score reaches the conformal threshold for (confidence, guarantee).

    Example:
        >>> LynxExit(0.9, "event").run(replay).info["tau"]  # doctest: +SKIP
        0.83
    """

    def __init__(self, confidence: float, guarantee: str = DEFAULT_GUARANTEE):
        self.confidence = float(confidence)
        self.guarantee = guarantee
        self.name = f"Lynx c={self.confidence:g} ({guarantee})"

    def run(self, replay: Replay) -> Outcome:
        if replay.calibration is None:
            raise ValueError("LynxExit needs a calibration: build the Replay with Replay.from_bundle(table, lynx).")
        event, tau, unsafe_rate = conformal_exit(replay, replay.scores, replay.calibration, self.confidence,
                                                 self.guarantee)
        return replay.outcome(self.name, event, family=f"Lynx ({self.guarantee})", knob=self.confidence,
                              confidence=self.confidence, guarantee=self.guarantee, target=1 - self.confidence,
                              tau=tau, unsafe_event_exit_rate=unsafe_rate)


def conformal_exit(replay: Replay, scores: torch.Tensor, calibration: Calibration, confidence: float,
                   guarantee: str) -> tuple[torch.Tensor, float, float | None]:
    """Per trace, the first event whose score reaches the conformal threshold at (confidence, guarantee).

    Returns (event per trace, -1 = none; tau; share of the table's unsafe events that would exit). Shared by
    `LynxExit` and `TextProbeExit`, so both are compared under the same guarantee machinery.

    Example:
        >>> event, tau, unsafe = conformal_exit(replay, replay.scores, replay.calibration,  # doctest: +SKIP
        ...                                     0.9, "event")
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        tau = calibration.threshold(confidence, guarantee)
    table = replay.table
    event = torch.full((replay.n_traces,), -1, dtype=torch.long)
    unsafe_rate = None
    if len(table):
        first = first_exit(scores, table.trace, tau)  # one entry per trace that has events, in order
        with_events = torch.unique_consecutive(table.trace)
        event[with_events] = first
        fires = exits(scores, tau)
        unsafe = ~table.safe
        unsafe_rate = float(fires[unsafe].double().mean()) if bool(unsafe.any()) else 0.0
    return event, tau, unsafe_rate


class DeerStyle(Method):
    """DEER-style: at each cue decode a trial answer; exit at the first whose confidence reaches `lam`.

    Confidence is the forced answer's geometric-mean token probability (`answer_confidence`). Every trial decoded
    before the exit costs `len(exit_ids) + answer_length` extra tokens; the trial at the exit cue is the answer
    itself, so it is counted once, as the answer. A trace that never exits paid for a trial at every cue.

    Example:
        >>> DeerStyle(0.9).run(replay).extra_tokens.tolist()  # doctest: +SKIP
        [5]
    """

    def __init__(self, lam: float):
        self.lam = float(lam)
        self.name = f"DEER λ={self.lam:g}"

    def run(self, replay: Replay) -> Outcome:
        table = replay.table
        confident = torch.nan_to_num(table.answer_confidence.float(), nan=-1.0) >= self.lam
        event = replay.first_event(confident)
        extra = torch.zeros(replay.n_traces, dtype=torch.long)
        if len(table):
            exit_of_trace = event[table.trace]
            index = torch.arange(len(table))
            before_exit = (exit_of_trace < 0) | (index < exit_of_trace)
            cost = (replay.exit_length + table.answer_length) * before_exit
            extra = extra.scatter_add(0, table.trace, cost.long())
        return replay.outcome(self.name, event, extra=extra, family="DEER", knob=self.lam, lam=self.lam)


# ----- text-only baselines ---------------------------------------------------------------------------------------
DEFAULT_ANSWER_PATTERNS: dict[str, str] = {
    "answer is": r"\banswer is\b",
    "so the answer": r"\bso the (?:final )?answer\b",
    "final answer": r"\bfinal answer\b",
    "boxed": r"\\boxed\{",
    "therefore": r"\btherefore\b",
    "= number line": r"=\s*\$?-?\d[\d,]*(?:\.\d+)?\$?\s*\.?\s*$",
}
"""What a practitioner would first try on R1 traces to tell that the thinking has stated its answer (regexes,
matched case-insensitively). `= number line` anchors at the end of the text before the cue: the line the cue
follows concludes with `= <number>`; the others match anywhere in the thinking so far."""


class AnswerStated(Method):
    r"""Exit at the first cue after the thinking text has stated an answer: a text-only rule, no hidden states.

    It reads only the generated thinking before the cue word (the trace's tokens from the end of the prompt up to
    the cue's first token, decoded with `skip_special_tokens=True`; the prompt, which itself asks for `\boxed{}`,
    is never read) and exits at the first cue where one of `patterns` matches (`re.search`, case-insensitive; `$`
    is the end of the text before the cue, i.e. the end of the line the cue follows). The cut, the exit text and
    the answer are those of every other replay method, so it differs from LYNX only in how it picks the cue.

    Example:
        >>> from lynx_hf.runtime.cues import _example_tokenizer
        >>> rule = AnswerStated(_example_tokenizer(), {"answer is": r"\banswer is\b"})
        >>> rule.stated("12 + 7 = 19, so the answer is 19."), rule.stated("12 + 7 = 19.")
        (True, False)
        >>> rule.name
        'AnswerStated (answer is)'
    """

    def __init__(self, tokenizer, patterns: Mapping[str, str] | Sequence[str] | None = None,
                 name: str | None = None):
        patterns = DEFAULT_ANSWER_PATTERNS if patterns is None else patterns
        if not isinstance(patterns, Mapping):
            patterns = {p: p for p in patterns}
        if not patterns:
            raise ValueError("AnswerStated needs at least one pattern (a regex that matches a stated answer).")
        self.tokenizer = tokenizer
        self.patterns = dict(patterns)
        self.regex = re.compile("|".join(f"(?:{p})" for p in self.patterns.values()), re.IGNORECASE)
        label = "all defaults" if self.patterns == DEFAULT_ANSWER_PATTERNS else ", ".join(self.patterns)
        self.name = name or f"AnswerStated ({label})"

    def stated(self, text: str) -> bool:
        """Whether `text` (the thinking so far) states an answer under this rule's patterns."""
        return self.regex.search(text) is not None

    def first_stated(self, token_ids: Sequence[int], prompt_length: int, starts: Sequence[int]) -> int:
        """Index into `starts` (cue words' first tokens, in order) of the first cue after a stated answer, or -1."""
        for i, start in enumerate(starts):
            text = self.tokenizer.decode(list(token_ids[prompt_length:start]), skip_special_tokens=True)
            if self.stated(text):
                return i
        return -1

    def run(self, replay: Replay) -> Outcome:
        table = replay.table
        event = torch.full((replay.n_traces,), -1, dtype=torch.long)
        if len(table):
            traces, counts = torch.unique_consecutive(table.trace, return_counts=True)
            begin = 0
            for t, count in zip(traces.tolist(), counts.tolist()):
                trace = table.traces[t]
                if not trace.get("token_ids"):
                    raise ValueError(f"AnswerStated reads the trace text, but trace {trace.get('id')!r} has no "
                                     "token_ids: replay it on a table written by `Collector.collect`.")
                starts = table.start[begin:begin + count].tolist()
                i = self.first_stated(trace["token_ids"], int(trace["prompt_length"]), starts)
                if i >= 0:
                    event[t] = begin + i
                begin += count
        return replay.outcome(self.name, event, family="AnswerStated", patterns=self.patterns)


def answer_stated_rules(tokenizer) -> list[AnswerStated]:
    """The default text rules for results tables: all default patterns, the answer phrases alone, and the
    concluding `= number` line alone (each can beat the union on some traces, so all three are reported).

    Example:
        >>> from lynx_hf.runtime.cues import _example_tokenizer
        >>> [r.name for r in answer_stated_rules(_example_tokenizer())]
        ['AnswerStated (all defaults)', 'AnswerStated (answer phrases)', 'AnswerStated (= number line)']
    """
    phrases = {k: v for k, v in DEFAULT_ANSWER_PATTERNS.items() if k != "= number line"}
    return [AnswerStated(tokenizer), AnswerStated(tokenizer, phrases, name="AnswerStated (answer phrases)"),
            AnswerStated(tokenizer, {"= number line": DEFAULT_ANSWER_PATTERNS["= number line"]})]


class AnswerStatedCriteria(StoppingCriteria):
    """`AnswerStated` live, inside `model.generate`: stops a row at the first cue after its thinking states an answer.

    Cues come from the same `CueDetector` the LYNX plug-ins use and are confirmed by the token after them (as
    `LynxStoppingCriteria` does: "wait" + "ing" is no cue); only then is the row's generated thinking before the cue
    decoded and matched, so on the same tokens it stops exactly where replay exits. `exit_start[b]` (the cue word's
    first token in the returned sequence, -1: no stop) is where to cut: answer with
    `answer_after_exit(model, tokenizer, sequences, exit_start, exit_ids)`. A new `generate` call is recognised by
    its input length (or call `reset()`). Decoding text costs a host sync at each cue, never between cues.

    Example:
        >>> criteria = AnswerStatedCriteria(AnswerStated(tok))  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=False, stopping_criteria=[criteria])  # doctest: +SKIP
        >>> criteria.exit_start  # doctest: +SKIP
        tensor([57, -1])
    """

    def __init__(self, rule: AnswerStated, cues: Sequence[str] = ("hmm", "wait", "alternatively"),
                 think_start: str | None = "<think>", think_end: str | None = "</think>"):
        from ..runtime.cues import CueDetector

        self.rule = rule
        self._markers = (tuple(cues), think_start, think_end)
        self.detector = CueDetector.for_tokenizer(rule.tokenizer, *self._markers)  # fails early on a bad cue set
        self.reset()

    def reset(self) -> None:
        """Forget the current `generate` call (the next call starts afresh)."""
        self._consumed, self.batch = -1, 0

    def _start(self, input_ids: torch.LongTensor) -> None:
        batch, device = input_ids.shape[0], input_ids.device
        self.prompt_length = input_ids.shape[1] - 1  # stopping criteria first run after one generated token
        from ..runtime.cues import CueDetector

        self.detector = CueDetector.for_tokenizer(self.rule.tokenizer, *self._markers, device=device)
        self.state = self.detector.start(input_ids[:, :self.prompt_length])
        self._consumed, self.batch = self.prompt_length, batch
        self.pending_cue = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.pending_start = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exit_start = torch.full((batch,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1]
        if input_ids.shape[0] != self.batch or length != self._consumed + 1:
            self._start(input_ids)
        cue, start = self.detector.step(self.state, input_ids[:, -1])
        confirmed = (self.pending_cue >= 0) & ~self.state.retracted & ~self.stopped
        if bool(confirmed.any()):
            for b in confirmed.nonzero().flatten().tolist():
                cut = int(self.pending_start[b])
                text = self.rule.tokenizer.decode(input_ids[b, self.prompt_length:cut].tolist(),
                                                  skip_special_tokens=True)
                if self.rule.stated(text):
                    self.stopped[b] = True
                    self.exit_start[b] = cut
        self.pending_cue, self.pending_start = cue, start
        self._consumed = length
        return self.stopped.clone()


@dataclass
class TextEvents:
    """The text side of an event table, all a text-only probe may read: per cue event, the last `ids.shape[1]` token
    ids up to and including the cue-completing token (-1 before the trace's start), the thinking tokens before that
    token, the cue's index in its trace, its label, and its problem (for problem-level splits).

    Small enough to ship next to a bundle (`save_text_events`), so the `TextProbe` control can be trained on the
    bundle's own tables without re-collecting them.

    Example:
        >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
        ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
        ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
        ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
        >>> TextEvents.from_table(table, max_window=4).ids.tolist()  # the cue-completing token is 8
        [[5, 6, 7, 8]]
    """

    ids: torch.Tensor
    thought: torch.Tensor
    cue_index: torch.Tensor
    safe: torch.Tensor
    trace: torch.Tensor
    trace_ids: list[str]

    @classmethod
    def from_table(cls, table: EventTable, max_window: int = 32) -> "TextEvents":
        if max_window < 1:
            raise ValueError(f"max_window must be at least 1 token, got {max_window}.")
        n = len(table)
        ids = torch.full((n, max_window), -1, dtype=torch.long)
        thought = torch.zeros(n, dtype=torch.long)
        for e, (t, position) in enumerate(zip(table.trace.tolist(), table.position.tolist())):
            trace = table.traces[t]
            tokens = trace.get("token_ids")
            if not tokens:
                raise ValueError(f"Text features read the trace tokens, but trace {trace.get('id')!r} has no "
                                 "token_ids: use a table written by `Collector.collect`.")
            window = tokens[max(0, position + 1 - max_window):position + 1]
            ids[e, max_window - len(window):] = torch.tensor(window, dtype=torch.long)
            thought[e] = max(0, position - int(trace["prompt_length"]))
        first = torch.zeros(n, dtype=torch.long)
        if n:
            _, counts = torch.unique_consecutive(table.trace, return_counts=True)
            first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return cls(ids, thought, torch.arange(n) - first, table.safe.clone(), table.trace.clone(),
                   [str(t["id"]) for t in table.traces])

    def __len__(self) -> int:
        return int(self.safe.numel())

    @property
    def n_traces(self) -> int:
        return len(self.trace_ids)

    @property
    def groups(self) -> list[str]:
        """Problem id of each event (for problem-level splits)."""
        return [self.trace_ids[i] for i in self.trace.tolist()]

    def features(self, embeddings: torch.Tensor, window: int) -> torch.Tensor:
        """Float32 [E, window * d + 2]: the embeddings of the last `window` tokens (zeros before the trace),
        concatenated in order, then log1p(thinking tokens so far) and the cue's index in its trace."""
        if not 1 <= window <= self.ids.shape[1]:
            raise ValueError(f"window must be between 1 and {self.ids.shape[1]} (the tokens kept per event), "
                             f"got {window}.")
        embeddings = embeddings.detach().float().cpu()
        ids = self.ids[:, self.ids.shape[1] - window:].long()
        if len(self) and int(ids.max()) >= embeddings.shape[0]:
            raise ValueError(f"Token id {int(ids.max())} is outside the embedding matrix ({embeddings.shape[0]} "
                             "rows): pass the input embeddings of the model that wrote the traces.")
        vectors = embeddings[ids.clamp_min(0)] * (ids >= 0).unsqueeze(-1)
        extra = torch.stack([self.thought.double().log1p().float(), self.cue_index.float()], dim=1)
        return torch.cat([vectors.reshape(len(self), -1), extra], dim=1)


def save_text_events(path, splits: Mapping[str, TextEvents], metadata: dict | None = None) -> None:
    """Write `TextEvents` of several splits (e.g. `train`, `calibration`) and JSON `metadata` into one safetensors file.

    Example:
        >>> save_text_events("text_events.safetensors", {"train": TextEvents.from_table(train)})  # doctest: +SKIP
    """
    import json

    from safetensors.torch import save_file

    tensors, info = {}, {"metadata": metadata or {}, "trace_ids": {}}
    for name, events in splits.items():
        small = len(events) == 0 or int(events.ids.max()) < torch.iinfo(torch.int16).max
        tensors.update({f"{name}.ids": events.ids.to(torch.int16 if small else torch.int32).contiguous(),
                        f"{name}.thought": events.thought.int(), f"{name}.cue_index": events.cue_index.int(),
                        f"{name}.safe": events.safe.bool(), f"{name}.trace": events.trace.int()})
        info["trace_ids"][name] = events.trace_ids
    save_file(tensors, str(path), metadata={"lynx_hf": json.dumps(info)})


def load_text_events(path) -> tuple[dict[str, TextEvents], dict]:
    """Read a `save_text_events` file: ({split: TextEvents}, metadata).

    Example:
        >>> splits, metadata = load_text_events("bundle/text_events.safetensors")  # doctest: +SKIP
    """
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["lynx_hf"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    splits = {}
    for name, trace_ids in info["trace_ids"].items():
        splits[name] = TextEvents(ids=tensors[f"{name}.ids"].long(), thought=tensors[f"{name}.thought"].long(),
                                  cue_index=tensors[f"{name}.cue_index"].long(), safe=tensors[f"{name}.safe"].bool(),
                                  trace=tensors[f"{name}.trace"].long(), trace_ids=list(trace_ids))
    return splits, info["metadata"]


def text_features(table: EventTable | TextEvents, embeddings: torch.Tensor, window: int) -> torch.Tensor:
    """Text-only features of each cue event: no hidden state, only what the text shows.

    Per event: the base model's input embeddings of the last `window` tokens up to and including the
    cue-completing token (the tokens the hidden state at the event has read last; zeros where the trace is
    shorter), concatenated in order, then the thinking tokens so far (log1p) and the cue's index in its trace.
    Returns float32 [E, window * d + 2].

    Example:
        >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
        ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
        ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
        ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
        >>> x = text_features(table, torch.eye(10), window=2)
        >>> x.shape, x[0, :10].argmax().item(), x[0, 10:20].argmax().item()  # tokens 7 and 8 (the cue)
        (torch.Size([1, 22]), 7, 8)
    """
    if isinstance(table, EventTable):
        table = TextEvents.from_table(table, max_window=window)
    return table.features(embeddings, window)


class TextProbe:
    """The standard control of probing work: the LYNX probe's MLP, labels, problem-level split and conformal
    calibration, with features from the text alone (`text_features`: input embeddings of the last tokens).

    `fit` trains one probe per window in `windows` with `train_probe` (same defaults and seed as the LYNX probe),
    keeps the window with the best AUROC on the training table's own problem-level validation split (never the
    calibration or test problems), and calibrates it on the calibration table as `Lynx` is calibrated. Used with
    `TextProbeExit`, it is compared with LYNX at equal confidence and under the same guarantee.

    Example:
        >>> text_probe = TextProbe.fit(train, cal, model.get_input_embeddings().weight)  # doctest: +SKIP
        >>> rows, _ = evaluate(replay, [TextProbeExit(text_probe, 0.9)])  # doctest: +SKIP
    """

    def __init__(self, probe, calibration: Calibration, embeddings: torch.Tensor, window: int,
                 reports: dict | None = None):
        self.probe = probe
        self.calibration = calibration
        self.embeddings = embeddings.detach().float().cpu()
        self.window = int(window)
        self.reports = dict(reports or {})
        self._cache: tuple[int, torch.Tensor] | None = None

    @classmethod
    def fit(cls, train_table: EventTable | TextEvents, calibration_table: EventTable | TextEvents,
            embeddings: torch.Tensor, *, windows: Sequence[int] = (4, 8, 16, 32), seed: int = 0,
            **probe_kwargs) -> "TextProbe":
        """Train on `train_table`, pick the window, calibrate on `calibration_table` (event tables or their
        `TextEvents`, disjoint problems); extra keyword arguments go to `train_probe`."""
        from ..runtime.probe import train_probe

        if isinstance(train_table, EventTable):
            train_table = TextEvents.from_table(train_table, max(windows))
        if isinstance(calibration_table, EventTable):
            calibration_table = TextEvents.from_table(calibration_table, max(windows))
        if not len(train_table) or not len(calibration_table):
            raise ValueError("TextProbe.fit needs cue events in both the training and the calibration table.")
        overlap = set(train_table.trace_ids) & set(calibration_table.trace_ids)
        if overlap:
            raise ValueError(f"{len(overlap)} problems are in both the training and calibration tables: "
                             "calibrate on problems the probe never saw.")
        best, reports = None, {}
        for window in windows:
            features = text_features(train_table, embeddings, window)
            probe, report = train_probe(features, train_table.safe, train_table.groups, seed=seed, **probe_kwargs)
            reports[int(window)] = report
            key = -1.0 if report.val_auroc is None else report.val_auroc
            if best is None or key > best[0]:
                best = (key, window, probe)
        _, window, probe = best
        with torch.no_grad():
            scores = probe.predict_proba(text_features(calibration_table, embeddings, window)).float()
        calibration = Calibration(scores=scores.double(), safe=calibration_table.safe.clone(),
                                  question=calibration_table.trace.clone())
        logger.info("TextProbe: window %d (validation AUROC %s)", window,
                    {w: r.val_auroc for w, r in reports.items()})
        return cls(probe, calibration, embeddings, window, reports)

    @torch.no_grad()
    def scores(self, table: EventTable | TextEvents) -> torch.Tensor:
        """Float32 probe scores of a table's events from their text features (cached for the last table)."""
        if self._cache is not None and self._cache[0] == id(table):
            return self._cache[1]
        if not len(table):
            return torch.zeros(0)
        scores = self.probe.predict_proba(text_features(table, self.embeddings, self.window)).float().cpu()
        self._cache = (id(table), scores)
        return scores


class TextProbeExit(Method):
    """Exit at the first cue whose `TextProbe` score reaches its conformal threshold: LYNX with text features.

    Example:
        >>> TextProbeExit(text_probe, 0.9).name  # doctest: +SKIP
        'TextProbe c=0.9 (event)'
    """

    def __init__(self, text_probe: TextProbe, confidence: float, guarantee: str = DEFAULT_GUARANTEE):
        self.text_probe = text_probe
        self.confidence = float(confidence)
        self.guarantee = guarantee
        self.name = f"TextProbe c={self.confidence:g} ({guarantee})"

    def run(self, replay: Replay) -> Outcome:
        scores = self.text_probe.scores(replay.table)
        event, tau, unsafe_rate = conformal_exit(replay, scores, self.text_probe.calibration, self.confidence,
                                                 self.guarantee)
        return replay.outcome(self.name, event, family=f"TextProbe ({self.guarantee})", knob=self.confidence,
                              confidence=self.confidence, guarantee=self.guarantee, target=1 - self.confidence,
                              tau=tau, unsafe_event_exit_rate=unsafe_rate, window=self.text_probe.window)


# ----- live baselines ----------------------------------------------------------------------------------------------
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
        >>> out, width = regenerate(model, tok, table, [0, 1], seed=0, stopping_criteria=[lynx])  # doctest: +SKIP
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
    """The forced-exit answers (`ExitAnswer`) of traces `rows` cut after `budget` thinking tokens: the prompt and the
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
