"""The API reads like transformers: reprs that say what an object is, one name per idea, our errors where
transformers would give its own, typed, logged through transformers' logging, and a public API that the notebooks
stay within."""

from __future__ import annotations

import pytest

from lynx_hf import Lynx, LynxConfig, organism


@pytest.fixture(scope="module")
def loaded():
    model, tok = organism.load()
    return model, tok


def test_repr_of_lynx_says_base_model_guarantee_confidence_risk_level_mode_threshold_and_binding(loaded):
    model, tok = loaded
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.8, guarantee="event", risk_level=0.1)
    text = repr(lynx)
    for part in ("base_model='lynx_hf/organism'", "guarantee='event'", "confidence=0.8", "risk_level=0.1",
                 "mode='exit'", "not attached", f"threshold={lynx.threshold:.4g}"):
        assert part in text, (part, text)
    lynx.attach(model, tok)
    lynx.shadow = True
    lynx.audit_rate = 0.25
    text = repr(lynx)
    assert "attached to LlamaForCausalLM" in text and "mode='shadow'" in text and "audit_rate=0.25" in text
    assert "\n" not in text and len(text) < 400


def test_repr_of_config_leaves_out_fingerprints_but_they_are_still_saved_and_compared():
    config = Lynx.from_pretrained(organism.BUNDLE_DIR).config
    assert config.model_fingerprint and config.weights_sample
    text = repr(config)
    assert config.model_fingerprint not in text and config.tokenizer_fingerprint not in text
    assert "weights_sample" not in text and "layer_sample" not in text and len(text) < 600
    assert "base_model='lynx_hf/organism'" in text and "layers=[1, 2, 3, 4]" in text
    other = LynxConfig.from_dict({**config.to_dict(), "model_fingerprint": "0" * 16})
    assert other != config and "model_fingerprint" in config.to_dict()


def test_the_audit_level_is_cs_level_and_the_old_alpha_keyword_still_works_with_a_future_warning(loaded):
    model, tok = loaded
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, audit_rate=1.0)
    enc = tok([organism.prompt(tok, p["question"]) for p in organism.problems("arithmetic", "test", n=4)],
              return_tensors="pt", padding=True, add_special_tokens=False)
    model.generate(**enc, stopping_criteria=[lynx], do_sample=False, max_new_tokens=300)
    report = lynx.audit(cs_level=0.9)
    assert report.cs_level == 0.9 and "90% CS" in str(report) and report.to_dict()["cs_level"] == 0.9
    with pytest.warns(FutureWarning, match="cs_level=0.9"):
        old = lynx.audit(alpha=0.1)
    assert str(old) == str(report)
    with pytest.warns(FutureWarning, match="cs_level"):
        assert old.alpha == pytest.approx(0.1)
    assert "95% CS" in str(lynx.audit())
    with pytest.raises(TypeError):
        lynx.audit(0.05)  # positional: was alpha, would now read as a 5% level, so it is refused
    with pytest.raises(ValueError, match="cs_level"):
        lynx.audit(cs_level=95)


def test_lynx_passed_as_a_logits_processor_gets_our_error_naming_the_fix(loaded):
    from transformers import LogitsProcessorList

    from lynx_hf import UnsupportedGenerationError

    model, tok = loaded
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    enc = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt",
              add_special_tokens=False)
    from lynx_hf import ThinkingBudgetCriteria

    for wrong in (lynx, lynx._stopper, ThinkingBudgetCriteria(8, tokenizer=tok)):  # _stopper: what stopper() returns
        with pytest.raises(UnsupportedGenerationError, match=r"stopping_criteria=\[lynx\].*exit_processor\(\)"):
            model.generate(**enc, logits_processor=[wrong], do_sample=False, max_new_tokens=20)
    # what it relies on: transformers' LogitsProcessorList reads each processor's signature and, for more than
    # (input_ids, scores), raises its own "required parameters" error before calling it
    class ThreeParameters:
        def __call__(self, input_ids, scores, **kwargs):
            return scores

    with pytest.raises(ValueError, match="required parameters"):
        LogitsProcessorList([ThreeParameters()])(enc.input_ids, enc.input_ids.float())
    import inspect

    assert list(inspect.signature(lynx.__call__).parameters) == ["input_ids", "scores"]
    out = model.generate(**enc, stopping_criteria=[lynx], do_sample=False, max_new_tokens=20)  # still a criterion
    assert len(lynx.last_exits) == len(out) == 1


def _stderr_of(snippet: str, **env) -> str:
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "CI")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", snippet], env=environment, capture_output=True, text=True,
                          check=True).stderr


def test_transformers_verbosity_shows_lynx_hf_info_logs():
    snippet = ("import logging, lynx_hf; logging.getLogger('lynx_hf.runtime.probe').info('probe trained')")
    assert "[lynx_hf] probe trained" in _stderr_of(snippet, TRANSFORMERS_VERBOSITY="info")
    assert "probe trained" not in _stderr_of(snippet)  # transformers' default: warnings and above
    assert "probe trained" not in _stderr_of(snippet, TRANSFORMERS_VERBOSITY="error")
    in_code = ("import logging, transformers, lynx_hf; transformers.logging.set_verbosity_info(); "
               "logging.getLogger('lynx_hf.runtime.bundle').info('attached')")
    assert "[lynx_hf] attached" in _stderr_of(in_code)
    own = ("import logging, lynx_hf; logging.getLogger('lynx_hf').setLevel(logging.INFO); "
           "logging.getLogger('lynx_hf.pipeline.collect').info('resuming')")
    assert "[lynx_hf] resuming" in _stderr_of(own)  # a level of its own wins over transformers'
    warned = "import logging, lynx_hf; logging.getLogger('lynx_hf.runtime.bundle').warning('other model')"
    assert "[lynx_hf] other model" in _stderr_of(warned)


def test_the_package_is_typed():
    import configparser
    from pathlib import Path

    import lynx_hf

    assert (Path(lynx_hf.__file__).parent / "py.typed").exists()
    setup = configparser.ConfigParser()
    setup.read(Path(lynx_hf.__file__).parent.parent / "setup.cfg")
    assert "py.typed" in setup["options.package_data"]["lynx_hf"]


def test_answer_returns_lynx_answers_whose_text_is_the_final_response_for_exited_and_other_rows(loaded):
    import lynx_hf
    from lynx_hf import ExitAnswer, LynxAnswer

    model, tok = loaded
    assert ExitAnswer is LynxAnswer and "LynxAnswer" in lynx_hf.__all__
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.97)
    enc = tok([organism.prompt(tok, p["question"]) for p in organism.problems("arithmetic", "test", n=12)],
              return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc.input_ids.shape[1]
    for plugin in (lynx.stopper(), lynx):  # the exact path (answer() generates), the one call (answer() reads)
        out = model.generate(**enc, stopping_criteria=[plugin], do_sample=False, max_new_tokens=400)
        answers = lynx.answer(out)
        records = lynx.last_exits
        assert any(r.exited for r in records) and not all(r.exited for r in records)
        for row, (a, record) in enumerate(zip(answers, records)):
            assert isinstance(a, LynxAnswer)
            assert a.text.startswith("Final Answer: \\boxed{") and "think>" not in a.text
            assert a.answer == organism.extract_answer(a.text) and a.answer is not None
            assert a.full_text.endswith(a.text) and "</think>" in a.full_text
            if record.exited:  # the thinking up to the exit, the exit text, the answer
                kept = tok.decode(out[row, width:record.start], skip_special_tokens=True)
                assert a.full_text.startswith(kept) and a.token_ids
            else:
                assert a.full_text == tok.decode(out[row, width:], skip_special_tokens=True) and a.token_ids == []


def _count_thinking(tok, ids) -> int:
    """Generated tokens before the row's `</think>` or end (the organism's prompt opens the thinking)."""
    close = tok.convert_tokens_to_ids("</think>")
    ids = list(ids)
    end = ids.index(close) if close in ids else len(ids)
    eos = [i for i, t in enumerate(ids[:end]) if t == tok.eos_token_id]
    return eos[0] if eos else end  # a row's EOS is no thinking token


def test_records_say_how_many_thinking_tokens_a_row_used_and_would_have_used(loaded):
    model, tok = loaded
    enc = tok([organism.prompt(tok, p["question"]) for p in organism.problems("arithmetic", "test", n=6)],
              return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc.input_ids.shape[1]
    plain = model.generate(**enc, do_sample=False, max_new_tokens=400)
    full = [_count_thinking(tok, plain[row, width:].tolist()) for row in range(len(plain))]
    shadow = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, guarantee="event", shadow=True)
    model.generate(**enc, stopping_criteria=[shadow.stopper()], do_sample=False, max_new_tokens=400)
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, guarantee="event")
    model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=False, max_new_tokens=400)
    assert any(r.would_exit for r in shadow.last_exits)
    for row, (seen, acted) in enumerate(zip(shadow.last_exits, lynx.last_exits)):
        assert seen.full_thinking_tokens == full[row]  # the shadow row ran in full
        if seen.would_exit:
            assert seen.thinking_tokens == seen.start - width < full[row]  # the cue word dropped, as answer() does
            assert acted.exited and acted.thinking_tokens == seen.thinking_tokens
            assert acted.full_thinking_tokens is None  # cut: how long it would have thought is unknown
        else:
            assert seen.thinking_tokens == full[row] == acted.thinking_tokens == acted.full_thinking_tokens
    stream = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, guarantee="event")
    model.generate(**enc, stopping_criteria=[stream], do_sample=False, max_new_tokens=400)  # the one call
    assert any(r.exited for r in stream.last_exits)
    for row, (seen, record) in enumerate(zip(shadow.last_exits, stream.last_exits)):
        if record.exited:  # in-stream keeps the cue word and the token after it before the exit text
            assert record.thinking_tokens == record.position + 2 - width and record.full_thinking_tokens is None
        else:
            assert record.thinking_tokens == record.full_thinking_tokens == full[row]


def test_the_notebooks_import_only_the_public_api_and_every_public_name_resolves():
    import re
    from pathlib import Path

    import nbformat

    import lynx_hf

    for name in lynx_hf.__all__:
        assert getattr(lynx_hf, name) is not None, name
    examples = sorted((Path(lynx_hf.__file__).parent.parent / "examples").glob("*.ipynb"))
    assert examples
    for path in examples:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            code = cell.source
            # lynx_hf.metrics.LYNX_EXIT is the documented path of the `evaluate` metric (a folder, not a module API)
            assert not re.search(r"(from|import)\s+lynx_hf\.(?!metrics\b)", code), (path.name, code)
            assert not re.search(r"lynx_hf\.(runtime|pipeline|evaluation|cli|custom_generate)\b", code), path.name
            for names in re.findall(r"from\s+lynx_hf\s+import\s+\(?([^)\n]+)", code):
                for name in (n.strip().split(" as ")[0] for n in names.split(",")):
                    assert name in lynx_hf.__all__, (path.name, name)


def test_python_dash_m_lynx_hf_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lynx_hf", "audit", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--cs-level" in out
