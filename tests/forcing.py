"""`ForceScript`: a logits processor that makes a random-weight model write known token ids, so tests (and the GPU
check, which imports this file) know exactly where the cues are."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class ForceScript(LogitsProcessor):
    """Forces row b to write `scripts[b]` after its prompt (then repeats that script's last token)."""

    def __init__(self, scripts: list[list[int]], prompt_length: int):
        self.scripts, self.prompt_length = scripts, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -float("inf"))
        for row, ids in enumerate(self.scripts):
            forced[row, ids[min(k, len(ids) - 1)]] = 0.0
        return forced
