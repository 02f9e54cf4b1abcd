"""A scripted reasoning model for plug-in tests: a tiny random Llama on SmolLM2's real BPE tokenizer whose output
is forced token by token, so cue positions are known, and Lynx bundles with probes of known behaviour."""

from __future__ import annotations

import sys

import torch
from transformers import LogitsProcessor

from conftest import tiny_llama
from lynx_hf import DEFAULT_EXIT_TEXT, Calibration, Lynx, LynxConfig, LynxProbe
from lynx_hf.runtime.config import model_fingerprint, tokenizer_fingerprint

PROMPT = "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n<think>\n"
SCRIPT = "3 + 4 = 7. Wait, is that right? Yes, 7. Hmm, let me check: 7 - 4 = 3.\n</think>\n\nFinal Answer: \\boxed{7}"
ANSWER = "7}"


class ScriptProcessor(LogitsProcessor):
    """Forces each row to write `script` after its prompt; a row that left the script (e.g. Lynx forced an exit)
    is then forced to write `answer` and EOS. With `model_logits=True` it also overwrites this step's forward output
    in generate's loop (`outputs.logits`), so that the model's own logits follow the script and what reads those
    (Lynx's in-stream greedy answer) does too."""

    def __init__(self, tokenizer, prompt_lengths, scripts, answer=ANSWER, exit_len: int = 0,
                 model_logits: bool = False):
        self.exit_len = exit_len
        self.model_logits = model_logits
        self.prompt_lengths = prompt_lengths
        self.scripts = [tokenizer(s, add_special_tokens=False).input_ids for s in scripts]
        self.answer = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        for row in range(input_ids.shape[0]):
            generated = input_ids[row, self.prompt_lengths[row]:].tolist()
            script = self.scripts[row]
            if generated == script[: len(generated)]:
                token = script[len(generated)] if len(generated) < len(script) else self.answer[-1]
            else:
                diverged = next((i for i, (a, b) in enumerate(zip(generated, script)) if a != b), len(script))
                done = len(generated) - diverged - self.exit_len
                token = self.answer[min(max(done, 0), len(self.answer) - 1)]
            forced[row, token] = 0.0
        if self.model_logits:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name != "_sample":
                frame = frame.f_back
            assert frame is not None, "model_logits=True needs generate's sampling loop"
            frame.f_locals["outputs"].logits[:, -1] = forced.to(frame.f_locals["outputs"].logits.dtype)
        return forced


def scripted_model(tokenizer, seed: int = 0):
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed, num_hidden_layers=3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model


def constant_probe(feature_size: int, probability: float) -> LynxProbe:
    """A probe that scores every cue `probability`."""
    probe = LynxProbe(feature_size)
    with torch.no_grad():
        for module in probe.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
        last = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.fill_(float(torch.logit(torch.tensor(probability, dtype=torch.float64))))
    return probe


def calibration(n: int = 200, seed: int = 0) -> Calibration:
    """Calibration scores where unsafe cues score low and safe ones high."""
    g = torch.Generator().manual_seed(seed)
    safe = torch.rand(n, generator=g) < 0.5
    scores = torch.where(safe, 0.5 + 0.5 * torch.rand(n, generator=g), 0.6 * torch.rand(n, generator=g))
    return Calibration(scores=scores.double(), safe=safe, question=torch.arange(n) // 2)


def bundle(model, tokenizer, probe: LynxProbe | None = None, probability: float = 0.99, layers=(1, 3), **options):
    # SmolLM2 has no thinking tokens: the scripts spell "<think>"/"</think>" out, so the markers are explicit.
    config = LynxConfig(
        base_model="tests/scripted", layers=list(layers), hidden_size=model.config.hidden_size,
        think_start="<think>", think_end="</think>", exit_text=DEFAULT_EXIT_TEXT,
        model_fingerprint=model_fingerprint(model), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    probe = probe or constant_probe(config.feature_size, probability)
    return Lynx(config, probe, calibration(), **options)
