"""The architecture matrix: lynx-hf on tiny random-weight models of every reasoning-model family transformers has,
in float32 and bfloat16, on CPU here and on a GPU through `LYNX_TEST_DEVICE=cuda` (benchmarks/gpu_check.py).

Per family and dtype: the hooks capture exactly `output_hidden_states`; shadow mode is token-identical to plain
`generate`; stop mode + `lynx.answer` (KV cache reused where exact) equals the re-prefilled exit (`sequence[:cut] +
exit text` from scratch); in-stream mode forces the exit text after the token that ended the cue word. Known failures
would be `xfail(strict=True)` with the reason, so a fix shows up as an unexpected pass.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import real_tokenizers as rt
from forcing import ForceScript
from lynx_hf import Calibration, Lynx, LynxConfig, LynxProbe
from lynx_hf.runtime.capture import HiddenStateCapture
from lynx_hf.runtime.exit import answer_after_exit, exit_cut

DEVICE = torch.device(os.environ.get("LYNX_TEST_DEVICE", "cpu"))
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# Which reasoning models each family carries, and the tiny config's family-specific settings.
FAMILIES = {
    "qwen2": ("DeepSeek-R1-Distill-Qwen, QwQ-32B", {}),
    "llama": ("DeepSeek-R1-Distill-Llama", {}),
    "qwen3": ("Qwen3 (thinking mode)", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3-30B-A3B / 235B-A22B", dict(head_dim=16, num_experts=4, decoder_sparse_step=1, **MOE)),
    "mistral": ("Magistral", {}),
    "phi3": ("Phi-4-reasoning", {}),
    "smollm3": ("SmolLM3", {}),
    "exaone4": ("EXAONE 4.0 (sliding-window layers)", dict(num_hidden_layers=4, sliding_window=8)),
    "olmo2": ("OLMo 2", {}),
    "gpt_oss": ("gpt-oss (sliding-window layers, MoE)", dict(head_dim=16, num_local_experts=4, sliding_window=8,
                                                           num_experts_per_tok=2)),
    "glm4_moe": ("GLM-4.5 / 4.6", dict(head_dim=16, n_routed_experts=4, first_k_dense_replace=1, n_shared_experts=1,
                                       n_group=1, topk_group=1, **MOE)),
    "deepseek_v3": ("DeepSeek-R1 / V3 (MLA)", dict(num_key_value_heads=4, n_routed_experts=4, first_k_dense_replace=1, n_shared_experts=1,
                                                   n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **MOE)),
    "qwen3_next": ("Qwen3-Next-80B-A3B-Thinking (linear attention)",
                   dict(head_dim=16, num_hidden_layers=4, num_experts=4, shared_expert_intermediate_size=32,
                        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                        linear_value_head_dim=16, full_attention_interval=2, **MOE)),
}
# Known failures: (family, check) -> reason. None today: sliding-window and linear-attention caches used to fail in
# `lynx.answer` (issue 14); the answer pass now answers such rows alone from a fresh cache.
KNOWN: dict[tuple[str, str], str] = {}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT = "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>\n"
SCRIPT = "3 + 4 = 7. Wait, is that right? Yes. Hmm, 7 - 4 = 3.\n</think>\n\nFinal Answer: \\boxed{7}"
SCRIPT_WITHOUT_CUES = "3 + 4 = 7. Is that right? Yes, since 7 - 4 = 3.\n</think>\n\nFinal Answer: \\boxed{7}"


@pytest.fixture(scope="module")
def tok():
    specials = (("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False),
                ("</think>", False))
    tokenizer = rt.byte_level(256, specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "left"
    return tokenizer


_MODELS: dict = {}


def tiny(family: str, dtype: str, tok):
    """The family's tiny random model on DEVICE in `dtype` (built once per module run)."""
    key = (family, dtype)
    if key not in _MODELS:
        config = AutoConfig.for_model(family, **{**BASE, **FAMILIES[family][1]}, vocab_size=len(tok),
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(DEVICE, DTYPES[dtype]).eval()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        _MODELS[key] = model
    return _MODELS[key]


def bundle(model, *, shadow: bool, probability: float | None = None) -> Lynx:
    n = model.config.num_hidden_layers
    config = LynxConfig(base_model="test/" + model.config.model_type, layers=[1, n], hidden_size=model.config.hidden_size)
    torch.manual_seed(1)
    probe = LynxProbe(config.feature_size, hidden_sizes=(8,))
    if probability is not None:  # a probe that is always this confident: exits at the first cue
        with torch.no_grad():
            for p in probe.parameters():
                p.zero_()
            last = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.bias.fill_(float(torch.logit(torch.tensor(probability))))
    scores = torch.linspace(0, 1, 200, dtype=torch.float64)
    return Lynx(config, probe, Calibration(scores=scores, safe=scores > 0.5, question=torch.arange(200)),
                shadow=shadow, confidence=0.9)


def _mark(family, check):
    reason = KNOWN.get((family, check))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def cases(check):
    return [pytest.param(f, d, id=f"{f}-{d}", marks=_mark(f, check)) for f in FAMILIES for d in DTYPES]


@pytest.mark.parametrize("family, dtype", cases("capture"))
def test_capture_equals_output_hidden_states(family, dtype, tok):
    model = tiny(family, dtype, tok)
    n = model.config.num_hidden_layers
    ids = tok([PROMPT + SCRIPT[:20]], return_tensors="pt", add_special_tokens=False).to(DEVICE)
    with torch.no_grad(), HiddenStateCapture(model, layers=(1, n), last_only=False) as capture:
        hidden = model(**ids, output_hidden_states=True).hidden_states
        assert torch.equal(capture._states[0], hidden[1]) and torch.equal(capture._states[1], hidden[n])


@pytest.mark.parametrize("family, dtype", cases("shadow"))
def test_shadow_mode_is_token_identical_to_plain_generate(family, dtype, tok):
    model = tiny(family, dtype, tok)
    inputs = tok([PROMPT, "<think>\nHmm, wait."], return_tensors="pt", padding=True, add_special_tokens=False).to(DEVICE)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    plain = model.generate(**inputs, **kwargs)
    lynx = bundle(model, shadow=True).attach(model, tok)
    try:
        shadowed = model.generate(**inputs, stopping_criteria=[lynx.stopper()], **kwargs)
    finally:
        lynx.detach()
    assert torch.equal(plain, shadowed)


@pytest.mark.parametrize("family, dtype", cases("answer"))
def test_stop_mode_and_answer_equal_the_reprefilled_exit(family, dtype, tok):
    """Row 0 exits at its first cue, row 1 (no cue) runs to the end: `answer` narrows the cache to row 0."""
    model = tiny(family, dtype, tok)
    prompt = tok([PROMPT, PROMPT], return_tensors="pt", add_special_tokens=False).to(DEVICE)
    scripts = [tok(text, add_special_tokens=False).input_ids for text in (SCRIPT, SCRIPT_WITHOUT_CUES)]
    lynx = bundle(model, shadow=False, probability=0.999).attach(model, tok)
    try:
        out = model.generate(**prompt, logits_processor=[ForceScript(scripts, prompt.input_ids.shape[1])],
                             stopping_criteria=[lynx.stopper()], max_new_tokens=len(scripts[1]), do_sample=False,
                             return_dict_in_generate=True)
        record = lynx.last_exits[0]
        assert record.exited and record.cue == "wait" and not lynx.last_exits[1].exited
        cut = exit_cut(record.position, record.start, lynx.config.exit_construction)
        fresh = answer_after_exit(model, tok, out.sequences[:1, :cut], [cut], lynx.exit_ids, max_new_tokens=8)[0]
        cached = lynx.answer(out, max_new_tokens=8)[0]
    finally:
        lynx.detach()
    if dtype == "bfloat16" and DEVICE.type != "cpu":
        # A cache written one decoding step at a time rounds differently from one prefill forward, and in bfloat16
        # on a GPU that can flip a later greedy choice between near-tied tokens (benchmarks/answer_paths.py
        # measures how often): the answers must start alike.
        assert cached.token_ids[:2] == fresh.token_ids[:2]
    else:
        assert cached.token_ids == fresh.token_ids


@pytest.mark.parametrize("family, dtype", cases("stream"))
def test_in_stream_mode_forces_the_exit_text_after_the_cue(family, dtype, tok):
    model = tiny(family, dtype, tok)
    prompt = tok(PROMPT, return_tensors="pt", add_special_tokens=False).to(DEVICE)
    script = tok(SCRIPT, add_special_tokens=False).input_ids
    lynx = bundle(model, shadow=False, probability=0.999).attach(model, tok)
    try:
        out = model.generate(**prompt, logits_processor=[ForceScript([script], prompt.input_ids.shape[1]),
                                                         lynx.exit_processor()],
                             max_new_tokens=len(script) + 8, do_sample=False)
        record = lynx.last_exits[0]
    finally:
        lynx.detach()
    # The token after the cue showed that the word ended (the calibrated event); the exit text follows it.
    generated = out[0, record.position + 2: record.position + 2 + len(lynx.exit_ids)].tolist()
    assert record.exited and generated == lynx.exit_ids
