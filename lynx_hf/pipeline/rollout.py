"""Rollout engines: who samples the long traces that `collect` labels.

Collection has two costs: sampling long traces (thousands of tokens per problem) and, per trace, one
teacher-forced forward plus a short forced-exit answer per cue. The second must run in transformers (it reads
hidden states at chosen layers and reuses the KV cache); the first can run anywhere that returns token ids.

- `TransformersRollout` (default): `model.generate`, the same model that labels.
- `VllmRollout` (`pip install 'lynx-hf[vllm]'`): a vLLM engine samples, transformers labels, as the reference
  code's hybrid builder does. Prompts go in and traces come out as **token ids**, never text, so the trace that
  is labelled is exactly the one that was sampled (re-tokenising decoded text can change token boundaries and
  shift every cue position).

Both return, for each prompt, the generated ids up to (not including) the first end-of-sequence token.
Seeds are per call (the collector seeds each shard); vLLM gets one seed per request, so its traces do not depend
on how requests are batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class Rollout(Protocol):
    """Samples one continuation per prompt (token ids in, token ids out)."""

    name: str

    def generate(self, prompts: Sequence[list[int]], *, seed: int, temperature: float, top_p: float,
                 max_new_tokens: int, eos_token_ids: Sequence[int]) -> list[list[int]]:
        """Generated ids for each prompt, cut before the first token in `eos_token_ids`."""


def cut_at_eos(generated: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
    """`generated` up to (not including) its first end-of-sequence token."""
    eos = set(eos_token_ids)
    out = []
    for token in generated:
        if token in eos:
            break
        out.append(int(token))
    return out


def left_pad(sequences: Sequence[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` for id lists of different lengths, padded on the left.

    Example:
        >>> left_pad([[5, 6], [7]], pad_token_id=0)
        (tensor([[5, 6],
                [0, 7]]), tensor([[1, 1],
                [0, 1]]))
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


class TransformersRollout:
    """Samples with `model.generate` (left-padded batch, `torch.manual_seed(seed)` before the call).

    Example:
        >>> from lynx_hf import organism
        >>> from lynx_hf.pipeline.rollout import TransformersRollout
        >>> model, tok = organism.load()
        >>> prompt = tok(organism.prompt(tok, organism.problems("arithmetic", "test", 1)[0]["question"]),
        ...              add_special_tokens=False)["input_ids"]
        >>> out = TransformersRollout(model, pad_token_id=tok.pad_token_id).generate(
        ...     [prompt], seed=0, temperature=0.6, top_p=0.95, max_new_tokens=8, eos_token_ids=[tok.eos_token_id])
        >>> len(out[0])
        8
    """

    name = "transformers"

    def __init__(self, model, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id

    def generate(self, prompts: Sequence[list[int]], *, seed: int, temperature: float, top_p: float,
                 max_new_tokens: int, eos_token_ids: Sequence[int]) -> list[list[int]]:
        out, width = self.sequences(prompts, seed=seed, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens)
        return [cut_at_eos(row, eos_token_ids) for row in out[:, width:].tolist()]

    @torch.no_grad()
    def sequences(self, prompts: Sequence[list[int]], *, seed: int, temperature: float, top_p: float,
                  max_new_tokens: int, **generate_kwargs) -> tuple[torch.Tensor, int]:
        """The raw `generate` output for left-padded `prompts` and the padded prompt width; `generate_kwargs`
        (plug-ins such as `stopping_criteria`) go to `model.generate`, which draws the same random numbers."""
        input_ids, attention_mask = left_pad(prompts, self.pad_token_id, next(self.model.parameters()).device)
        width = input_ids.shape[1]
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if temperature == 0:
            sampling = dict(do_sample=False)
        torch.manual_seed(seed)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  max_new_tokens=max_new_tokens, pad_token_id=self.pad_token_id, **sampling,
                                  **generate_kwargs)
        return out, width


class VllmRollout:
    """Samples with a vLLM engine; transformers still computes features and forced exits.

    `llm` is a `vllm.LLM` serving the same weights as the transformers model, or a model id / folder from which
    one is built with `engine_kwargs` (leave GPU memory for the transformers copy, e.g.
    `gpu_memory_utilization=0.5`). Requires `pip install 'lynx-hf[vllm]'` and a GPU.

    Example (on a GPU machine):

    ```python
    from lynx_hf.pipeline.collect import Collector
    from lynx_hf.pipeline.rollout import VllmRollout

    rollout = VllmRollout("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", gpu_memory_utilization=0.5)
    collector = Collector(model, tokenizer, rollout=rollout)
    table = collector.collect(problems, "events/train")
    ```
    """

    name = "vllm"

    def __init__(self, llm: Any, **engine_kwargs):
        vllm = import_vllm()
        self.sampling_params_class = vllm.SamplingParams
        self.llm = vllm.LLM(model=str(llm), **engine_kwargs) if isinstance(llm, str) else llm

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if the engine's vocabulary differs from `tokenizer`'s (then it serves another model)."""
        engine_vocab = self.llm.get_tokenizer().get_vocab()
        if engine_vocab != tokenizer.get_vocab():
            raise ValueError(
                "The vLLM engine's tokenizer differs from the transformers tokenizer, so it serves another model "
                "and its traces would be labelled with the wrong hidden states: build the engine from the same "
                "model id or folder as the transformers model."
            )

    def generate(self, prompts: Sequence[list[int]], *, seed: int, temperature: float, top_p: float,
                 max_new_tokens: int, eos_token_ids: Sequence[int]) -> list[list[int]]:
        params = [
            self.sampling_params_class(
                n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_new_tokens,
                seed=request_seed(seed, row), stop_token_ids=list(eos_token_ids), skip_special_tokens=False,
            )
            for row in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": list(prompt)} for prompt in prompts]  # a vllm TokensPrompt
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts.")
        return [cut_at_eos(output.outputs[0].token_ids, eos_token_ids) for output in outputs]


def request_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a call seeded with `seed` (vLLM takes one per request)."""
    return (seed * 1_000_003 + row) % (2**31 - 1)


def import_vllm():
    """`vllm`, or an ImportError that says how to install it."""
    from ..errors import MissingExtraError

    try:
        import vllm
    except ImportError as error:
        raise MissingExtraError(
            "The vLLM rollout needs vLLM: `pip install 'lynx-hf[vllm]'` on a machine with a CUDA GPU, or leave "
            "rollout= unset to sample with transformers."
        ) from error
    return vllm
