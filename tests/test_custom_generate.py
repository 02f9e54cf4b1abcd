"""The `custom_generate` recipe (`lynx_hf/custom_generate/generate.py`) called directly on a scripted model with
SmolLM2's real tokenizer: which arguments it takes and what its exit records say about rows that end by themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria

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


class _StopRowZeroAfter(StoppingCriteria):
    """A criterion of the user's: ends row 0 once it has `n` generated tokens."""

    def __init__(self, width: int, n: int):
        self.width, self.n = width, n

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[0] = input_ids.shape[1] - self.width >= self.n
        return done


@pytest.mark.parametrize("ending", ["eos", "stop_string", "criterion"])
def test_a_row_that_ended_before_the_budget_is_no_budget_exit_when_a_neighbour_reaches_it(setup, ending):
    model, tok, enc = setup
    width, budget = enc.input_ids.shape[1], 6
    lynx = bundle(model, tok, probability=0.01).attach(model, tok)  # never confident: only the budget acts
    so = _ids(tok, " so")
    options = {}
    if ending == "eos":
        scripts = [so * 3 + [tok.eos_token_id], so * 20]
    elif ending == "stop_string":
        scripts = [so * 2 + _ids(tok, " done") + so * 20, so * 20]
        options = dict(stop_strings=[" done"], tokenizer=tok)
    else:
        scripts = [so * 20, so * 20]
        options = dict(stopping_criteria=[_StopRowZeroAfter(width, 3)])
    out = _custom(model, enc, lynx, scripts, max_thinking_tokens=budget, **options)
    ended, thinker = out.exits
    assert not ended.exited and not ended.would_exit and not ended.by_budget and ended.position == -1
    assert thinker.exited and thinker.by_budget and thinker.position == width + budget - 1
    assert torch.equal(out.sequences[0, width:width + 3], torch.tensor(scripts[0][:3]))  # the tokens were right
