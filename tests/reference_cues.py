"""The cue detector as it was before the token automaton (issue 21): a per-row character buffer matched against the
cue words with tensor ops at every step. Kept as the executable reference the automaton in `lynx_hf/runtime/cues.py`
must agree with, event for event and state for state (`tests/test_cue_table.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lynx_hf.runtime.cue_table import pattern_reach
from lynx_hf.runtime.cues import DEFAULT_CUES, MAX_TOKEN_CHARS, CueDetector


@dataclass
class ReferenceState:
    in_think: torch.Tensor
    chars: torch.Tensor
    char_pos: torch.Tensor
    char_think: torch.Tensor
    length: int
    pending: torch.Tensor = field(default=None)  # type: ignore[assignment]
    retracted: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.pending is None:
            self.pending = torch.zeros_like(self.in_think)
        if self.retracted is None:
            self.retracted = torch.zeros_like(self.in_think)

    @property
    def batch_size(self) -> int:
        return self.in_think.shape[0]


class ReferenceCueDetector(CueDetector):
    """The character-buffer matcher, on the same token texts and character codes as `CueDetector` (whose `start`
    and `step` it replaces; `find_events_batch` runs them)."""

    def __init__(self, tokenizer, cues: Sequence[str] = DEFAULT_CUES, think_start: str | None = "<think>",
                 think_end: str | None = "</think>") -> None:
        super().__init__(tokenizer, cues=cues, think_start=think_start, think_end=think_end)
        # Patterns: cues first, then the markers (matched without word boundaries).
        patterns = list(self.cues) + [m for m in (self._start_text, self._end_text) if m]
        self._open_index = len(self.cues) if self._start_text else -1
        self._close_index = len(patterns) - 1 if self._end_text else -1
        longest = max(len(p) for p in patterns)
        cap = max(1, min(MAX_TOKEN_CHARS, max(len(s) for s in self._strings)))
        tails = [s[-cap:] for s in self._strings]
        # Only the last M characters of each new token are matched, so the buffer holds M + longest characters.
        self._match_slots = pattern_reach(tails, patterns, len(self.cues)) + 1
        assert self.buffer_chars == self._match_slots + longest
        width = self.max_token_chars
        self._longest = longest
        window = longest + 2  # left neighbour + pattern + right neighbour
        self._is_letter = torch.tensor(self._is_letter, dtype=torch.bool)
        self._table = torch.from_numpy(self._char_codes(tails, width))

        # Pattern table [P, window], right-aligned before the right-neighbour slot.
        pat = torch.zeros(len(patterns), window, dtype=torch.long)
        mask = torch.zeros(len(patterns), window, dtype=torch.bool)
        for p, text in enumerate(patterns):
            pat[p, window - 1 - len(text): window - 1] = torch.tensor([self._codes[c] for c in text])
            mask[p, window - 1 - len(text): window - 1] = True
        self._patterns = pat
        self._pattern_free = ~mask  # window slots a pattern does not constrain
        self._boundary = torch.zeros(len(self.cues), window, dtype=torch.bool)  # each cue's two neighbour slots
        self._boundary[torch.arange(len(self.cues)), window - 2 - self._cue_lengths] = True
        self._boundary[:, -1] = True

        # Index tables that depend only on the new token's length n (so `step` does one lookup, no arange).
        buf, slots = self.buffer_chars, self._match_slots
        n = torch.arange(width + 1)[:, None]
        virtual = torch.arange(buf)[None, :] + n  # new buffer = virtual slots n .. n + W - 1 of old ++ new chars
        self._shift_index = virtual + (virtual >= buf) * (width - n)  # [width + 1, W] into cat(old, new row)
        self._new_in_buffer = virtual >= buf  # [width + 1, W]
        self._new_in_region = self._new_in_buffer[:, buf - slots:]  # [width + 1, M]
        self._region = torch.arange(slots)

    def start(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ReferenceState:
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [batch, length], got shape {tuple(prompt_ids.shape)}; "
                             "add a batch dimension with prompt_ids[None].")
        batch, length = prompt_ids.shape
        width = self.buffer_chars
        rows = prompt_ids.tolist()
        masks = attention_mask.bool().tolist() if attention_mask is not None else None
        in_think = []
        chars = torch.zeros(batch, width, dtype=torch.long)
        char_pos = torch.full((batch, width), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            pieces = []
            for t, token in enumerate(row):
                if masks is not None and not masks[b][t]:
                    continue
                pieces.append((t, self._strings[token] if 0 <= token < self.vocab_size else ""))
            text = "".join(s for _, s in pieces)
            if self._start_text is None:
                opened = self._end_text is None or self._end_text not in text
            else:
                opened = text.rfind(self._start_text) >= 0 and (
                    self._end_text is None or text.rfind(self._start_text) > text.rfind(self._end_text)
                )
            in_think.append(opened)
            tail_codes: list[int] = []
            tail_pos: list[int] = []
            for t, s in reversed(pieces):
                if len(tail_codes) >= width:
                    break
                tail_codes[:0] = [self._char_code(c) for c in s]
                tail_pos[:0] = [t] * len(s)
            tail_codes, tail_pos = tail_codes[-width:], tail_pos[-width:]
            if tail_codes:
                chars[b, width - len(tail_codes):] = torch.tensor(tail_codes, dtype=torch.long)
                char_pos[b, width - len(tail_pos):] = torch.tensor(tail_pos, dtype=torch.long)
        return ReferenceState(
            in_think=torch.tensor(in_think, dtype=torch.bool, device=self.device),
            chars=chars.to(self.device),
            char_pos=char_pos.to(self.device),
            char_think=torch.zeros(batch, width, dtype=torch.bool, device=self.device),
            length=length,
        )

    def step(self, state: ReferenceState, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = new_tokens.reshape(-1)
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"step got {tokens.shape[0]} tokens for a state of {state.batch_size} rows; pass "
                             "exactly one new token per row (input_ids[:, -1]).")
        buf, slots, longest, n_cues = self.buffer_chars, self._match_slots, self._longest, len(self.cues)
        ids = tokens.clamp(-1, self.vocab_size)  # -1 and V are both the empty row of the table
        n_new = self._lengths[ids].long()  # [B]
        # The previous step's event is void if this token continues its word.
        state.retracted = state.pending & self._continues_ext[ids]

        # Shift the new token's characters in from the right.
        shift = self._shift_index[n_new]  # [B, W]
        new_slot = self._new_in_buffer[n_new]  # [B, W]
        chars = torch.cat([state.chars, self._table[ids].long()], 1).gather(1, shift)
        old = shift.clamp(max=buf - 1)
        char_pos = state.char_pos.gather(1, old).masked_fill(new_slot, state.length)
        think = state.char_think.gather(1, old) & ~new_slot
        # Windows [left neighbour, pattern..., right neighbour] ending at each of the last M slots.
        padded = torch.nn.functional.pad(chars, (0, 1))
        windows = padded[:, buf - slots - longest:].unfold(1, longest + 2, 1)  # [B, M, S]
        match = ((windows[:, :, None, :] == self._patterns) | self._pattern_free).all(-1)  # [B, M, P]
        is_new = self._new_in_region[n_new]  # [B, M]

        # Thinking state after each new character: the last marker completed so far wins.
        code = torch.zeros_like(is_new, dtype=torch.long)
        if self._open_index >= 0:
            code.masked_fill_(match[:, :, self._open_index] & is_new, 1)
        if self._close_index >= 0:
            code.masked_fill_(match[:, :, self._close_index] & is_new, -1)
        last = self._region.masked_fill(code == 0, -1).cummax(1).values
        status = torch.where(last >= 0, code.gather(1, last.clamp(min=0)) > 0, state.in_think[:, None])
        region_think = torch.where(is_new, status, think[:, buf - slots:])
        # New characters left of the region cannot end a marker, so they carry the previous state.
        think = torch.cat([(think | (new_slot & state.in_think[:, None]))[:, : buf - slots], region_think], 1)
        if self._close_index >= 0:
            # The think-end marker's own characters are never cue characters.
            closing = torch.nn.functional.pad(code == -1, (buf - slots, len(self._end_text) - 1))
            think = think & ~closing.unfold(1, len(self._end_text), 1).any(-1)
        state.in_think = status[:, -1]

        # Cues: every character generated inside thinking, non-letters on both sides, ending in the new token.
        think_windows = torch.nn.functional.pad(think, (0, 1))[:, buf - slots - longest:].unfold(1, longest + 2, 1)
        inside = (think_windows[:, :, None, :] | self._pattern_free[:n_cues]).all(-1)  # [B, M, C]
        bounded = (self._is_letter[windows][:, :, None, :] & self._boundary).any(-1)  # a letter on either side
        hit = match[:, :, :n_cues] & inside & ~bounded & is_new[:, :, None]

        flat = hit.reshape(-1, slots * n_cues)
        found = flat.any(1)
        first = flat.to(torch.uint8).argmax(1)  # first hit: earliest end slot, then cue order
        end_slot, cue = first // n_cues, first % n_cues
        start_slot = buf - slots + end_slot - self._cue_lengths[cue] + 1
        cue_start = char_pos.gather(1, start_slot[:, None]).squeeze(1)
        state.pending = found & (end_slot == slots - 1)
        state.chars, state.char_pos, state.char_think = chars, char_pos, think
        state.length += 1
        return cue.masked_fill(~found, -1), cue_start.masked_fill(~found, -1)
