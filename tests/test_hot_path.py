"""What a decoding step costs the plug-ins, counted in torch ops (each a kernel launch on a GPU) and host syncs: a
step after which no row has a cue to confirm runs at most 8 ops and never waits for the device, at any batch size,
in stop and in-stream mode; a step that confirms a cue stays within 30 ops besides the probe's own forward."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from forcing import ForceScript
from lynx_hf import Lynx, organism
from lynx_hf.runtime import monitor
from lynx_hf.runtime.plugins import LynxAnswerStopper, LynxExitProcessor, LynxStoppingCriteria

SCRIPT = "So 2 + 3 = 5. Hmm, let me check. Wait, 2 + 3 is 5, and waiting is not a cue. Wait. So 5."
SYNCS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += self.on
        return func(*args, **(kwargs or {}))


class Syncs(TorchFunctionMode):
    def __init__(self, count: Count):
        super().__init__()
        self.count, self.syncs = count, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.syncs += self.count.on and getattr(func, "__name__", "") in SYNCS
        return func(*args, **(kwargs or {}))


def _per_step(monkeypatch, mode: str, batch: int):
    """[(ops, syncs, confirming?)] per decoding step of a shadow run over a script full of cues."""
    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, shadow=True)
    count = Count()
    syncs = Syncs(count)
    steps: dict[int, list] = {}
    probe_ops = []

    def counted(cls, name, key):
        original = getattr(cls, name)

        def wrapped(*args, **kwargs):
            ops, synced = count.ops, syncs.syncs
            count.on = True
            try:
                return original(*args, **kwargs)
            finally:
                count.on = False
                row = steps.setdefault(key(args), [0, 0, False])
                row[0] += count.ops - ops
                row[1] += syncs.syncs - synced

        monkeypatch.setattr(cls, name, wrapped)

    counted(LynxStoppingCriteria, "step", lambda a: a[1].shape[1])
    counted(LynxExitProcessor, "__call__", lambda a: a[1].shape[1] + 1)
    counted(LynxAnswerStopper, "__call__", lambda a: a[1].shape[1])
    decide = monitor.GenerateCall._decide

    def marking(call, *args):
        steps.setdefault(call.sequences.shape[1] + (call.mode == "stream"), [0, 0, False])[2] = True
        return decide(call, *args)

    monkeypatch.setattr(monitor.GenerateCall, "_decide", marking)
    enc = tok([organism.prompt(tok, "What is 2 + 3?")] * batch, return_tensors="pt")
    script = tok(SCRIPT, add_special_tokens=False).input_ids
    force = ForceScript([script] * batch, enc.input_ids.shape[1])
    plug = (dict(logits_processor=[force], stopping_criteria=[lynx.stopper()]) if mode == "stop" else
            dict(logits_processor=[force, lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()]))
    predict = lynx.probe.predict_proba

    def probe(features):
        ops = count.ops
        out = predict(features)
        probe_ops.append(count.ops - ops)
        return out

    monkeypatch.setattr(lynx.probe, "predict_proba", probe)
    with count, syncs, torch.no_grad():
        model.generate(**enc, **plug, max_new_tokens=len(script), do_sample=False)
    assert lynx.last_exits[0].cues_seen == 3  # Hmm, Wait, Wait ("waiting" is no cue)
    rows = [tuple(steps[k]) for k in sorted(steps)[1:]]  # the first step also reads the prompt
    return rows, probe_ops


@pytest.mark.parametrize("mode", ["stop", "stream"])
@pytest.mark.parametrize("batch", [1, 32])
def test_a_step_without_a_cue_to_confirm_costs_at_most_8_ops_and_no_host_sync(monkeypatch, mode, batch):
    steps, probe_ops = _per_step(monkeypatch, mode, batch)
    quiet = [(ops, syncs) for ops, syncs, confirming in steps if not confirming]
    assert len(quiet) > 0.8 * len(steps)
    assert max(ops for ops, _ in quiet) <= 8 and max(syncs for _, syncs in quiet) == 0


@pytest.mark.parametrize("mode", ["stop", "stream"])
def test_a_step_that_confirms_a_cue_costs_at_most_30_ops_besides_the_probe_and_no_host_sync(monkeypatch, mode):
    steps, probe_ops = _per_step(monkeypatch, mode, 8)
    confirming = [(ops, syncs) for ops, syncs, confirming in steps if confirming]
    # One probe forward per step after a completed cue word, batched across rows: the three cues and "wait" in
    # "waiting" (the next token shows that the word goes on).
    assert len(confirming) == len(probe_ops) == 4
    assert max(ops - probe for (ops, _), probe in zip(confirming, probe_ops)) <= 30
    assert max(syncs for _, syncs in confirming) == 0
