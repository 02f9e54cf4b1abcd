"""`lynx-hf`: collect forced-exit labels, train and calibrate a probe, push it, evaluate it, run the demo.

    lynx-hf collect   --model organism --problems organism:arithmetic:train --n 800 --out events/train
    lynx-hf collect   --model organism --problems organism:arithmetic:calibration --n 400 --out events/cal
    lynx-hf train     --events events/train --out probe/
    lynx-hf calibrate --probe probe/ --events events/cal --test-events events/test --out bundle/
    lynx-hf push      --bundle bundle/ --repo-id you/lynx-organism
    lynx-hf eval      --model organism --bundle bundle/ --events events/test
    lynx-hf audit     --bundle bundle/ --events events/test --guarantee question --step 25
    lynx-hf recalibrate --bundle bundle/ --audit-log audit.json --out recalibrated/
    lynx-hf build     --model organism --problems organism:arithmetic:train --out runs/build [--dry-run] [--repo-id REPO]
    lynx-hf build     --model organism --problems prompts.jsonl --labels agreement --out runs/unlabelled
    lynx-hf demo
    lynx-hf try       organism "Ann has 5 pens and gives away 2. How many are left?"
    lynx-hf inspect   bundle/

Every subcommand's options: `lynx-hf COMMAND --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .runtime.conformal import DEFAULT_GUARANTEE, GUARANTEES
from .runtime.logs import printing_through_root
from .loading import PROBLEM_SOURCES, load_model, load_problems, prompt_fn

TABLE_CONFIDENCES = (0.8, 0.85, 0.9, 0.95, 0.99)
"""The confidences `lynx-hf inspect` tabulates thresholds for."""


def cmd_collect(args) -> None:
    from .pipeline.collect import Collector, check_problems

    problems = load_problems(args.problems, args.n, args.seed)  # a bad source fails before the model loads
    check_problems(problems, args.labels)
    model, tokenizer = load_model(args.model, args.gguf_file, args.device)
    options = {"exit_text": args.exit_text, "think_start": args.think_start, "think_end": args.think_end,
               "thinking": args.thinking}
    if args.rollout == "vllm":
        from . import organism
        from .pipeline.rollout import VllmRollout

        source = str(organism.MODEL_DIR) if args.model == "organism" else args.model
        options["rollout"] = VllmRollout(source, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                         tensor_parallel_size=args.vllm_tensor_parallel_size)
    collector = Collector(
        model, tokenizer, layers=args.layers, cues=args.cues, **options,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        answer_max_new_tokens=args.answer_max_new_tokens, prompt_fn=prompt_fn(args.model), labels=args.labels,
    )
    table = collector.collect(problems, args.out, batch_size=args.batch_size, seed=args.seed)
    if table is None:  # a non-main process of a data-parallel run: the main one reports
        return
    safe = float(table.safe.double().mean()) if len(table) else float("nan")
    dropped = f"; {len(table.dropped)} traces dropped (no full answer)" if args.labels == "agreement" else ""
    print(f"{table.n_traces} traces, {len(table)} cue events ({safe:.1%} safe, {args.labels} labels{dropped}) in "
          f"{args.out}")


def cmd_train(args) -> None:
    from safetensors.torch import save_file

    from .pipeline.events import EventTable, relabel, table_labels
    from .pipeline.train import describe, prompt_digests, train

    table = EventTable.load(args.events)
    if args.labels:
        table = relabel(table, args.labels)
    probe, report = train(table, seed=args.seed, max_epochs=args.max_epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(out / "probe.safetensors"))
    (out / "probe.json").write_text(json.dumps({"probe": probe.config, "report": asdict(report),
                                                "settings": table.settings,
                                                "problem_digests": prompt_digests(table),
                                                "labels": table_labels(table), "dropped": len(table.dropped),
                                                "events": f"{args.events}: {describe(table)}"},
                                               indent=2, default=str) + "\n", encoding="utf-8")
    print(f"probe trained on {len(table)} events; validation AUROC {report.val_auroc}; saved to {out}")


def cmd_calibrate(args) -> None:
    from .pipeline.events import EventTable
    from .pipeline.train import calibrate_bundle, load_probe_folder

    probe, meta = load_probe_folder(args.probe)
    if "settings" not in meta:
        raise ValueError(f"{Path(args.probe) / 'probe.json'} records no collection settings: give a folder written "
                         "by `lynx-hf train`.")
    lynx = calibrate_bundle(
        probe, EventTable.load(args.events), EventTable.load(args.test) if args.test else None,
        settings=meta["settings"], datasets=args.datasets or [], train_note=meta.get("events", ""),
        validation_auroc=(meta.get("report") or {}).get("val_auroc"), train_digests=meta.get("problem_digests", []),
        labels=args.labels, probe_labels=meta.get("labels"), train_dropped=meta.get("dropped"),
    )
    lynx.save_pretrained(args.out)
    aurocs = [f"{part} AUROC " + ("undefined (one class)" if lynx.metadata.get(key) is None else
                                  f"{lynx.metadata[key]:.3f}")
              for part, key in (("calibration", "calibration_auroc"), ("test", "test_auroc")) if key in lynx.metadata]
    print(f"bundle written to {args.out}: {', '.join(aurocs)}")


def cmd_push(args) -> None:
    from .runtime.bundle import Lynx

    lynx = Lynx.from_pretrained(args.bundle)
    url = lynx.push_to_hub(args.repo_id, private=args.private, token=args.token, branch=args.revision,
                           create_pr=args.create_pr, commit_message=args.commit_message)
    print(url)


def cmd_build(args) -> None:
    from .pipeline.build import BuildPlan, build

    plan = BuildPlan(
        model=args.model, problems=args.problems, seed=args.seed, gguf_file=args.gguf_file, layers=args.layers,
        sizes={"train": args.train, "calibration": args.calibration, "test": args.test}, cues=args.cues,
        think_start=args.think_start, think_end=args.think_end, exit_text=args.exit_text, thinking=args.thinking,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        answer_max_new_tokens=args.answer_max_new_tokens, batch_size=args.batch_size, labels=args.labels,
    )
    build(plan, args.out, device=args.device, dry_run=args.dry_run, pilot=args.pilot, push=args.repo_id,
          private=args.private, token=args.token, say=print)


def _organism_defaults(args, command: str) -> None:
    """Fill in the shipped organism where `--model` / `--bundle` were left out, and say so on stderr."""
    used = []
    if hasattr(args, "model") and args.model is None:
        args.model = "organism"
        used.append("--model organism")
    if args.bundle is None:
        used.append("the organism's bundle as --bundle")
    if used:
        print(f"lynx-hf {command}: using {' and '.join(used)} (the shipped toy model); give "
              f"{'--model and --bundle' if hasattr(args, 'model') else '--bundle'} to evaluate your own.",
              file=sys.stderr)


def _require_eval_extra(command: str) -> None:
    """Fail before any model loads when the evaluation's optional packages are missing."""
    from ._extras import require

    for module in ("matplotlib", "evaluate"):
        require(module, extra="eval", purpose=f"lynx-hf {command}")


def cmd_eval(args) -> None:
    _require_eval_extra("eval")
    from .evaluation.evaluate import main as evaluate_main

    _organism_defaults(args, "eval")
    evaluate_main(args)


def cmd_audit(args) -> None:
    from .evaluation.audit_replay import replay_audit

    _organism_defaults(args, "audit")

    for text in replay_audit(args.bundle, args.events, confidence=args.confidence, guarantee=args.guarantee,
                             risk_level=args.risk_level, cs_level=args.cs_level, step=args.step,
                             alpha=args.alpha):
        print(text, end="\n\n")


def cmd_recalibrate(args) -> None:
    from .runtime.audit import AuditLog
    from .runtime.bundle import Lynx

    _organism_defaults(args, "recalibrate")
    bundle = args.bundle
    if bundle is None:
        from . import organism  # the default bundle

        bundle = organism.BUNDLE_DIR
    lynx = Lynx.from_pretrained(bundle)
    if args.audit_log:
        rows, source = AuditLog.load(args.audit_log).rows, f"audit log {args.audit_log}"
    else:
        from .evaluation.audit_replay import table_rows
        from .pipeline.events import EventTable

        rows, source = table_rows(lynx, EventTable.load(args.events)), f"event table {args.events}"
    new = lynx.recalibrate(rows, confidence=args.confidence, guarantee=args.guarantee, risk_level=args.risk_level,
                           rule=args.rule)
    new.metadata["recalibration"]["source"] = source
    new.save_pretrained(args.out)
    r = new.metadata["recalibration"]
    print(f"recalibrated on {r['rows_used']} of {r['audited_rows']} audited rows ({r['events']} cue events, labels "
          f"by agreement with each row's full answer) from {source}; threshold at c = {new.confidence:g} per "
          f"{new.guarantee}: {lynx.threshold:.4f} -> {new.threshold:.4f}; saved to {args.out}")


def cmd_demo(args) -> None:
    _require_eval_extra("demo")
    from .evaluation.demo import main as demo_main

    demo_main(args)


def cmd_try(args) -> None:
    import torch

    from .runtime.bundle import Lynx

    bundle = args.bundle
    if bundle is None:
        if args.model != "organism":
            raise ValueError("Give --bundle (a bundle folder or Hub repo id built for this model); only the organism "
                             "has a default bundle.")
        from . import organism

        bundle = organism.BUNDLE_DIR
    model, tokenizer = load_model(args.model, args.gguf_file, args.device)
    lynx = Lynx.from_pretrained(bundle, model=model, tokenizer=tokenizer, confidence=args.confidence,
                                guarantee=args.guarantee, shadow=True, revision=args.revision)
    if args.raw:
        text, special = args.prompt, True
    else:
        from .pipeline.data import build_prompt

        text, special = (prompt_fn(args.model) or build_prompt)(tokenizer, args.prompt), False
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=special).to(model.device)
    sampling = {}
    if args.temperature == 0:
        sampling = {"do_sample": False}
    elif args.temperature is not None:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    torch.manual_seed(args.seed)
    out = model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=args.max_new_tokens, **sampling)
    print(trace_report(lynx, model, tokenizer, out, inputs["input_ids"].shape[1]))


def cue_scores(lynx, model, sequence, positions: list[int]) -> list[float]:
    """The probe's score at each cue position of one finished `sequence` (1-D ids), from one teacher-forced forward
    with the bundle's layers captured (what decoding saw at that token, up to float rounding)."""
    import torch

    from .runtime.capture import HiddenStateCapture

    if not positions:
        return []
    with torch.no_grad(), HiddenStateCapture(model, lynx.config.layers, last_only=False) as capture:
        model(sequence[None].to(model.device))
        features = capture.features()[0, positions]
    return lynx.probe.predict_proba(features).float().tolist()


def trace_report(lynx, model, tokenizer, out, prompt_length: int) -> str:
    """What `lynx-hf try` prints for row 0 of a shadow-mode `generate` output: the generated text with every cue
    marked with its probe score, a table of the cues against the threshold, and where LYNX would exit (with the
    answer it would give there)."""
    from .runtime.answers import extract_boxed
    from .runtime.exit import answer_after_exit, exit_cut

    ids = out[0]
    record = lynx.last_exits[0]
    events = lynx.detector.find_events(ids, prompt_length)
    scores = cue_scores(lynx, model, ids, [e.position for e in events])
    threshold = lynx.threshold
    exit_index = next((k for k, e in enumerate(events) if record.would_exit and not record.by_budget
                       and e.position == record.position), None)
    if exit_index is not None and record.score is not None:
        scores[exit_index] = float(record.score)  # the score decoding acted on (the forward above may round apart)

    def decode(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b], skip_special_tokens=False)

    pieces, cursor = [], prompt_length
    for k, (event, score) in enumerate(zip(events, scores)):
        pieces.append(decode(cursor, event.start))
        tag = " EXIT" if k == exit_index else ""
        pieces.append(f"[[#{k + 1} {decode(event.start, event.position + 1).strip()} p={score:.3f}{tag}]]")
        cursor = event.position + 1
    pieces.append(decode(cursor, len(ids)))
    guarantee = {"question": "share of questions whose exit is premature", "event": "chance that an unsafe cue exits"}
    delta = 1 - lynx.confidence
    lines = [
        f"base model {lynx.config.base_model}; cues {', '.join(lynx.config.cues)}; layers {list(lynx.config.layers)}",
        f"threshold {threshold:.4f} at confidence {lynx.confidence:g}, guarantee {lynx.guarantee} "
        f"({guarantee.get(lynx.guarantee, lynx.guarantee)} <= {delta:.2g})",
        "",
        f"--- generated ({len(ids) - prompt_length} tokens; each cue marked [[#k cue p=probe score]]) ---",
        "".join(pieces).rstrip(),
        "---",
        "",
        f"{'#':>3}  {'token':>6}  {'cue':<14}  {'probe score':>11}  {'>= threshold':<12}",
    ]
    for k, (event, score) in enumerate(zip(events, scores)):
        note = "  <- exits here" if k == exit_index else ""
        lines.append(f"{k + 1:>3}  {event.position - prompt_length:>6}  {event.cue:<14}  {score:>11.3f}  "
                     f"{'yes' if score >= threshold else 'no':<12}{note}".rstrip())
    if not events:
        lines.append("  (no cue in the thinking: LYNX has nowhere to exit)")
    lines.append("")
    full_answer = extract_boxed(decode(prompt_length, len(ids)))
    if exit_index is not None:
        cut = exit_cut(record.position, record.start, lynx.config.exit_construction)
        early = answer_after_exit(model, tokenizer, ids[None, :cut + 1], [cut], lynx.exit_ids,
                                  max_new_tokens=lynx.config.answer_max_new_tokens)[0]
        saved = len(ids) - 1 - record.position
        lines.append(f"exit: at cue #{exit_index + 1} '{events[exit_index].cue}' (generated token "
                     f"{record.position - prompt_length}); the full trace ran {saved} tokens further")
        lines.append(f"answer at the exit: {early.answer}; answer of the full trace: {full_answer}")
    elif record.by_budget:
        lines.append("exit: by the thinking budget, not at a cue")
    else:
        lines.append(f"no exit: no cue reached the threshold; answer of the full trace: {full_answer}")
    return "\n".join(lines)


def cmd_inspect(args) -> None:
    from .runtime.bundle import Lynx

    bundle = args.bundle
    if bundle == "organism":
        from . import organism

        bundle = organism.BUNDLE_DIR
    lynx = Lynx.from_pretrained(bundle, revision=args.revision)
    print(bundle_report(lynx, str(args.bundle), args.confidences))


def bundle_report(lynx, source: str, confidences=TABLE_CONFIDENCES) -> str:
    """What `lynx-hf inspect` prints: the bundle's card facts and its thresholds per confidence and guarantee."""
    import math

    from .runtime.conformal import LynxCalibrationWarning

    config, meta, cal = lynx.config, lynx.metadata, lynx.calibration
    labels = meta.get("labels") or getattr(config, "labels", None) or "gold"
    label_text = {"gold": "gold (the forced answer matches the reference answer)",
                  "agreement": "agreement (the forced answer matches the model's own full answer)"}.get(labels, labels)
    auroc = ", ".join(f"{part} {meta[key]:.3f}" for part, key in (
        ("validation", "probe_validation_auroc"), ("calibration", "calibration_auroc"), ("test", "test_auroc"))
        if isinstance(meta.get(key), (int, float)))
    lines = [
        f"bundle            {source}",
        f"base model        {config.base_model}",
        f"cues              {', '.join(config.cues)}",
        f"layers            {list(config.layers)} (hidden size {config.hidden_size}; probe MLP "
        f"{' -> '.join(str(h) for h in [config.feature_size, *config.probe_hidden_sizes, 1])})",
        f"thinking          {config.think_start!r} ... {config.think_end!r}" if config.think_start else
        "thinking          from the model's tokenizer and chat template",
        f"exit text         {config.exit_text!r} ({config.exit_construction})" if config.exit_text else
        f"exit text         from the model's chat template ({config.exit_construction})",
        f"labels            {label_text}",
    ]
    if cal is not None:
        lines.append(f"calibration       {len(cal.scores)} cue events from {cal.n_questions} questions "
                     f"({cal.n_safe} safe, {cal.n_unsafe} unsafe)")
    if meta.get("datasets"):
        lines.append(f"data              {', '.join(map(str, meta['datasets']))}")
    if auroc:
        lines.append(f"probe AUROC       {auroc}")
    lines += [
        "guarantee         question: the share of questions whose exit is premature (the answer at the exit is "
        "wrong) is at most 1 - c",
        "                  event: an unsafe cue exits with probability at most 1 - c",
        f"                  (default {DEFAULT_GUARANTEE}; both hold on average over calibration sets; LYNX exits at "
        "the first cue whose probe score >= the threshold)",
        "",
    ]
    if cal is None:
        return "\n".join(lines + ["no calibration (a budget-only Lynx): no thresholds"])
    lines.append(f"{'confidence c':>12}  {'question threshold':>18}  {'exits':>6}  {'event threshold':>15}  "
                 f"{'exits':>6}")
    scores, question = cal.scores.double(), cal.question

    def exit_share(tau: float) -> str:
        if math.isinf(tau):
            return "0%"
        exited = {int(q) for q in question[scores >= tau].tolist()}
        return f"{len(exited) / cal.n_questions:.0%}"

    for c in confidences:
        row = [f"{c:>12g}"]
        for guarantee, width in (("question", 18), ("event", 15)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LynxCalibrationWarning)
                tau = cal.threshold(c, guarantee)
            row += [f"{'never' if math.isinf(tau) else f'{tau:.4f}':>{width}}", f"{exit_share(tau):>6}"]
        lines.append("  ".join(row))
    lines.append("exits: share of the calibration questions that reach the threshold at some cue; never: too few "
                 "calibration events to certify any exit at that c")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help, unless the help already
    says what the default is (a default of None or False, or a help text mentioning "default")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or not action.option_strings
                or "default" in text or action.required):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's destination and warns."""

    def __init__(self, option_strings, dest, new_option: str, **kwargs):
        self.new_option = new_option
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed: use {self.new_option}", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


def _common_arguments() -> argparse.ArgumentParser:
    """Options every subcommand accepts after its name too (`lynx-hf collect ... -v`)."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: left out after the subcommand, the value given before it (or the default) stays
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details (also accepted before the subcommand)")
    return common


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="`organism` (the shipped toy model), a local folder or a Hub id")
    p.add_argument("--gguf-file", help="GGUF file name inside --model, for quantised checkpoints (default: none)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the model's; a CUDA machine spreads a Hub model over "
                                    "its GPUs)")


def _collection_arguments(p: argparse.ArgumentParser) -> None:
    """How traces are sampled and labelled (`collect` and `build`)."""
    p.add_argument("--layers", type=int, nargs="+", help="hidden-state indices (default: ~1/3, 1/2, 3/4, last)")
    p.add_argument("--cues", nargs="+", default=["hmm", "wait", "alternatively"],
                   help="reflection cue words where exits are decided (whole words, any case)")
    p.add_argument("--thinking", choices=["think", "magistral", "harmony"],
                   help="thinking-format preset (default: from the model's tokenizer and chat template)")
    p.add_argument("--think-start", help="text that opens thinking (default: from the model)")
    p.add_argument("--think-end", help="text that closes thinking (default: from the model)")
    p.add_argument("--exit-text", help="text that closes thinking and opens the answer (default: from the model)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="problems sampled together; each batch is one resumable shard on disk")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="cap on each sampled trace's new tokens")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature of the traces (R1's)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold of the traces")
    p.add_argument("--answer-max-new-tokens", type=int, default=16,
                   help="cap on each forced-exit answer's tokens (the label's answer)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per shard: a resumed run samples the same "
                                                       "traces)")
    _labels_argument(p, default="gold")


LABELS_HELP = ("what makes a cue safe: 'gold' (its forced answer matches the problem's gold answer; every problem "
               "needs one; guarantee: the exit makes the final answer wrong in at most 1 - c of questions) or "
               "'agreement' (its forced answer matches the trace's own full answer, as the live audit checks; no "
               "gold answers needed, traces without a full answer are dropped and counted; guarantee: the exit "
               "changes the final answer in at most 1 - c of questions). Gold answers present with 'agreement' are "
               "kept for reporting only: one kind of labels per bundle, never mixed")


def _labels_argument(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--labels", choices=["gold", "agreement"], default=default,
                   help=LABELS_HELP + (" (default: %(default)s)" if default else
                                       " (default: the labels the event table was collected with)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lynx-hf", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lynx-hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (also accepted after "
                                                                     "the subcommand)")
    common = _common_arguments()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser

    def sub_add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        # every subcommand: defaults shown in its help, -v accepted after its name, its one-line help as description
        kwargs.setdefault("description", kwargs.get("help"))
        return add_parser(name, formatter_class=_HelpFormatter, parents=[common], **kwargs)

    sub.add_parser = sub_add_parser

    p = sub.add_parser("collect", help="sample traces, force an exit at every cue, label it (resumable)")
    _model_arguments(p)
    p.add_argument("--problems", required=True, help=PROBLEM_SOURCES)
    p.add_argument("--n", type=int, help="number of problems (default: all, or 500 for the organism)")
    p.add_argument("--out", required=True, help="output folder (re-running resumes it)")
    _collection_arguments(p)
    p.add_argument("--rollout", choices=["transformers", "vllm"], default="transformers",
                   help="who samples the traces: transformers, or a vLLM engine (GPU, `pip install 'lynx-hf[vllm]'`); "
                        "features and forced exits always run in transformers")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5,
                   help="GPU memory share for the vLLM engine (the rest holds the transformers copy)")
    p.add_argument("--vllm-tensor-parallel-size", type=int, default=1, help="GPUs the vLLM engine shards the "
                                                                           "model over")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train the probe on an event table (problem-level validation split)")
    p.add_argument("--events", required=True, help="folder written by `collect`")
    p.add_argument("--out", required=True, help="folder for probe.safetensors + probe.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the probe's initialisation")
    p.add_argument("--max-epochs", type=int, default=200, help="most epochs (training stops early on the validation "
                                                               "loss)")
    _labels_argument(p, default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="conformal calibration on held-out problems; writes the bundle")
    p.add_argument("--probe", required=True, help="folder written by `train`")
    p.add_argument("--events", required=True, help="calibration event table (problems disjoint from training)")
    p.add_argument("--test-events", dest="test", help="test event table: realised premature-exit rates go into "
                                                       "the model card (default: none)")
    p.add_argument("--test", dest="test", action=_DeprecatedAlias, new_option="--test-events")
    p.add_argument("--datasets", nargs="*", help="dataset names for the model card (default: none)")
    p.add_argument("--out", required=True, help="bundle folder")
    _labels_argument(p, default=None)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("push", help="upload a bundle to the Hub")
    p.add_argument("--bundle", required=True, help="bundle folder written by `calibrate` or `build`")
    p.add_argument("--repo-id", required=True, help="Hub repo to create or update, e.g. you/lynx-organism")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="branch to push to (default: the repo's default branch)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--commit-message", default="Upload LYNX probe bundle", help="message of the Hub commit")
    p.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("build", help="model id -> calibrated bundle with its card: collect, train, calibrate, "
                                     "card, optional push with --repo-id (resumable; --dry-run estimates first)")
    _model_arguments(p)
    p.add_argument("--problems", required=True, help=PROBLEM_SOURCES + "; split into disjoint train / calibration "
                                                     "/ test problems")
    p.add_argument("--train", type=int, default=400, help="training problems")
    p.add_argument("--calibration", type=int, default=400, help="calibration problems")
    p.add_argument("--test", type=int, default=200, help="test problems (realised rates in the card; 0: none)")
    p.add_argument("--out", required=True, help="build folder (events, probe, bundle); re-running resumes it")
    p.add_argument("--dry-run", action="store_true", help="sample a small pilot and print what the full run "
                                                           "will generate and how long it takes here")
    p.add_argument("--pilot", type=int, default=4, help="pilot problems for --dry-run")
    p.add_argument("--repo-id", metavar="REPO", help="push the bundle to this Hub repo when done (default: no push)")
    p.add_argument("--push", dest="repo_id", action=_DeprecatedAlias, new_option="--repo-id")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private (with --repo-id)")
    p.add_argument("--token", help="Hub token (default: the one saved by `hf auth login`)")
    _collection_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("eval", help="evaluate exits on a benchmark: replay over event tables, baselines, plots")
    p.add_argument("--model", help="`organism`, a local folder or a Hub id (default: organism, the shipped toy "
                                   "model)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model, for quantised checkpoints (default: none)")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's shipped bundle)")
    p.add_argument("--events", help="event table of the evaluation traces; collected there if --problems is given "
                                    "(default: --out/events)")
    p.add_argument("--problems", help=PROBLEM_SOURCES + " (default: none: evaluate --events)")
    p.add_argument("--n", type=int, help="number of problems to collect (default: all, or 500 for the organism)")
    p.add_argument("--out", default="outputs/eval", help="folder for results.md/json and plots")
    p.add_argument("--confidences", type=float, nargs="+", default=[0.8, 0.9, 0.95],
                   help="confidences c to evaluate LYNX at")
    p.add_argument("--guarantee", choices=GUARANTEES, default=DEFAULT_GUARANTEE,
                   help="guarantee of the live check (--live); the tables show both (default: %(default)s)")
    p.add_argument("--max-thinking-tokens", type=int, metavar="B",
                   help="add 'Lynx + budget' rows (exit at a confident cue, else after B thinking tokens) and budget "
                        "forcing at B (default: none)")
    p.add_argument("--live", type=int, default=0, help="also run the plug-ins live on this many problems")
    p.add_argument("--replay-only", action="store_true",
                   help="only the replayed methods: skip the baselines that regenerate every trace (budget forcing, "
                        "Lynx + budget, NoWait)")
    p.add_argument("--text-probe-train", help="event table the bundle's probe was trained on: fits the TextProbe "
                                              "control (text features, same MLP, split and calibration) "
                                              "(default: no control)")
    p.add_argument("--text-probe-calibration", help="event table the bundle was calibrated on (with "
                                                    "--text-probe-train; default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems drawn and of the sampling")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("audit", help="replay the live audit (exit answer vs full answer, anytime-valid confidence "
                                     "sequence) on a collected event table, looking after every --step rows")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's shipped bundle)")
    p.add_argument("--events", required=True, help="event table folder written by `collect`")
    p.add_argument("--confidence", type=float, default=0.9, help="confidence c of the threshold audited")
    p.add_argument("--guarantee", choices=GUARANTEES, default=DEFAULT_GUARANTEE,
                   help="which guarantee's threshold: question (share of questions with a premature exit <= 1 - c) "
                        "or event (an unsafe cue exits with probability <= 1 - c)")
    p.add_argument("--risk-level", type=float, help="PAC risk level alpha of the threshold (default: marginal)")
    p.add_argument("--cs-level", type=float, default=0.95,
                   help="coverage of the audit's anytime-valid confidence sequences (default 0.95)")
    p.add_argument("--alpha", type=float, default=None, help=argparse.SUPPRESS)  # deprecated: 1 - --cs-level
    p.add_argument("--step", type=int, default=25, help="print the report after every this many rows")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("recalibrate", help="recalibrate a bundle on its audited rows (a saved audit log) or on an "
                                           "event table, labels by agreement with each row's full answer")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's shipped bundle)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audit-log", help="JSON written by lynx.audit_log.save(path) (default: none; give this or "
                                            "--events)")
    source.add_argument("--events", help="event table folder written by `collect`, its gold labels not used (default: "
                                         "none; give this or --audit-log)")
    p.add_argument("--out", required=True, help="folder for the recalibrated bundle")
    p.add_argument("--confidence", type=float, default=0.9, help="confidence c the new calibration must certify")
    p.add_argument("--guarantee", choices=GUARANTEES, default=DEFAULT_GUARANTEE,
                   help="question (share of questions whose exit changes the answer <= 1 - c) or event")
    p.add_argument("--risk-level", type=float, help="PAC risk level alpha (default: marginal)")
    p.add_argument("--rule", choices=["envelope", "paper"], default="envelope", help="per-event threshold rule")
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("demo", help="the whole method on the shipped model organism, in minutes on a CPU")
    p.add_argument("--n", type=int, default=200, help="problems per family")
    p.add_argument("--out", default="outputs/demo", help="folder for results, plots and event tables")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and the sampling")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("try", help="run a model with a bundle on one prompt and show the thinking with its cues, "
                                   "their probe scores, the threshold and where LYNX exits (shadow mode: the "
                                   "trace runs to its end)")
    p.add_argument("model", metavar="MODEL", help="`organism` (the shipped toy model), a local folder or a Hub id")
    p.add_argument("prompt", metavar="PROMPT", help="the question; it goes through the model's chat template "
                                                    "with R1's instruction unless --raw")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's bundle when MODEL is "
                                    "organism; required otherwise)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of --bundle (default: main)")
    p.add_argument("--confidence", type=float, default=0.9, help="confidence c of the exit threshold")
    p.add_argument("--guarantee", choices=GUARANTEES, default=DEFAULT_GUARANTEE,
                   help="which guarantee sets the threshold")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="cap on the generated tokens")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0: greedy (default: the model's "
                                                      "generation config)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="send PROMPT as it is, without the chat template")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL, for quantised checkpoints (default: none)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the model's)")
    p.set_defaults(func=cmd_try)

    p = sub.add_parser("inspect", help="print a bundle's card facts (base model, cues, layers, labels, calibration) "
                                       "and its thresholds per confidence for both guarantees")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder, Hub id, or `organism` (the shipped one)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) of BUNDLE (default: main)")
    p.add_argument("--confidences", type=float, nargs="+", default=list(TABLE_CONFIDENCES),
                   help="confidences c of the threshold table")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    with printing_through_root(level):  # the library's logs print through the root logger, at the CLI's level
        try:
            args.func(args)
        except (ValueError, FileNotFoundError, OSError, ImportError) as error:
            print(f"lynx-hf {args.command}: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
