"""The `lynx-hf` command line as a user meets it: `--version`, help that documents every option and its default,
one spelling per idea, `-v` anywhere, the organism defaults said out loud, and the `try` / `inspect` commands."""

from __future__ import annotations

import argparse
import warnings

import pytest

import lynx_hf
from lynx_hf import Lynx, organism
from lynx_hf.cli import _organism_defaults, build_parser, cue_scores, main

QUESTION = "Dan has 4 stamps. He gets 4. He loses 4. He finds 8. He gives away 2. How many stamps does Dan have now?"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def visible_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"lynx-hf {lynx_hf.__version__}"
    assert lynx_hf.__version__ == "0.2.0"


def test_every_option_of_every_subcommand_has_help_that_shows_its_default():
    parser = build_parser()
    assert set(subcommands(parser)) >= {"collect", "train", "calibrate", "push", "build", "eval", "audit", "demo",
                                        "try", "inspect"}
    for name, sub in subcommands(parser).items():
        formatter = sub._get_formatter()
        for action in visible_options(sub):
            where = f"lynx-hf {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help text"
            text = formatter._get_help_string(action)
            is_flag = action.nargs == 0
            if action.option_strings and not action.required and not is_flag:
                assert "default" in text, f"{where}: its help does not say its default ({text!r})"


def test_the_default_shown_is_the_real_default():
    collect = subcommands(build_parser())["collect"]
    help_text = collect.format_help().replace("\n", " ")
    assert "(default: hmm wait alternatively)" in " ".join(help_text.split())
    assert "(default: 0.6)" in " ".join(help_text.split())  # --temperature
    assert "(default: 0)" in " ".join(help_text.split())  # --seed: a zero default is shown too


def test_verbose_is_accepted_before_and_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["inspect", "organism", "-v"]).verbose is True
    assert parser.parse_args(["-v", "inspect", "organism"]).verbose is True
    assert parser.parse_args(["inspect", "organism"]).verbose is False
    assert parser.parse_args(["collect", "--model", "organism", "--problems", "p", "--out", "o", "--verbose"]).verbose


def test_the_hub_repo_is_spelled_repo_id_everywhere():
    parser = build_parser()
    for name in ("push", "build"):
        options = {o for a in visible_options(subcommands(parser)[name]) for o in a.option_strings}
        assert "--repo-id" in options, name
        assert "--push" not in options, name
    assert "--revision" in {o for a in visible_options(subcommands(parser)["push"]) for o in a.option_strings}
    build_help = subcommands(parser)["build"].format_help()
    assert "--push" not in build_help  # the old spelling still works but is not advertised


def test_the_old_push_spelling_still_works_and_warns():
    parser = build_parser()
    with pytest.warns(FutureWarning, match="--repo-id"):
        args = parser.parse_args(["build", "--model", "organism", "--problems", "p", "--out", "o", "--push", "me/x"])
    assert args.repo_id == "me/x"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = parser.parse_args(["build", "--model", "organism", "--problems", "p", "--out", "o", "--repo-id", "me/y"])
    assert args.repo_id == "me/y"


def test_a_spelling_means_one_thing_across_subcommands():
    # build's --test is a number of test problems; calibrate's test event table is --test-events
    parser = build_parser()
    calibrate = {o for a in visible_options(subcommands(parser)["calibrate"]) for o in a.option_strings}
    assert "--test-events" in calibrate and "--test" not in calibrate
    with pytest.warns(FutureWarning, match="--test-events"):
        args = parser.parse_args(["calibrate", "--probe", "p", "--events", "e", "--out", "o", "--test", "t"])
    assert args.test == "t"
    meaning = {}
    for name, sub in subcommands(parser).items():
        for action in visible_options(sub):
            for option in action.option_strings:
                meaning.setdefault(option, set()).add(action.type.__name__ if action.type else "str")
    assert {o for o, types in meaning.items() if len(types) > 1} == set()


def test_eval_and_audit_name_the_organism_default_in_their_help_and_when_used(capsys):
    parser = build_parser()
    for name in ("eval", "audit"):
        bundle = next(a for a in subcommands(parser)[name]._actions if "--bundle" in a.option_strings)
        assert "organism" in bundle.help
    model = next(a for a in subcommands(parser)["eval"]._actions if "--model" in a.option_strings)
    assert "organism" in model.help
    args = parser.parse_args(["eval", "--events", "somewhere"])
    _organism_defaults(args, "eval")
    assert args.model == "organism"
    assert "organism" in capsys.readouterr().err
    args = parser.parse_args(["eval", "--model", "me/model", "--bundle", "me/bundle", "--events", "somewhere"])
    _organism_defaults(args, "eval")
    assert args.model == "me/model" and capsys.readouterr().err == ""


def test_inspect_prints_the_card_facts_and_a_threshold_table(capsys):
    assert main(["inspect", str(organism.BUNDLE_DIR)]) == 0
    out = capsys.readouterr().out
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
    for fact in ("base model", lynx.config.base_model, "cues", "layers", "labels", "calibration", "guarantee"):
        assert fact in out
    assert f"{len(lynx.calibration.scores)} cue events from {lynx.calibration.n_questions} questions" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert set(table) == {"0.8", "0.85", "0.9", "0.95", "0.99"}
    for c, row in table.items():
        for guarantee, column in (("question", 1), ("event", 3)):
            lynx.confidence, lynx.guarantee = float(c), guarantee
            assert row[column] == f"{lynx.threshold:.4f}", (c, guarantee)


def test_main_in_process_leaves_the_library_logging_as_it_found_it(capsys):
    """`main()` prints the library's logs through the root logger while it runs, then gives the `lynx_hf` logger back
    following transformers' verbosity, with its own handler."""
    import logging

    import transformers

    library = logging.getLogger("lynx_hf")
    library.setLevel(logging.NOTSET)
    handlers, propagate = list(library.handlers), library.propagate
    assert main(["-v", "inspect", "organism"]) == 0
    assert library.handlers == handlers and library.propagate == propagate
    try:
        transformers.logging.set_verbosity_info()
        assert library.isEnabledFor(logging.INFO)
        transformers.logging.set_verbosity_warning()
        assert not library.isEnabledFor(logging.INFO)
    finally:
        transformers.logging.set_verbosity_warning()


def test_inspect_accepts_organism_as_a_name(capsys):
    assert main(["inspect", "organism", "--confidences", "0.9"]) == 0
    assert "lynx_hf/organism" in capsys.readouterr().out


def test_try_on_the_organism_prints_the_cues_their_scores_the_threshold_and_the_exit(capsys):
    assert main(["try", "organism", QUESTION, "--seed", "1"]) == 0
    out = capsys.readouterr().out
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
    assert f"threshold {lynx.threshold:.4f}" in out
    assert "[[#1 " in out and "p=" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) >= 5]
    assert rows and [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    assert all(r[2] in lynx.config.cues for r in rows)
    exits = [r for r in rows if "exits" in r]
    # the exit is the first cue at or above the threshold, and the text around it says so
    first_above = next((r for r in rows if float(r[3]) >= lynx.threshold), None)
    if first_above is None:
        assert exits == [] and "no exit" in out and "EXIT]]" not in out
    else:
        assert exits == [first_above]
        assert f"[[#{first_above[0]} " in out and out.count("EXIT]]") == 1
        assert "answer at the exit:" in out


def test_try_scores_are_the_scores_decoding_saw():
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, shadow=True)
    inputs = tok(organism.prompt(tok, QUESTION), return_tensors="pt", add_special_tokens=False)
    import torch

    for seed in range(1, 20):  # sampled traces: take the first seed whose trace reaches the threshold
        torch.manual_seed(seed)
        out = model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=400)
        record = lynx.last_exits[0]
        if record.would_exit:
            break
    assert record.would_exit
    (score,) = cue_scores(lynx, model, out[0], [record.position])
    assert score == pytest.approx(record.score, abs=1e-4)


def test_try_needs_a_bundle_for_a_model_other_than_the_organism(capsys):
    assert main(["try", "some/model", "2 + 2?"]) == 2
    assert "--bundle" in capsys.readouterr().err


def test_the_collection_progress_bar_says_what_it_counts(tmp_path, capsys):
    from lynx_hf.pipeline.collect import Collector

    model, tok = organism.load()
    problems = organism.problems("arithmetic", "test", n=2)
    Collector(model, tok, prompt_fn=organism.prompt, max_new_tokens=64).collect(problems, tmp_path, batch_size=1)
    bar = capsys.readouterr().err
    assert "traces sampled and labelled" in bar and "2/2" in bar and "trace" in bar
    assert "collect[" not in bar
