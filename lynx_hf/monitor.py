"""The online side of LYNX: per-row cue tracking, probe scoring and exit decisions inside `model.generate`.

Timeline of one `_sample` step: forward on the last token (the hooks capture its hidden state) → logits processors
→ sample → append → stopping criteria. A cue sampled at step t has its hidden state computed by the forward of step
t+1, so the decision comes one step after the cue is emitted: the stopping criterion sees it together with the next
token (which also confirms that the cue word ended), the logits processor sees it before the next token is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .capture import HiddenStateCapture
from .conformal import float32_threshold
from .errors import UnsupportedGenerationError

if TYPE_CHECKING:
    from .bundle import Lynx


@dataclass(frozen=True)
class ExitRecord:
    """What happened to one row in the last `generate` call.

    `would_exit` says whether the exit rule fired; `exited` whether the plug-in acted on it (never in shadow mode).
    `position` is the index (in the returned sequence) of the token that completed that cue, `start` the index of
    the cue word's first token; -1 and None when the rule never fired.
    """

    exited: bool
    would_exit: bool
    position: int
    start: int
    cue: str | None
    score: float | None
    threshold: float
    cues_seen: int
    shadow: bool


class ModelTap:
    """Hooks on the attached model: hidden-state capture plus a pre-hook that notices each new generation.

    A forward with an empty KV cache is a prefill, i.e. a new `generate` call: plug-ins reset their per-row state
    when they see the generation counter move. A forward that feeds several tokens on top of a cache is assisted or
    speculative decoding, which the plug-ins cannot follow.
    """

    def __init__(self, model, layers, device=None):
        self.capture = HiddenStateCapture(model, layers, last_only=True, device=device)
        self.generation = 0
        self.prompt_mask: torch.Tensor | None = None
        self.forward_batch: int | None = None
        self.multi_token_step = False
        self._last_length = -1
        self._handle = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        length = ids.shape[1] if ids is not None else 0
        # Without a cache (use_cache=False) every step re-feeds the whole sequence, one token longer each time.
        uncached_step = cache is None and length == self._last_length + 1
        if past == 0 and not uncached_step:
            self.generation += 1
            self.prompt_mask = kwargs.get("attention_mask")
            self.multi_token_step = False
        elif past > 0 and length > 1:
            self.multi_token_step = True
        self._last_length = past + length
        if ids is not None:
            self.forward_batch = ids.shape[0]

    def remove(self) -> None:
        self.capture.remove()
        self._handle.remove()


class ExitMonitor:
    """Per-row state of one plug-in across a `generate` call; resets itself when a new call starts.

    `mode="stop"` confirms each cue with the token after it (stopping-criteria timing); `mode="stream"` decides as
    soon as the cue's hidden state exists (logits-processor timing).
    """

    def __init__(self, lynx: "Lynx", mode: Literal["stop", "stream"]):
        self.lynx = lynx
        self.mode = mode
        self._generation = -1
        self._consumed = 0
        self.batch = 0

    def _tap(self) -> ModelTap:
        return self.lynx._require_tap()

    def _reset(self, input_ids: torch.LongTensor, tap: ModelTap) -> None:
        device = input_ids.device
        batch = input_ids.shape[0]
        prompt_len = input_ids.shape[1] - (1 if self.mode == "stop" else 0)
        mask = tap.prompt_mask
        if mask is not None and (mask.shape[0] != batch or mask.shape[1] != prompt_len):
            mask = None
        detector = self.lynx.detector.to(device)
        self.state = detector.start(input_ids[:, :prompt_len], mask)
        self._generation = tap.generation
        self.lynx._active = self
        self._consumed = prompt_len
        self.prompt_length = prompt_len
        self.batch = batch
        long = dict(dtype=torch.long, device=device)
        self.pending_cue = torch.full((batch,), -1, **long)
        self.pending_start = torch.full((batch,), -1, **long)
        self.exited = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exit_position = torch.full((batch,), -1, **long)
        self.exit_start = torch.full((batch,), -1, **long)
        self.exit_cue = torch.full((batch,), -1, **long)
        self.exit_score = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        self.cues_seen = torch.zeros(batch, **long)
        self.threshold = self.lynx.threshold
        self._tau = torch.tensor(float32_threshold(self.threshold), dtype=torch.float32, device=device)

    def _check_supported(self, input_ids: torch.LongTensor, tap: ModelTap) -> None:
        if tap.multi_token_step:
            raise UnsupportedGenerationError(
                "Lynx cannot follow assisted/speculative decoding or prompt lookup (several tokens per forward): "
                "drop `assistant_model`/`prompt_lookup_num_tokens` from this generate call."
            )
        if tap.forward_batch is not None and input_ids.shape[0] != tap.forward_batch:
            raise UnsupportedGenerationError(
                f"Lynx got {input_ids.shape[0]} rows but the model ran on {tap.forward_batch}: beam search (and other "
                "modes that reorder rows) is not supported. Use greedy or sampling (num_beams=1)."
            )

    def observe(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Consume the tokens appended since the last call; return this step's exit decisions `[batch]` (bool)."""
        tap = self._tap()
        self._check_supported(input_ids, tap)
        if tap.generation != self._generation or input_ids.shape[0] != self.batch:
            self._reset(input_ids, tap)
        length = input_ids.shape[1]
        new = length - self._consumed
        if new == 0:
            return torch.zeros_like(self.exited)
        if new != 1:
            raise UnsupportedGenerationError(
                f"Lynx expected one new token per step but got {new}: assisted/speculative decoding and other "
                "multi-token modes are not supported; use greedy or sampling without `assistant_model`."
            )
        detector = self.lynx.detector
        token = input_ids[:, -1]
        cue, start = detector.step(self.state, token)
        self._consumed = length
        if self.mode == "stop":
            # The cue completed at the previous token; its hidden state was computed by this step's forward and
            # the token just appended tells whether the cue word really ended there.
            event_cue = torch.where(self.state.retracted, -1, self.pending_cue)
            event_start = self.pending_start
            position = length - 2
            self.pending_cue, self.pending_start = cue, start
        else:
            event_cue, event_start, position = cue, start, length - 1
        event = event_cue >= 0
        score = self.lynx.probe.predict_proba(tap.capture.features()).to(event.device, torch.float32)
        decide = event & ~self.exited & (score >= self._tau)
        self.cues_seen += event.long()
        self.exited |= decide
        self.exit_position = torch.where(decide, position, self.exit_position)
        self.exit_start = torch.where(decide, event_start, self.exit_start)
        self.exit_cue = torch.where(decide, event_cue, self.exit_cue)
        self.exit_score = torch.where(decide, score, self.exit_score)
        return decide

    def records(self, shadow: bool) -> list[ExitRecord]:
        """Per-row telemetry of the last call."""
        if self._generation < 0:
            return []
        cues = self.lynx.detector.cues
        rows = zip(self.exited.tolist(), self.exit_position.tolist(), self.exit_start.tolist(),
                   self.exit_cue.tolist(), self.exit_score.tolist(), self.cues_seen.tolist())
        return [
            ExitRecord(
                exited=bool(exited) and not shadow, would_exit=bool(exited), position=pos, start=start, cue=cues[cue] if cue >= 0 else None,
                score=score if exited else None, threshold=self.threshold, cues_seen=seen, shadow=shadow,
            )
            for exited, pos, start, cue, score, seen in rows
        ]
