"""Rollout engines: the transformers default, and the vLLM hybrid (vLLM samples, transformers labels).

vLLM needs a CUDA GPU and is not installed here, so these tests stand a fake `vllm` module in its place that
keeps to the API the backend uses (`LLM.generate(list of TokensPrompt dicts, sampling_params=[...],
use_tqdm=False)`, `SamplingParams(n, temperature, top_p, max_tokens, seed, stop_token_ids,
skip_special_tokens)`, `RequestOutput.outputs[0].token_ids`, `LLM.get_tokenizer()`) and samples with the
organism. What they prove: the hybrid plumbing (ids in, ids out, per-request seeds, EOS cut, length limit) gives
exactly the event table the transformers path gives for the same traces. What they cannot prove: that a real
vLLM build accepts these calls; that needs a GPU session (see README).
"""

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from lynx_hf import organism
from lynx_hf.evaluation.live_rules import regenerate
from lynx_hf.pipeline.collect import Collector
from lynx_hf.pipeline.rollout import TransformersRollout, VllmRollout, cut_at_eos, request_seed

pytestmark = pytest.mark.skipif(not (organism.MODEL_DIR / "config.json").exists(), reason="organism not trained")


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: list = field(default_factory=list)
    skip_special_tokens: bool = True


class FakeLLM:
    """Serves the organism like vLLM would: one request at a time, its own seed, stop ids included in output."""

    def __init__(self, model=None, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.calls = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        self.calls.append((prompts, sampling_params))
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            assert set(prompt) == {"prompt_token_ids"}, "the backend must send token ids, never text"
            ids = torch.tensor([prompt["prompt_token_ids"]])
            torch.manual_seed(params.seed)
            sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) \
                if params.temperature > 0 else dict(do_sample=False)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                                      eos_token_id=params.stop_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                                      **sampling)
            completion = types.SimpleNamespace(token_ids=out[0, ids.shape[1]:].tolist(), finish_reason="stop")
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


@pytest.fixture(scope="module")
def organism_pair():
    return organism.load()


def make_collector(model, tok, rollout=None, temperature=0.0):
    return Collector(model, tok, layers=(2, 4), prompt_fn=organism.prompt, max_new_tokens=300,
                     temperature=temperature, rollout=rollout)


def test_vllm_rollout_gives_the_transformers_event_table_for_the_same_traces(fake_vllm, organism_pair):
    """Each greedy vLLM trace is the transformers greedy trace of its prompt, and labelling it gives the events,
    features and forced answers the transformers collector computes for it."""
    model, tok = organism_pair
    problems = organism.problems("arithmetic", "train", n=4, seed=7)
    hybrid = make_collector(model, tok, VllmRollout(FakeLLM(model, tok))).collect_batch(problems, seed=0)
    hf = make_collector(model, tok)
    assert len(hybrid) > 0
    for t, trace in enumerate(hybrid.traces):
        ids, n = trace["token_ids"], trace["prompt_length"]
        assert ids[n:] == hf.rollout.generate([ids[:n]], seed=0, temperature=0, top_p=1.0, max_new_tokens=300,
                                              eos_token_ids=[tok.eos_token_id])[0]
        events, features, answers = hf.label_trace(ids, n)
        rows = hybrid.trace == t
        assert hybrid.position[rows].tolist() == [e.position for e in events]
        assert torch.equal(hybrid.features[rows], features)
        assert [a for a, r in zip(hybrid.answers, rows) if r] == [a.answer for a in answers]
    assert hybrid.settings["rollout"] == "vllm" and hf.settings["rollout"] == "transformers"
    assert {k: v for k, v in hybrid.settings.items() if k != "rollout"} == \
        {k: v for k, v in hf.settings.items() if k != "rollout"}


def test_vllm_requests_carry_the_collection_settings_and_one_seed_each(fake_vllm, organism_pair):
    model, tok = organism_pair
    llm = FakeLLM(model, tok)
    collector = make_collector(model, tok, VllmRollout(llm), temperature=0.6)
    traces = collector.sample(organism.problems("arithmetic", "train", n=3, seed=7), seed=11)
    (requests, params), = llm.calls
    assert [r["prompt_token_ids"] for r in requests] == [ids[:n] for ids, n in traces]
    assert [p.seed for p in params] == [request_seed(11, row) for row in range(3)]
    assert len({p.seed for p in params}) == 3
    assert all(p.temperature == 0.6 and p.top_p == 0.95 and p.max_tokens == 300 for p in params)
    assert all(p.stop_token_ids == [tok.eos_token_id] for p in params)
    assert all(tok.eos_token_id not in ids[n:] for ids, n in traces)
    again = make_collector(model, tok, VllmRollout(FakeLLM(model, tok)), temperature=0.6)
    assert again.sample(organism.problems("arithmetic", "train", n=3, seed=7), seed=11) == traces


def test_a_model_id_builds_the_engine_with_the_engine_options(fake_vllm, organism_pair):
    rollout = VllmRollout("some/model", tokenizer=None)
    assert isinstance(rollout.llm, FakeLLM)


def test_an_engine_serving_another_model_is_refused(fake_vllm, organism_pair, smollm2_tokenizer):
    model, tok = organism_pair
    with pytest.raises(ValueError, match="serves another model"):
        make_collector(model, tok, VllmRollout(FakeLLM(model, smollm2_tokenizer)))


def test_without_vllm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError, match=r"lynx-hf\[vllm\]"):
        VllmRollout("some/model")


def test_live_methods_refuse_traces_that_transformers_did_not_sample(fake_vllm, organism_pair):
    model, tok = organism_pair
    problems = organism.problems("arithmetic", "train", n=1, seed=7)
    table = make_collector(model, tok, VllmRollout(FakeLLM(model, tok))).collect_batch(problems, seed=0)
    table.settings = {**table.settings, "seed": 0, "batch_size": 1}
    with pytest.raises(ValueError, match="sampled by vllm"):
        regenerate(model, tok, table, [0], seed=0)


def test_transformers_rollout_cuts_at_eos_and_pads_left(organism_pair):
    model, tok = organism_pair
    prompts = [tok(organism.prompt(tok, p["question"]), add_special_tokens=False)["input_ids"]
               for p in organism.problems("arithmetic", "test", n=2, seed=3)]
    rollout = TransformersRollout(model, pad_token_id=tok.pad_token_id)
    batched = rollout.generate(prompts, seed=0, temperature=0, top_p=1.0, max_new_tokens=300,
                               eos_token_ids=[tok.eos_token_id])
    for prompt, generated in zip(prompts, batched):
        alone = rollout.generate([prompt], seed=0, temperature=0, top_p=1.0, max_new_tokens=300,
                                 eos_token_ids=[tok.eos_token_id])[0]
        assert generated == alone and tok.eos_token_id not in generated
    assert cut_at_eos([5, 6, 2, 7], [2, 9]) == [5, 6]


def test_cli_vllm_rollout_without_vllm_fails_with_the_install_command(monkeypatch, capsys):
    from lynx_hf.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "vllm", None)
    rc = cli_main(["collect", "--model", "organism", "--problems", "organism:arithmetic:train", "--n", "2",
                   "--out", "unused", "--rollout", "vllm"])
    assert rc == 2 and "lynx-hf[vllm]" in capsys.readouterr().err
