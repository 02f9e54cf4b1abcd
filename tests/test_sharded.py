"""Models spread over devices with accelerate (here: CPU + disk offload): hooks, probe and exits are unchanged."""

import copy

import pytest
import torch
from accelerate import dispatch_model

from lynx_hf.runtime.capture import HiddenStateCapture
from scripted import PROMPT, SCRIPT, ScriptProcessor, bundle, scripted_model


@pytest.fixture(scope="module")
def models(smollm2_tokenizer, tmp_path_factory):
    model = scripted_model(smollm2_tokenizer)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    sharded = dispatch_model(copy.deepcopy(model), device_map=device_map,
                             offload_dir=str(tmp_path_factory.mktemp("offload")))
    return model, sharded


def test_hooks_on_offloaded_layers_capture_the_same_hidden_states(models):
    model, sharded = models
    ids = torch.randint(100, 2000, (2, 12))
    with HiddenStateCapture(model, (1, 2, 3), last_only=False) as a, \
            HiddenStateCapture(sharded, (1, 2, 3), last_only=False) as b:
        model(ids)
        sharded(ids)
        torch.testing.assert_close(a.features(), b.features())


def test_sharded_model_exits_where_the_unsharded_one_does(models, smollm2_tokenizer):
    tok = smollm2_tokenizer
    model, sharded = models
    enc = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    n = enc.input_ids.shape[1]
    results = []
    for m in (model, sharded):
        torch.manual_seed(0)
        from lynx_hf import LynxProbe

        lynx = bundle(m, tok, probe=LynxProbe(m.config.hidden_size * 2)).attach(m, tok)
        lynx.confidence = 0.5
        out = m.generate(**enc, logits_processor=[ScriptProcessor(tok, [n], [SCRIPT])], stopping_criteria=[lynx.stopper()],
                         max_new_tokens=60, do_sample=False)
        results.append((out, lynx.last_exits[0]))
        lynx.detach()
    (out_a, rec_a), (out_b, rec_b) = results
    assert torch.equal(out_a, out_b)
    assert rec_a.exited == rec_b.exited and rec_a.position == rec_b.position and rec_a.cues_seen == rec_b.cues_seen
