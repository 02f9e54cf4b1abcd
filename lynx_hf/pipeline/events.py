"""Event tables: per trace, the cue events with their features, forced-exit answers and labels.

Collection writes them, training and calibration read the features and labels, and replay evaluation recomputes
any confidence, the oracle and the cue baselines from them without re-generating. On disk a table is a folder of
shards (`shard-00000.safetensors` for tensors + `shard-00000.jsonl` for traces) plus `settings.json`, which pins
the model, layers, cues and exit construction so that tables from different settings are never mixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CorruptedBundleError, LynxConfigError
from ..runtime.answers import answers_match
from ..runtime.conformal import DEFAULT_LABELS, check_labels

SETTINGS_NAME = "settings.json"
_TENSORS = ("features", "safe", "trace", "position", "start", "cue", "answer_length", "answer_confidence")


@dataclass
class EventTable:
    """Cue events of a set of traces. Events of a trace are contiguous and in trace order.

    Tensors (one row per event): `features` [E, d] float32, `safe` [E] bool, `trace` [E] long (index into
    `traces`), `position` / `start` [E] long (cue-completing token and cue word's first token), `cue` [E] long
    (index into `settings["cues"]`), `answer_length` [E] long (tokens the forced answer took after the exit text)
    and `answer_confidence` [E] float (geometric-mean probability of those tokens, DEER's trial-answer
    confidence). `answers` [E] holds each forced exit's answer text. `traces` holds one dict per
    trace: `id`, `gold`, `answer` (the full trace's), `correct`, `prompt_length`, `think_length` (generated
    thinking tokens), `length` (generated tokens), `token_ids` (prompt + generation). `gold` and `correct` are None
    for a problem without a gold answer. `dropped` lists the ids of problems whose traces were left out because
    agreement labels found no full answer to check against (`table_labels` says which labels `safe` holds).

    Example:
        >>> table = EventTable.empty({"cues": ["wait"], "layers": [1]}, feature_size=4)
        >>> len(table), table.n_traces
        (0, 0)
    """

    settings: dict
    features: torch.Tensor
    safe: torch.Tensor
    trace: torch.Tensor
    position: torch.Tensor
    start: torch.Tensor
    cue: torch.Tensor
    answer_length: torch.Tensor
    answer_confidence: torch.Tensor
    answers: list[str | None] = field(default_factory=list)
    traces: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, settings: dict, feature_size: int) -> "EventTable":
        long = torch.zeros(0, dtype=torch.long)
        return cls(settings, torch.zeros(0, feature_size), torch.zeros(0, dtype=torch.bool), long, long.clone(),
                   long.clone(), long.clone(), long.clone(), torch.zeros(0))

    def __len__(self) -> int:
        return int(self.safe.numel())

    @property
    def n_traces(self) -> int:
        return len(self.traces)

    @property
    def groups(self) -> list[str]:
        """Problem id of each event (for problem-level splits)."""
        ids = [t["id"] for t in self.traces]
        return [ids[i] for i in self.trace.tolist()]

    def check_order(self) -> None:
        """Raise unless every event names a trace of the table and each trace's events are contiguous and in trace
        order (what collection writes): per-question first exits, and so question thresholds and replay, read the
        events in this order. `table.select_traces(range(table.n_traces))` puts a table in order."""
        trace, position = self.trace, self.position
        if len(self) and (int(trace.min()) < 0 or int(trace.max()) >= self.n_traces):
            raise ValueError(f"Events name trace {int(trace.max())} but the table holds {self.n_traces} traces: "
                             "build tables with EventTable.concat / select_traces, or re-collect.")
        step = trace[1:] - trace[:-1]
        if bool((step < 0).any()) or bool(((step == 0) & (position[1:] <= position[:-1])).any()):
            raise ValueError("The table's events are not grouped by trace in trace order: put them in order with "
                             "table.select_traces(range(table.n_traces)).")

    def select_traces(self, indices) -> "EventTable":
        """A table with only the given traces (re-indexed), keeping their events."""
        indices = [int(i) for i in indices]
        remap = torch.full((max(self.n_traces, 1),), -1, dtype=torch.long)
        remap[torch.tensor(indices, dtype=torch.long)] = torch.arange(len(indices))
        keep = remap[self.trace] >= 0 if len(self) else torch.zeros(0, dtype=torch.bool)
        # keep the new trace order: sort events by (new trace index, position)
        new_trace = remap[self.trace][keep]
        order = torch.argsort(new_trace * (1 << 32) + self.position[keep], stable=True)
        rows = keep.nonzero().flatten()[order]
        return EventTable(
            settings=self.settings, trace=new_trace[order],
            **{k: getattr(self, k)[rows] for k in _TENSORS if k != "trace"},
            answers=[self.answers[i] for i in rows.tolist()], traces=[self.traces[i] for i in indices],
            dropped=list(self.dropped),
        )

    @staticmethod
    def concat(tables: list["EventTable"]) -> "EventTable":
        """Concatenate tables collected with the same settings."""
        if not tables:
            raise ValueError("No event tables to concatenate.")
        first = tables[0]
        for other in tables[1:]:
            check_same_settings(first.settings, other.settings)
            if table_labels(other) != table_labels(first):
                raise LynxConfigError(f"Cannot concatenate tables with {table_labels(first)} labels and "
                                      f"{table_labels(other)} labels: relabel one first (`relabel(table, labels)`).")
        offsets, total = [], 0
        for t in tables:
            offsets.append(total)
            total += t.n_traces
        return EventTable(
            settings=first.settings,
            trace=torch.cat([t.trace + off for t, off in zip(tables, offsets)]),
            **{k: torch.cat([getattr(t, k) for t in tables]) for k in _TENSORS if k != "trace"},
            answers=[a for t in tables for a in t.answers],
            traces=[tr for t in tables for tr in t.traces],
            dropped=[d for t in tables for d in t.dropped],
        )

    # ----- disk -----------------------------------------------------------------------------------------
    def save_shard(self, folder: str | os.PathLike, index: int) -> None:
        """Write this table as shard `index` of `folder` (atomically: a half-written shard never counts as done)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{index:05d}"
        tensors = {k: getattr(self, k).contiguous() for k in _TENSORS}
        tmp_tensors = folder / f".{name}.safetensors.tmp"
        tmp_json = folder / f".{name}.jsonl.tmp"
        save_file(tensors, str(tmp_tensors))
        with open(tmp_json, "w", encoding="utf-8") as f:
            f.write(json.dumps({"answers": self.answers, **({"dropped": self.dropped} if self.dropped else {})})
                    + "\n")
            for trace in self.traces:
                f.write(json.dumps(trace) + "\n")
        # The .safetensors file marks a shard done, so it lands last: an interruption in between leaves a shard
        # that collect redoes, never a done one without its traces.
        os.replace(tmp_json, folder / f"{name}.jsonl")
        os.replace(tmp_tensors, folder / f"{name}.safetensors")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "EventTable":
        """Load every shard of a collection folder (in shard order)."""
        folder = Path(folder)
        settings = read_settings(folder)
        shards = sorted(folder.glob("shard-*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"No shards in {folder}: run `lynx-hf collect` first.")
        expected = settings.get("n_shards")
        if expected is not None:
            present = {int(p.stem.split("-")[1]) for p in shards}
            missing = sorted(set(range(expected)) - present)
            extra = sorted(present - set(range(expected)))
            if missing or extra:
                raise CorruptedBundleError(
                    f"{folder} should hold shards 0..{expected - 1} but "
                    + (f"shard(s) {missing} are missing" if missing else "")
                    + (" and " if missing and extra else "")
                    + (f"shard(s) {extra} do not belong to this collection" if extra else "")
                    + ": re-run the same collect command to fill the gaps, or collect into a new folder."
                )
        table = cls.concat([_load_shard(path, settings) for path in shards])
        ids = [t["id"] for t in table.traces]
        if len(set(ids)) != len(ids):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise CorruptedBundleError(f"{folder} holds problem(s) {duplicated} in more than one shard: "
                                       "collect into a new folder.")
        return table


def _load_shard(path: Path, settings: dict) -> EventTable:
    jsonl = path.with_suffix(".jsonl")
    try:
        tensors = load_file(str(path))
        lines = jsonl.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        answers, dropped = head["answers"], head.get("dropped", [])
        traces = [json.loads(line) for line in lines[1:]]
    except Exception as error:  # noqa: BLE001 - every failure here means the same thing
        raise CorruptedBundleError(f"Shard {path.name} in {path.parent} is unreadable ({error}); delete it and "
                                   "re-run collect, which redoes missing shards.") from error
    return EventTable(settings=settings, answers=answers, traces=traces, dropped=dropped,
                      **{k: tensors[k] for k in _TENSORS})


def write_settings(folder: str | os.PathLike, settings: dict) -> None:
    """Write `settings.json`, or check that an existing one matches (resuming with other settings is an error)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SETTINGS_NAME
    if path.exists():
        # folders collected before labels were recorded hold gold labels
        recorded = {"labels": DEFAULT_LABELS, **read_settings(folder)}
        check_same_settings(recorded, {"labels": DEFAULT_LABELS, **settings}, where=str(folder),
                            keys=_FOLDER_PINNED + ("labels",))
    elif any(folder.glob("shard-*")):
        raise LynxConfigError(f"{folder} holds shards but no {SETTINGS_NAME}, so nothing says how they were collected "
                              "and resuming could mix settings: collect into a new folder.")
    else:
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_settings(folder: str | os.PathLike) -> dict:
    path = Path(folder) / SETTINGS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {folder} is not a collection folder (run `lynx-hf collect`).")
    return json.loads(path.read_text(encoding="utf-8"))


# settings that must agree for tables to be combined (the rest, e.g. batch size, may differ)
_PINNED = ("model_fingerprint", "tokenizer_fingerprint", "weights_sample", "layers", "cues", "exit_text",
           "exit_construction", "think_start", "think_end", "temperature", "top_p", "max_new_tokens",
           "answer_max_new_tokens")
# settings that must also agree between runs (or processes) writing into one collection folder
_FOLDER_PINNED = _PINNED + ("seed", "batch_size", "n_shards", "problem_ids")
# settings that must agree where both tables record them (tables collected before they existed lack them)
_PINNED_IF_RECORDED = ("layer_sample",)


def _describe(key: str, x, y) -> str:
    if key == "weights_sample":
        return "weights_sample: the model's weights differ (another checkpoint, re-trained weights or dtype)"
    if key == "layer_sample":
        return "layer_sample: the weights inside the model's layers differ (another fine-tune or dtype)"
    return f"{key}: {x!r} vs {y!r}"


def check_same_settings(a: dict, b: dict, where: str = "these event tables", keys: tuple[str, ...] = _PINNED,
                        if_recorded: tuple[str, ...] = _PINNED_IF_RECORDED) -> None:
    """Raise if two collections differ in a setting that changes features or labels (`if_recorded`: only where both
    record it)."""
    diff = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
    diff.update({k: (a[k], b[k]) for k in if_recorded if a.get(k) and b.get(k) and a[k] != b[k]})
    if diff:
        raise LynxConfigError(
            f"Mismatched settings in {where}: " + "; ".join(_describe(k, x, y) for k, (x, y) in diff.items())
            + ". Collect into a new folder, or use the same model, layers and cues."
        )


def table_labels(table: EventTable) -> str:
    """Which labels a table's `safe` holds: ``"gold"`` or ``"agreement"`` (tables collected before labels were
    recorded hold gold labels).

    Example:
        >>> table_labels(EventTable.empty({}, 1)), table_labels(EventTable.empty({"labels": "agreement"}, 1))
        ('gold', 'agreement')
    """
    return check_labels(table.settings.get("labels", DEFAULT_LABELS))


def relabel(table: EventTable, labels: str) -> EventTable:
    """The same traces and forced answers with `safe` recomputed for other labels, without re-collecting.

    ``"agreement"``: a cue is safe when its forced answer matches its trace's full answer (`answers_match`, the
    audit's comparison); traces without a full answer are dropped and their ids added to `dropped`. ``"gold"``: a
    cue is safe when its forced answer matches the trace's gold answer, which every trace then needs (a table
    collected with agreement labels from unlabelled prompts cannot be relabelled with gold).

    Args:
        table: an event table (its forced answers are in `table.answers`).
        labels: ``"gold"`` or ``"agreement"``.

    Returns:
        The relabelled table (the same object when it already holds `labels`).

    Raises:
        LynxConfigError: gold labels asked for traces without a gold answer (the message names the fix).

    Example:
        >>> import torch
        >>> table = EventTable(settings={}, features=torch.zeros(2, 1), safe=torch.tensor([True, False]),
        ...     trace=torch.tensor([0, 0]), position=torch.tensor([3, 5]), start=torch.tensor([3, 5]),
        ...     cue=torch.tensor([0, 0]), answer_length=torch.tensor([1, 1]), answer_confidence=torch.ones(2),
        ...     answers=["4", "5"], traces=[{"id": "q", "gold": "4", "answer": "5"}])
        >>> relabel(table, "agreement").safe.tolist()  # the full answer (5) was wrong: agreement follows it
        [False, True]
    """
    labels = check_labels(labels)
    if table_labels(table) == labels:
        return table
    if labels == "gold":
        missing = [t["id"] for t in table.traces if t.get("gold") in (None, "")]
        if missing:
            raise LynxConfigError(
                f"{len(missing)} of {table.n_traces} traces have no gold answer (first: {missing[0]!r}): gold labels "
                "(and accuracy) need one for every problem: use problems with gold answers, or agreement labels "
                "(labels='agreement', `--labels agreement`) where there are none.")
        reference = [str(t["gold"]) for t in table.traces]
    else:
        reference = [t.get("answer") for t in table.traces]
    keep = [i for i, r in enumerate(reference) if r is not None]
    dropped = list(table.dropped) + [str(table.traces[i]["id"]) for i, r in enumerate(reference) if r is None]
    # events of a trace without a reference are dropped with it below
    safe = torch.tensor([reference[t] is not None and answers_match(a, reference[t])
                         for a, t in zip(table.answers, table.trace.tolist())], dtype=torch.bool)
    relabelled = EventTable(**{**table.__dict__, "safe": safe, "settings": {**table.settings, "labels": labels}})
    relabelled = relabelled.select_traces(keep) if len(keep) < table.n_traces else relabelled
    relabelled.dropped = dropped
    return relabelled
