"""Text-only baselines, the control for LYNX's claim that the hidden state knows more than the text.

`AnswerStated` exits at the first cue after the thinking text states an answer (regexes over the decoded prefix;
`AnswerStatedCriteria` is the same rule live inside `model.generate`), and `TextProbe` (+ `TextProbeExit`) is the
LYNX probe, labels, split and conformal calibration with features from the text alone (`TextEvents`,
`text_features`; `save_text_events` / `load_text_events` ship them next to a bundle).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from ..runtime.conformal import DEFAULT_GUARANTEE, Calibration
from ..pipeline.events import EventTable
from .replay import Method, Outcome, Replay, conformal_exit

__all__ = [
    "AnswerStated", "AnswerStatedCriteria", "DEFAULT_ANSWER_PATTERNS", "TextEvents", "TextProbe", "TextProbeExit",
    "answer_stated_rules", "load_text_events", "save_text_events", "text_features",
]

logger = logging.getLogger(__name__)

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

    Args:
        tokenizer: The tokenizer that decodes the traces.
        patterns: Regexes that match a stated answer: a mapping from a short label to the regex, or a sequence of
            regexes (each its own label); None (default) uses `DEFAULT_ANSWER_PATTERNS`.
        name: The method's name in results tables; None names it after the patterns' labels.

    Raises:
        ValueError: If `patterns` is empty.

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
        """Whether `text` (the thinking so far) states an answer under this rule's patterns.

        Args:
            text: The generated thinking before a cue.

        Returns:
            True when one of the patterns matches (case-insensitive).

        Example:
            >>> from lynx_hf.runtime.cues import _example_tokenizer
            >>> AnswerStated(_example_tokenizer()).stated("12 + 7 = 19")  # the default "= number line" pattern
            True
        """
        return self.regex.search(text) is not None

    def first_stated(self, token_ids: Sequence[int], prompt_length: int, starts: Sequence[int]) -> int:
        """Index into `starts` of the first cue after a stated answer, or -1.

        Args:
            token_ids: The trace: prompt then generation.
            prompt_length: How many of the first tokens are the prompt (never read).
            starts: The cue words' first tokens, in order.

        Returns:
            The index of the first cue whose preceding thinking states an answer; -1 if none does.

        Example:
            >>> from lynx_hf.runtime.cues import _example_tokenizer
            >>> tok = _example_tokenizer()
            >>> rule = AnswerStated(tok, {"so": r"\\bso\\b"})
            >>> ids = tok.convert_tokens_to_ids(["<think>", "Hmm", "Ġso", "Ġwait"])
            >>> rule.first_stated(ids, prompt_length=1, starts=[1, 3])
            1
        """
        for i, start in enumerate(starts):
            text = self.tokenizer.decode(list(token_ids[prompt_length:start]), skip_special_tokens=True)
            if self.stated(text):
                return i
        return -1

    def run(self, replay: Replay) -> Outcome:
        """Replay the rule on an event table: each trace exits at its first cue after a stated answer.

        Args:
            replay: The event table with its probe scores (only the table's traces and cue starts are read).

        Returns:
            The per-trace outcome, as for every replay method.

        Raises:
            ValueError: If a trace has no `token_ids` (the table was not written by `Collector.collect`).

        Example:
            >>> from lynx_hf.evaluation.replay import Replay
            >>> from lynx_hf.runtime.cues import _example_tokenizer
            >>> tok = _example_tokenizer()
            >>> ids = tok.convert_tokens_to_ids(["<think>", "Hmm", "Ġso", "Ġwait", "</think>"])
            >>> table = EventTable(settings={}, features=torch.zeros(2, 1), safe=torch.tensor([True, True]),
            ...     trace=torch.tensor([0, 0]), position=torch.tensor([1, 3]), start=torch.tensor([1, 3]),
            ...     cue=torch.tensor([0, 1]), answer_length=torch.tensor([1, 1]), answer_confidence=torch.ones(2),
            ...     answers=["4", "4"], traces=[{"id": "q", "gold": "4", "answer": "4", "correct": True,
            ...     "prompt_length": 1, "think_length": 3, "length": 4, "token_ids": ids}])
            >>> replay = Replay(table, scores=torch.zeros(2), exit_length=1)
            >>> AnswerStated(tok, {"so": r"\\bso\\b"}).run(replay).event.tolist()  # exits at the "wait" after "so"
            [1]
        """
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
    """The default text rules for results tables: all default patterns, the answer phrases alone, the `= number` line.

    Each can beat the union on some traces, so all three are reported.

    Args:
        tokenizer: The tokenizer that decodes the traces.

    Returns:
        Three `AnswerStated` rules.

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

    Args:
        rule: The text rule to apply at each confirmed cue (its tokenizer decodes the thinking).
        cues: Reflection cue words (default `("hmm", "wait", "alternatively")`).
        think_start: Text that opens thinking (default `"<think>"`), or None.
        think_end: Text that closes thinking (default `"</think>"`), or None.

    Raises:
        TypeError: If `cues` is a single string.
        ValueError: If a cue or marker is invalid (see `CueDetector`).

    Example:
        >>> from lynx_hf import organism
        >>> model, tok = organism.load()
        >>> criteria = AnswerStatedCriteria(AnswerStated(tok))
        >>> questions = [p["question"] for p in organism.problems("arithmetic", "test", n=2)]
        >>> inputs = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
        ...              add_special_tokens=False)
        >>> out = model.generate(**inputs, do_sample=False, max_new_tokens=400, stopping_criteria=[criteria])
        >>> criteria.exit_start
        tensor([81, 80])
        >>> tok.decode(out[0, inputs.input_ids.shape[1]:81])[-18:]  # stated "= 8", then the cue: stop there
        'gets 4: 4 + 4 = 8\\n'
    """

    def __init__(self, rule: AnswerStated, cues: Sequence[str] = ("hmm", "wait", "alternatively"),
                 think_start: str | None = "<think>", think_end: str | None = "</think>"):
        from ..runtime.cues import CueDetector

        self.rule = rule
        self._markers = (tuple(cues), think_start, think_end)
        self.detector = CueDetector.for_tokenizer(rule.tokenizer, *self._markers)  # fails early on a bad cue set
        self.reset()

    def reset(self) -> None:
        """Forget the current `generate` call (the next call starts afresh).

        A new call is also recognised by its input length, so this is needed only to reuse the criteria on inputs
        of the length the last call ended at.

        Example:
            >>> from lynx_hf.runtime.cues import _example_tokenizer
            >>> criteria = AnswerStatedCriteria(AnswerStated(_example_tokenizer()))
            >>> criteria.reset()
            >>> criteria.batch
            0
        """
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
    """The text side of an event table: all a text-only probe may read.

    Small enough to ship next to a bundle (`save_text_events`), so the `TextProbe` control can be trained on the
    bundle's own tables without re-collecting them.

    Args:
        ids: `[E, W]` per cue event, the last `W` token ids up to and including the cue-completing token (-1 before
            the trace's start).
        thought: `[E]` the thinking tokens before that token.
        cue_index: `[E]` the cue's index in its trace.
        safe: `[E]` its label.
        trace: `[E]` its trace's index into `trace_ids`.
        trace_ids: The problem id of each trace (for problem-level splits).

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
        """The text side of an event table.

        Args:
            table: An event table written by `Collector.collect` (its traces hold `token_ids`).
            max_window: Tokens kept per event, up to the cue-completing token (default 32).

        Returns:
            The table's text events.

        Raises:
            ValueError: If `max_window` < 1 or a trace has no `token_ids`.

        Example:
            >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
            ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
            ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
            ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
            >>> TextEvents.from_table(table, max_window=2).thought.tolist()  # 2 thinking tokens before the cue's
            [2]
        """
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
        """Number of traces (problems).

        Example:
            >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
            ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
            ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
            ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
            >>> TextEvents.from_table(table).n_traces
            1
        """
        return len(self.trace_ids)

    @property
    def groups(self) -> list[str]:
        """Problem id of each event (for problem-level splits).

        Example:
            >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
            ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
            ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
            ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
            >>> TextEvents.from_table(table).groups
            ['q']
        """
        return [self.trace_ids[i] for i in self.trace.tolist()]

    def features(self, embeddings: torch.Tensor, window: int) -> torch.Tensor:
        """Text-only features: the embeddings of the last `window` tokens, then two counts.

        The embeddings (zeros before the trace) are concatenated in order, then log1p(thinking tokens so far) and
        the cue's index in its trace.

        Args:
            embeddings: `[V, d]` input embeddings of the model that wrote the traces.
            window: Tokens to read, between 1 and the tokens kept per event.

        Returns:
            Float32 `[E, window * d + 2]`.

        Raises:
            ValueError: If `window` is out of range or a token id is outside `embeddings`.

        Example:
            >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
            ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
            ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
            ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
            >>> TextEvents.from_table(table, max_window=4).features(torch.eye(10), window=2).shape
            torch.Size([1, 22])
        """
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

    Args:
        path: The file to write.
        splits: Text events by split name.
        metadata: JSON-serialisable facts to store with them.

    Example:
        >>> import os, tempfile
        >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
        ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
        ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
        ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
        >>> path = os.path.join(tempfile.mkdtemp(), "text_events.safetensors")
        >>> save_text_events(path, {"train": TextEvents.from_table(table)}, {"model": "organism"})
        >>> splits, metadata = load_text_events(path)
        >>> splits["train"].ids.shape, metadata
        (torch.Size([1, 32]), {'model': 'organism'})
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
    """Read a `save_text_events` file.

    Args:
        path: The file.

    Returns:
        `({split: TextEvents}, metadata)`.

    Example:
        >>> import os, tempfile
        >>> table = EventTable(settings={}, features=torch.zeros(1, 1), safe=torch.tensor([True]),
        ...     trace=torch.tensor([0]), position=torch.tensor([3]), start=torch.tensor([3]), cue=torch.tensor([0]),
        ...     answer_length=torch.tensor([1]), answer_confidence=torch.tensor([.9]), answers=["1"],
        ...     traces=[{"id": "q", "prompt_length": 1, "token_ids": [5, 6, 7, 8, 9]}])
        >>> path = os.path.join(tempfile.mkdtemp(), "text_events.safetensors")
        >>> save_text_events(path, {"calibration": TextEvents.from_table(table, max_window=4)})
        >>> load_text_events(path)[0]["calibration"].ids.tolist()
        [[5, 6, 7, 8]]
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

    Args:
        table: An event table (its traces hold `token_ids`) or its `TextEvents`.
        embeddings: `[V, d]` input embeddings of the model that wrote the traces.
        window: Tokens to read up to the cue.

    Returns:
        Float32 `[E, window * d + 2]`.

    Raises:
        ValueError: If a trace has no `token_ids`, `window` is out of range, or a token id is outside `embeddings`.

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
    """The standard control of probing work: the LYNX probe with features from the text alone.

    It keeps the LYNX probe's MLP, labels, problem-level split and conformal calibration; only the features differ
    (`text_features`: input embeddings of the last tokens).

    `fit` trains one probe per window in `windows` with `train_probe` (same defaults and seed as the LYNX probe),
    keeps the window with the best AUROC on the training table's own problem-level validation split (never the
    calibration or test problems), and calibrates it on the calibration table as `Lynx` is calibrated. Used with
    `TextProbeExit`, it is compared with LYNX at equal confidence and under the same guarantee.

    Args:
        probe: The trained `LynxProbe` on text features.
        calibration: Its calibration on the calibration table.
        embeddings: `[V, d]` input embeddings the features are built from.
        window: The chosen window (tokens read up to the cue).
        reports: The `ProbeTrainingReport` of each window tried.

    Example:
        >>> import torch
        >>> def events(names, seed):  # random text events: safe when the cue token's id is even
        ...     ids = torch.randint(0, 10, (2 * len(names), 4), generator=torch.Generator().manual_seed(seed))
        ...     return TextEvents(ids=ids, thought=torch.arange(2 * len(names)), cue_index=torch.tensor([0, 1] * len(names)),
        ...                       safe=ids[:, -1] % 2 == 0, trace=torch.arange(2 * len(names)) // 2, trace_ids=list(names))
        >>> train, cal = events([f"t{i}" for i in range(40)], 0), events([f"c{i}" for i in range(40)], 1)
        >>> text_probe = TextProbe.fit(train, cal, torch.eye(10), windows=(1, 2), max_epochs=30)
        >>> text_probe.window, text_probe.calibration.n_questions
        (1, 40)
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
        """Train on `train_table`, pick the window, calibrate on `calibration_table`.

        Args:
            train_table: Training events (an event table or its `TextEvents`).
            calibration_table: Calibration events of other problems.
            embeddings: `[V, d]` input embeddings of the model that wrote the traces.
            windows: Windows to try (default 4, 8, 16, 32); the best validation AUROC wins.
            seed: Seeds the probe's training (default 0, as for the LYNX probe).
            **probe_kwargs: Passed to `train_probe`.

        Returns:
            The fitted text probe.

        Raises:
            ValueError: If either table has no events, they share problems, or `train_probe` refuses the events.

        Example:
            >>> import torch
            >>> def events(names, seed):  # random text events: safe when the cue token's id is even
            ...     ids = torch.randint(0, 10, (2 * len(names), 4), generator=torch.Generator().manual_seed(seed))
            ...     return TextEvents(ids=ids, thought=torch.arange(2 * len(names)), cue_index=torch.tensor([0, 1] * len(names)),
            ...                       safe=ids[:, -1] % 2 == 0, trace=torch.arange(2 * len(names)) // 2, trace_ids=list(names))
            >>> train, cal = events([f"t{i}" for i in range(40)], 0), events([f"c{i}" for i in range(40)], 1)
            >>> text_probe = TextProbe.fit(train, cal, torch.eye(10), windows=(1, 2), max_epochs=30)
            >>> sorted(text_probe.reports)
            [1, 2]
        """
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
        """Float32 probe scores of a table's events from their text features (cached for the last table).

        Args:
            table: An event table or its `TextEvents`.

        Returns:
            `[E]` float32 scores in [0, 1].

        Example:
            >>> import torch
            >>> def events(names, seed):  # random text events: safe when the cue token's id is even
            ...     ids = torch.randint(0, 10, (2 * len(names), 4), generator=torch.Generator().manual_seed(seed))
            ...     return TextEvents(ids=ids, thought=torch.arange(2 * len(names)), cue_index=torch.tensor([0, 1] * len(names)),
            ...                       safe=ids[:, -1] % 2 == 0, trace=torch.arange(2 * len(names)) // 2, trace_ids=list(names))
            >>> train, cal = events([f"t{i}" for i in range(40)], 0), events([f"c{i}" for i in range(40)], 1)
            >>> text_probe = TextProbe.fit(train, cal, torch.eye(10), windows=(1, 2), max_epochs=30)
            >>> text_probe.scores(cal).shape
            torch.Size([80])
        """
        if self._cache is not None and self._cache[0] == id(table):
            return self._cache[1]
        if not len(table):
            return torch.zeros(0)
        scores = self.probe.predict_proba(text_features(table, self.embeddings, self.window)).float().cpu()
        self._cache = (id(table), scores)
        return scores


class TextProbeExit(Method):
    """Exit at the first cue whose `TextProbe` score reaches its conformal threshold: LYNX with text features.

    Compared with `LynxExit` at equal confidence and under the same guarantee, it measures what the hidden state
    adds over the text.

    Args:
        text_probe: A fitted `TextProbe`.
        confidence: c in (0, 1).
        guarantee: ``"question"`` (default) or ``"event"``.

    Example:
        >>> import torch
        >>> def events(names, seed):  # random text events: safe when the cue token's id is even
        ...     ids = torch.randint(0, 10, (2 * len(names), 4), generator=torch.Generator().manual_seed(seed))
        ...     return TextEvents(ids=ids, thought=torch.arange(2 * len(names)), cue_index=torch.tensor([0, 1] * len(names)),
        ...                       safe=ids[:, -1] % 2 == 0, trace=torch.arange(2 * len(names)) // 2, trace_ids=list(names))
        >>> train, cal = events([f"t{i}" for i in range(40)], 0), events([f"c{i}" for i in range(40)], 1)
        >>> text_probe = TextProbe.fit(train, cal, torch.eye(10), windows=(1, 2), max_epochs=30)
        >>> TextProbeExit(text_probe, 0.9).name
        'TextProbe c=0.9 (question)'
    """

    def __init__(self, text_probe: TextProbe, confidence: float, guarantee: str = DEFAULT_GUARANTEE):
        self.text_probe = text_probe
        self.confidence = float(confidence)
        self.guarantee = guarantee
        self.name = f"TextProbe c={self.confidence:g} ({guarantee})"

    def run(self, replay: Replay) -> Outcome:
        """Replay the exit on an event table: each trace exits at its first cue scoring at least the threshold.

        Args:
            replay: The event table (with `token_ids` in its traces) to replay.

        Returns:
            The per-trace outcome, with the threshold, the window and the realised unsafe-event exit rate in
            its `info`.

        Raises:
            ValueError: If a trace has no `token_ids`.
        """
        scores = self.text_probe.scores(replay.table)
        event, tau, unsafe_rate = conformal_exit(replay, scores, self.text_probe.calibration, self.confidence,
                                                 self.guarantee)
        return replay.outcome(self.name, event, family=f"TextProbe ({self.guarantee})", knob=self.confidence,
                              confidence=self.confidence, guarantee=self.guarantee, target=1 - self.confidence,
                              tau=tau, unsafe_event_exit_rate=unsafe_rate, window=self.text_probe.window)
