"""`lynx-hf build`: from a model id to a calibrated bundle with its model card, in one resumable command.

collect (train, calibration and test problems, disjoint) -> train the probe -> calibrate -> save the bundle with its
card -> optionally push it to the Hub. Everything lands under one output folder; re-running the same command resumes:
finished collection shards, the trained probe and the saved bundle are reused. `dry_run=True` samples a small pilot
instead and prints what the full run will generate (problems, traces, expected tokens and forced exits, hours at the
rate measured on this machine) before anything is committed to disk.

    lynx-hf build --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --problems openai/gsm8k --out runs/r1-1.5b --dry-run
    lynx-hf build --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --problems openai/gsm8k --out runs/r1-1.5b \\
        --repo-id you/lynx-deepseek-r1-distill-qwen-1.5b
    lynx-hf build --model you/your-reasoning-model --problems prompts.jsonl --labels agreement --out runs/mine

Labels (`labels`, `--labels`), one kind for the probe, the calibration and the test rates, never mixed:

- ``"gold"`` (the default): a cue is safe when its forced answer matches the problem's gold answer. Every problem
  needs one; a source where some or all problems lack an answer is refused before anything loads, with an error
  that names ``--labels agreement``. The guarantee: the exit makes the final answer wrong in at most 1 - c of
  questions.
- ``"agreement"``: a cue is safe when its forced answer matches the trace's own full answer (what the live audit
  checks), so a file of prompts is enough; gold answers, where some problems have them, are kept for reporting
  accuracy but never used for the labels. Traces without an extractable full answer are dropped and counted (in the
  log, the bundle's metadata and its card). The guarantee: the exit changes the final answer in at most 1 - c of
  questions.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..runtime.conformal import guarantee_statement
from ..runtime.cues import DEFAULT_CUES
from ..errors import LynxConfigError

logger = logging.getLogger(__name__)

PLAN_NAME = "build.json"
SPLITS = ("train", "calibration", "test")

__all__ = ["BuildPlan", "build", "split_problems"]


@dataclass
class BuildPlan:
    """What a build collects and how; saved as `build.json` in the output folder so a re-run can resume it.

    Example:
        >>> plan = BuildPlan(model="organism", problems="organism:arithmetic:train", sizes={"train": 8})
        >>> BuildPlan(**json.loads(json.dumps(plan.to_dict()))) == plan
        True
    """

    model: str
    problems: str
    sizes: dict = field(default_factory=lambda: {"train": 400, "calibration": 400, "test": 200})
    seed: int = 0
    gguf_file: str | None = None
    layers: list[int] | None = None
    cues: list[str] = field(default_factory=lambda: list(DEFAULT_CUES))
    think_start: str | None = None
    think_end: str | None = None
    exit_text: str | None = None
    thinking: str | None = None
    max_new_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    answer_max_new_tokens: int = 16
    batch_size: int = 16
    labels: str = "gold"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total(self) -> int:
        return sum(self.sizes.get(s, 0) for s in SPLITS)


def split_problems(problems: Sequence[dict], sizes: dict, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train / calibration / test problems (a seeded shuffle, then consecutive slices).

    Example:
        >>> rows = [{"id": str(i), "question": "q", "answer": "a"} for i in range(10)]
        >>> parts = split_problems(rows, {"train": 5, "calibration": 3, "test": 2})
        >>> [len(parts[s]) for s in ("train", "calibration", "test")], len({p["id"] for v in parts.values() for p in v})
        ([5, 3, 2], 10)
    """
    for split in SPLITS:
        n = sizes.get(split, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{split} size {n!r}: give a number of problems >= 0 (--{split}).")
    need = sum(sizes.get(s, 0) for s in SPLITS)
    if len(problems) < need:
        raise ValueError(f"The problem source has {len(problems)} problems but the splits need {need} "
                         f"({sizes}): ask for fewer (--train/--calibration/--test) or a larger source.")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    parts, at = {}, 0
    for split in SPLITS:
        n = sizes.get(split, 0)
        parts[split] = [problems[i] for i in order[at: at + n]]
        at += n
    return parts


def _check_plan(folder: Path, plan: BuildPlan) -> None:
    path = folder / PLAN_NAME
    if path.exists():
        saved = {"labels": "gold", **json.loads(path.read_text(encoding="utf-8"))}  # older builds: gold labels
        if saved != plan.to_dict():
            diff = sorted(k for k in set(saved) | set(plan.to_dict()) if saved.get(k) != plan.to_dict().get(k))
            raise ValueError(f"{folder} holds a build with other settings ({', '.join(diff)}): use another --out, "
                             "or the same settings to resume it.")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n", encoding="utf-8")


def _collector(plan: BuildPlan, model, tokenizer, prompt_fn):
    from .collect import Collector

    return Collector(
        model, tokenizer, layers=plan.layers, cues=plan.cues, think_start=plan.think_start, think_end=plan.think_end,
        exit_text=plan.exit_text, thinking=plan.thinking, max_new_tokens=plan.max_new_tokens,
        temperature=plan.temperature, top_p=plan.top_p, answer_max_new_tokens=plan.answer_max_new_tokens,
        prompt_fn=prompt_fn, labels=plan.labels,
    )


def _pilot(plan: BuildPlan, collector, problems: list[dict], say: Callable[[str], None]) -> dict:
    """Sample and label a few problems, time it, and extrapolate to the full plan."""
    start = time.perf_counter()
    table = collector.collect_batch(problems, seed=plan.seed)
    seconds = time.perf_counter() - start
    traces = table.traces
    n = max(1, len(traces))
    tokens = sum(t["length"] for t in traces) / n
    thinking = sum(t["think_length"] for t in traces) / n
    events = len(table) / n
    total = plan.total
    estimate = {
        "pilot_problems": len(traces), "pilot_seconds": seconds, "tokens_per_trace": tokens,
        "thinking_tokens_per_trace": thinking, "cue_events_per_trace": events,
        "safe_share": float(table.safe.double().mean()) if len(table) else float("nan"),
        "problems": total, "traces": total, "expected_tokens": tokens * total,
        "expected_forced_exits": events * total,
        "expected_answer_tokens": events * total * plan.answer_max_new_tokens,
        "seconds_per_problem": seconds / n, "expected_hours": seconds / n * total / 3600,
    }
    say(f"pilot: {len(traces)} problems sampled and labelled in {seconds:.1f} s on this machine "
        f"({seconds / n:.1f} s per problem)")
    safe = f"{estimate['safe_share']:.0%} of them safe" if len(table) else "none to label"
    say(f"  per trace: {tokens:.0f} generated tokens ({thinking:.0f} thinking), {events:.1f} cue events "
        f"(forced exits), {safe}")
    for t in traces[:2]:
        text = collector.tokenizer.decode(t["token_ids"][t["prompt_length"]:], skip_special_tokens=False)
        say(f"  trace {t['id']!r} ({t['length']} tokens, answer {t['answer']!r}, gold {t['gold']!r}): "
            + repr(text[:240] + ("..." if len(text) > 240 else "")))
    if not len(table):
        say("  WARNING: no cue event in the pilot: the model never wrote a cue inside its thinking block. Check the "
            f"thinking markers ({collector.thinking.think_start!r} ... {collector.thinking.think_end!r}) and the "
            "prompt, or sample more problems.")
    say(f"full run: {total} problems ({plan.sizes}) -> {total} traces, ~{tokens * total:,.0f} generated tokens, "
        f"~{events * total:,.0f} forced exits (~{events * total * plan.answer_max_new_tokens:,.0f} answer tokens), "
        f"~{estimate['expected_hours']:.2f} h at the pilot's rate here (one process; the rate of a GPU or of "
        "`--rollout vllm` differs)")
    return estimate


def build(
    plan: BuildPlan,
    out: str | Path,
    *,
    device: str | None = None,
    dry_run: bool = False,
    pilot: int = 4,
    push: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    progress: bool = True,
    say: Callable[[str], None] = logger.info,
):
    """Run (or, with `dry_run`, estimate) a build; returns the bundle, or the pilot's estimate for a dry run.

    `plan.labels` decides what a safe cue is (module docstring): ``"gold"`` needs a gold answer for every problem
    and raises `LynxConfigError` naming ``--labels agreement`` otherwise; ``"agreement"`` needs none.

    Example:
        >>> plan = BuildPlan(model="organism", problems="organism:arithmetic:train",
        ...                  sizes={"train": 2, "calibration": 2, "test": 0}, max_new_tokens=64)
        >>> estimate = build(plan, "runs/doctest-build", dry_run=True, pilot=1, say=lambda line: None)
        >>> estimate["problems"], estimate["pilot_problems"]
        (4, 1)
    """
    from ..loading import load_model, load_problems, prompt_fn

    out = Path(out)
    from .collect import check_problems

    problems = load_problems(plan.problems, plan.total, plan.seed)
    check_problems(problems, plan.labels)  # gold labels on unlabelled prompts fail here, before a model loads
    parts = split_problems(problems, plan.sizes, plan.seed)
    if not (parts["train"] and parts["calibration"]):  # checked before a model loads or a split is collected
        raise LynxConfigError("A build needs training and calibration problems: set --train and --calibration > 0.")
    model, tokenizer = load_model(plan.model, plan.gguf_file, device)
    collector = _collector(plan, model, tokenizer, prompt_fn(plan.model))
    fmt = collector.thinking
    say(f"model {plan.model}: thinking {fmt.think_start!r} ... {fmt.think_end!r} ({fmt.name}), exit text "
        f"{fmt.exit_text!r}, layers {list(collector.layers)}, cues {list(collector.detector.cues)}")
    say(f"problems from {plan.problems}: " + ", ".join(f"{s} {len(parts[s])}" for s in SPLITS))
    if dry_run:
        return _pilot(plan, collector, parts["train"][:pilot] or problems[:pilot], say)

    from .train import calibrate_bundle, describe, load_probe_folder, prompt_digests, train

    _check_plan(out, plan)
    tables = {}
    for split in SPLITS:
        if not parts[split]:
            continue
        start = time.perf_counter()
        tables[split] = collector.collect(parts[split], out / "events" / split, batch_size=plan.batch_size,
                                          seed=plan.seed, progress=progress)
        say(f"collect {split}: {describe(tables[split])} ({time.perf_counter() - start:.0f} s)")

    probe_dir = out / "probe"
    if (probe_dir / "probe.safetensors").exists():
        probe, meta = load_probe_folder(probe_dir)
        auroc = meta["report"].get("val_auroc")
        say(f"train: reusing the probe in {probe_dir}")
    else:
        from safetensors.torch import save_file

        probe, report = train(tables["train"], seed=plan.seed)
        probe_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(probe_dir / "probe.safetensors"))
        (probe_dir / "probe.json").write_text(json.dumps({"probe": probe.config, "report": asdict(report),
                                                          "labels": plan.labels}, indent=2, default=str) + "\n",
                                              encoding="utf-8")
        auroc = report.val_auroc
        say(f"train: probe on {len(tables['train'])} events, validation AUROC {auroc}")

    datasets = [plan.problems]
    lynx = calibrate_bundle(probe, tables["calibration"], tables.get("test"), settings=tables["train"].settings,
                            tokenizer=tokenizer, datasets=datasets, train_note=describe(tables["train"]),
                            validation_auroc=auroc, train_digests=prompt_digests(tables["train"]),
                            probe_labels=plan.labels, train_dropped=len(tables["train"].dropped))
    lynx.config.base_model = "lynx_hf/organism" if plan.model == "organism" else plan.model
    bundle_dir = out / "bundle"
    lynx.save_pretrained(bundle_dir)
    meta = lynx.metadata
    say(f"calibrate: AUROC {_fmt(meta['calibration_auroc'])} on calibration events"
        + (f", {_fmt(meta['test_auroc'])} on test events" if "test_auroc" in meta else "")
        + f"; bundle with its model card in {bundle_dir}")
    say(f"labels: {plan.labels}; guarantee: {guarantee_statement(plan.labels)}")
    if push:
        url = lynx.push_to_hub(push, private=private, token=token)
        say(f"pushed to {push}: {url}")
    return lynx


def _fmt(value: float | None) -> str:
    return "undefined (one class)" if value is None else f"{value:.3f}"
