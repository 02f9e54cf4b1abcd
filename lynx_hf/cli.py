"""`lynx-hf`: collect forced-exit labels, train and calibrate a probe, push it, evaluate it, run the demo.

    lynx-hf collect   --model organism --problems organism:arithmetic:train --n 800 --out events/train
    lynx-hf collect   --model organism --problems organism:arithmetic:calibration --n 400 --out events/cal
    lynx-hf train     --events events/train --out probe/
    lynx-hf calibrate --probe probe/ --events events/cal --test events/test --out bundle/
    lynx-hf push      --bundle bundle/ --repo-id you/lynx-organism
    lynx-hf eval      --model organism --bundle bundle/ --events events/test
    lynx-hf audit     --bundle bundle/ --events events/test --guarantee question --step 25
    lynx-hf recalibrate --bundle bundle/ --audit-log audit.json --out recalibrated/
    lynx-hf build     --model organism --problems organism:arithmetic:train --out runs/build [--dry-run] [--push REPO]
    lynx-hf demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from .runtime.conformal import DEFAULT_GUARANTEE, GUARANTEES
from .loading import PROBLEM_SOURCES, load_model, load_problems, prompt_fn


def cmd_collect(args) -> None:
    from .pipeline.collect import Collector

    problems = load_problems(args.problems, args.n, args.seed)  # a bad source fails before the model loads
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
        answer_max_new_tokens=args.answer_max_new_tokens, prompt_fn=prompt_fn(args.model),
    )
    table = collector.collect(problems, args.out, batch_size=args.batch_size, seed=args.seed)
    if table is None:  # a non-main process of a data-parallel run: the main one reports
        return
    safe = float(table.safe.double().mean()) if len(table) else float("nan")
    print(f"{table.n_traces} traces, {len(table)} cue events ({safe:.1%} safe) in {args.out}")


def cmd_train(args) -> None:
    from safetensors.torch import save_file

    from .pipeline.events import EventTable
    from .pipeline.train import describe, prompt_digests, train

    table = EventTable.load(args.events)
    probe, report = train(table, seed=args.seed, max_epochs=args.max_epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(out / "probe.safetensors"))
    (out / "probe.json").write_text(json.dumps({"probe": probe.config, "report": asdict(report),
                                                "settings": table.settings,
                                                "problem_digests": prompt_digests(table),
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
        answer_max_new_tokens=args.answer_max_new_tokens, batch_size=args.batch_size,
    )
    build(plan, args.out, device=args.device, dry_run=args.dry_run, pilot=args.pilot, push=args.push,
          private=args.private, token=args.token, say=print)


def cmd_eval(args) -> None:
    from .evaluation.evaluate import main as evaluate_main

    evaluate_main(args)


def cmd_audit(args) -> None:
    from .evaluation.audit_replay import replay_audit

    for text in replay_audit(args.bundle, args.events, confidence=args.confidence, guarantee=args.guarantee,
                             risk_level=args.risk_level, alpha=args.alpha, step=args.step):
        print(text, end="\n\n")


def cmd_recalibrate(args) -> None:
    from .runtime.audit import AuditLog
    from .runtime.bundle import Lynx

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
    from .evaluation.demo import main as demo_main

    demo_main(args)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="`organism`, a local folder or a Hub id")
    p.add_argument("--gguf-file", help="GGUF file name inside --model, for quantised checkpoints")
    p.add_argument("--device", help="cpu, cuda, ... (default: the model's)")


def _collection_arguments(p: argparse.ArgumentParser) -> None:
    """How traces are sampled and labelled (`collect` and `build`)."""
    p.add_argument("--layers", type=int, nargs="+", help="hidden-state indices (default: ~1/3, 1/2, 3/4, last)")
    p.add_argument("--cues", nargs="+", default=["hmm", "wait", "alternatively"])
    p.add_argument("--thinking", choices=["think", "magistral", "harmony"],
                   help="thinking-format preset (default: from the model's tokenizer and chat template)")
    p.add_argument("--think-start", help="text that opens thinking (default: from the model)")
    p.add_argument("--think-end", help="text that closes thinking (default: from the model)")
    p.add_argument("--exit-text", help="text that closes thinking and opens the answer (default: from the model)")
    p.add_argument("--batch-size", type=int, default=16, help="problems per shard")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--answer-max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lynx-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.add_argument("--vllm-tensor-parallel-size", type=int, default=1)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train the probe on an event table (problem-level validation split)")
    p.add_argument("--events", required=True, help="folder written by `collect`")
    p.add_argument("--out", required=True, help="folder for probe.safetensors + probe.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=200)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="conformal calibration on held-out problems; writes the bundle")
    p.add_argument("--probe", required=True, help="folder written by `train`")
    p.add_argument("--events", required=True, help="calibration event table (problems disjoint from training)")
    p.add_argument("--test", help="test event table: realised premature-exit rates go into the model card")
    p.add_argument("--datasets", nargs="*", help="dataset names for the model card")
    p.add_argument("--out", required=True, help="bundle folder")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("push", help="upload a bundle to the Hub")
    p.add_argument("--bundle", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--commit-message", default="Upload LYNX probe bundle")
    p.add_argument("--token")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("build", help="model id -> calibrated bundle with its card: collect, train, calibrate, "
                                     "card, optional --push (resumable; --dry-run estimates first)")
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
    p.add_argument("--push", metavar="REPO", help="push the bundle to this Hub repo when done")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token")
    _collection_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("eval", help="evaluate exits on a benchmark: replay over event tables, baselines, plots")
    p.add_argument("--model", default="organism")
    p.add_argument("--gguf-file")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's)")
    p.add_argument("--events", help="event table of the evaluation traces (collected if --problems is given)")
    p.add_argument("--problems", help=PROBLEM_SOURCES)
    p.add_argument("--n", type=int)
    p.add_argument("--out", default="outputs/eval", help="folder for results.md/json and plots")
    p.add_argument("--confidences", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--guarantee", choices=GUARANTEES, default=DEFAULT_GUARANTEE,
                   help="guarantee of the live check (--live); the tables show both (default: %(default)s)")
    p.add_argument("--max-thinking-tokens", type=int, metavar="B",
                   help="add 'Lynx + budget' rows (exit at a confident cue, else after B thinking tokens) and budget "
                        "forcing at B")
    p.add_argument("--live", type=int, default=0, help="also run the plug-ins live on this many problems")
    p.add_argument("--text-probe-train", help="event table the bundle's probe was trained on: fits the TextProbe "
                                              "control (text features, same MLP, split and calibration)")
    p.add_argument("--text-probe-calibration", help="event table the bundle was calibrated on (with --text-probe-train)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("audit", help="replay the live audit (exit answer vs full answer, anytime-valid confidence "
                                     "sequence) on a collected event table, looking after every --step rows")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's)")
    p.add_argument("--events", required=True, help="event table folder written by `collect`")
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--guarantee", choices=["question", "event"], default="question")
    p.add_argument("--risk-level", type=float, help="PAC risk level alpha of the threshold (default: marginal)")
    p.add_argument("--alpha", type=float, default=0.05, help="miscoverage of the confidence sequence")
    p.add_argument("--step", type=int, default=25, help="print the report after every this many rows")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("recalibrate", help="recalibrate a bundle on its audited rows (a saved audit log) or on an "
                                           "event table, labels by agreement with each row's full answer")
    p.add_argument("--bundle", help="bundle folder or Hub id (default: the organism's)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audit-log", help="JSON written by lynx.audit_log.save(path)")
    source.add_argument("--events", help="event table folder written by `collect` (its gold labels are not used)")
    p.add_argument("--out", required=True, help="folder for the recalibrated bundle")
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--guarantee", choices=["question", "event"], default=DEFAULT_GUARANTEE)
    p.add_argument("--risk-level", type=float, help="PAC risk level alpha (default: marginal)")
    p.add_argument("--rule", choices=["envelope", "paper"], default="envelope")
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser("demo", help="the whole method on the shipped model organism, in minutes on a CPU")
    p.add_argument("--n", type=int, default=200, help="problems per family")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as error:
        print(f"lynx-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
