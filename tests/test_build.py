"""`lynx-hf build`: one command from a model to a calibrated bundle with its card, resumable, with a dry run."""

from __future__ import annotations

import pytest
import torch

from lynx_hf import Lynx, organism
from lynx_hf.pipeline.build import BuildPlan, build
from lynx_hf.cli import main as cli_main


def small_plan(**overrides) -> BuildPlan:
    options = dict(model="organism", problems="organism:arithmetic:train", max_new_tokens=400, batch_size=32,
                   sizes={"train": 32, "calibration": 32, "test": 16})
    options.update(overrides)
    return BuildPlan(**options)


def test_dry_run_prints_what_the_full_run_will_generate_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "build"
    status = cli_main(["build", "--model", "organism", "--problems", "organism:arithmetic:train", "--train", "50",
                       "--calibration", "30", "--test", "20", "--max-new-tokens", "400", "--pilot", "2",
                       "--out", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert status == 0 and not out.exists()
    assert "problems from organism:arithmetic:train: train 50, calibration 30, test 20" in printed
    assert "pilot: 2 problems sampled and labelled" in printed and "full run: 100 problems" in printed
    assert "h at the pilot's rate here" in printed and "thinking '<think>' ... '</think>'" in printed


@pytest.mark.slow
def test_build_on_the_organism_gives_a_working_bundle_with_its_card_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "build"
    lines: list[str] = []
    lynx = build(small_plan(), out, progress=False, say=lines.append)
    card = (out / "bundle" / "README.md").read_text(encoding="utf-8")
    assert card.count("organism") > 0
    plan = small_plan()  # how the calibration traces were sampled is recorded and stated in the card
    assert lynx.metadata["sampling"] == {"temperature": plan.temperature, "top_p": plan.top_p}
    assert f"sampled with temperature = {plan.temperature}, top_p = {plan.top_p}" in " ".join(card.split())
    assert lynx.metadata["test_questions"] == 16 and 0.5 < lynx.metadata["calibration_auroc"] <= 1.0

    model, tok = organism.load()
    loaded = Lynx.from_pretrained(out / "bundle", model=model, tokenizer=tok, confidence=0.8)
    inputs = tok([organism.prompt(tok, "Ann has 5 pens and gives away 2. How many are left?")], return_tensors="pt")
    result = model.generate(**inputs, stopping_criteria=[loaded.stopper()], max_new_tokens=300, do_sample=False)
    assert len(loaded.last_exits) == 1 and loaded.answer(result)[0].text

    # Re-running the same command resumes: nothing is sampled or trained again, the same bundle comes out.
    import lynx_hf.pipeline.collect as collect
    import lynx_hf.pipeline.train as train

    monkeypatch.setattr(collect.Collector, "collect_batch", lambda *a, **k: pytest.fail("re-collected"))
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("re-trained"))
    again = build(small_plan(), out, progress=False, say=lines.append)
    assert any("reusing the probe" in line for line in lines)
    assert all(torch.equal(a, b) for a, b in zip(again.probe.state_dict().values(), lynx.probe.state_dict().values()))
    assert again.calibration.threshold(0.8) == lynx.calibration.threshold(0.8)

    with pytest.raises(ValueError, match="other settings"):
        build(small_plan(seed=1), out, progress=False, say=lines.append)


def test_too_few_problems_for_the_splits_is_a_clear_error_before_any_model_loads(tmp_path, monkeypatch):
    import json

    import lynx_hf.loading as loading

    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                              for i in range(3)), encoding="utf-8")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(ValueError, match="has 3 problems but the splits need 5"):
        build(small_plan(problems=str(source), sizes={"train": 2, "calibration": 2, "test": 1}), tmp_path / "b")


def _prompts_file(tmp_path, family: str, n: int):
    import json

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p["question"]}) + "\n"
                            for p in organism.problems(family, "train", n)), encoding="utf-8")
    return path


@pytest.mark.slow
def test_cli_build_from_unlabelled_prompts_with_agreement_labels_records_them_and_states_changed_answers(tmp_path,
                                                                                                      capsys):
    import json

    prompts = _prompts_file(tmp_path, "compare", 16)
    out = tmp_path / "build"
    status = cli_main(["build", "--model", "organism", "--problems", str(prompts), "--labels", "agreement",
                       "--train", "8", "--calibration", "8", "--test", "0", "--max-new-tokens", "400",
                       "--batch-size", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    metadata = json.loads((out / "bundle" / "calibration.json").read_text(encoding="utf-8"))["metadata"]
    assert metadata["labels"] == {"probe": "agreement", "calibration": "agreement"}
    assert set(metadata["dropped_traces"]) >= {"train", "calibration"}
    card = " ".join((out / "bundle" / "README.md").read_text(encoding="utf-8").split())
    assert "the exit changes the final answer in at most 1 - c of questions" in card
    assert "makes the final answer wrong" not in card
    assert "labels: agreement; guarantee: the exit changes the final answer" in printed
    loaded = Lynx.from_pretrained(out / "bundle")
    from lynx_hf import bundle_labels

    assert bundle_labels(loaded.metadata)["calibration"] == "agreement"


def test_gold_labels_on_unlabelled_prompts_are_refused_before_any_model_loads_naming_the_fix(tmp_path, monkeypatch,
                                                                                            capsys):
    import lynx_hf.loading as loading

    prompts = _prompts_file(tmp_path, "compare", 5)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    status = cli_main(["build", "--model", "organism", "--problems", str(prompts), "--train", "2",
                       "--calibration", "2", "--test", "1", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert status == 2 and "5 of 5 problems have no gold 'answer'" in err and "--labels agreement" in err
    assert not (tmp_path / "b").exists()


def test_a_build_folder_resumes_only_with_the_same_labels(tmp_path):
    from lynx_hf.pipeline.build import _check_plan

    _check_plan(tmp_path, small_plan())
    with pytest.raises(ValueError, match="labels"):
        _check_plan(tmp_path, small_plan(labels="agreement"))
