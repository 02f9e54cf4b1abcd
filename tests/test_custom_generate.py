"""The `custom_generate` recipe (`lynx_hf/custom_generate/generate.py`) called directly on a scripted model with
SmolLM2's real tokenizer: which arguments it takes and what its exit records say about rows that end by themselves."""

from __future__ import annotations

import pytest
import torch

import lynx_hf.custom_generate.generate as custom
from forcing import ForceScript
from scripted import PROMPT, bundle, scripted_model


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tok.padding_side = "left"
    model = scripted_model(tok)
    enc = tok([PROMPT, PROMPT], return_tensors="pt", add_special_tokens=False)
    return model, tok, enc


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _custom(model, enc, lynx, scripts, **kwargs):
    options = dict(do_sample=False, max_new_tokens=12, pad_token_id=model.generation_config.pad_token_id,
                   return_dict_in_generate=True)
    return custom.generate(model, input_ids=enc.input_ids, attention_mask=enc.attention_mask, lynx=lynx,
                           logits_processor=[ForceScript(scripts, enc.input_ids.shape[1])], **{**options, **kwargs})


@pytest.mark.parametrize("option", ["max_thinking_tokens", "confidence", "shadow", "guarantee", "revision"])
def test_an_explicit_none_for_a_per_call_option_means_the_bundles_setting(setup, option):
    model, tok, enc = setup
    lynx = bundle(model, tok, probability=0.99).attach(model, tok)
    scripts = [_ids(tok, " so Wait, so so"), _ids(tok, " so so so so")]
    plain = _custom(model, enc, lynx, scripts)
    out = _custom(model, enc, lynx, scripts, **{option: None})
    assert torch.equal(out.sequences, plain.sequences)
    assert out.exits == plain.exits
