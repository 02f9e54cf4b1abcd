"""Reflection-cue detection in a generated token stream, for any Hugging Face tokenizer.

LYNX decides whether to exit at *reflection cues*: words such as "Hmm", "Wait" or "Alternatively" that a
reasoning model emits inside its thinking block. [`CueDetector`] finds them incrementally while `generate`
runs, per batch row and on the model's device: the vocabulary and the matching rules are compiled once into a
token automaton, and every step is two table lookups per batch. Nothing is decoded inside the per-token loop.

Matching rules (the specification; `tests/test_cues.py` checks each of them):

- **Cues are words**, default `("hmm", "wait", "alternatively")`, matched case-insensitively ("Wait", "WAIT",
  "wait"), with or without a leading space, and whether the tokenizer spells the word as one token or as several
  (SmolLM2 spells " WAIT" as "ĠWA"+"IT" and " hmm" as "Ġh"+"mm"). Case folding is per character
  (`str.lower` where it keeps one character).
- **Word boundaries on both sides.** The character before the cue must not be a letter (`str.isalpha`): a space,
  punctuation, a digit, a newline, or the start of the stream. So "await" never fires. The character after the
  cue's last letter must not be a letter either, so "waiting" and "Hmmm" do not fire (extra letters make another
  word; add "hmmm" as a cue if you want it).
- **Right boundary one step late.** When the cue word ends inside a token ("Wait," or "wait."), the boundary is
  known at once. When it ends exactly at the end of a token, only the *next* token tells whether the word goes on
  ("wait" + "ing"). [`CueDetector.step`] reports such an event at once (so the caller can act on the cue's hidden
  state as early as possible) and marks it in `state.pending`; the next `step` sets `state.retracted` where the new
  token continues the word. `continues_word[token_id]` (the token's text starts with a letter) is that test,
  precomputed, for callers that confirm themselves; it applies only to pending events (a cue closed inside its own
  token, like "Hmm,", stays valid whatever comes next), so `state.retracted` is the simpler signal. The offline
  [`CueDetector.find_events`] applies the same rule; an event at the very last token of a sequence is kept. A token
  with empty text (e.g. an id beyond the tokenizer) counts as a boundary.
- **Only inside the thinking block**: after `think_start` (default "<think>") and before `think_end` (default
  "</think>"). Markers are matched as strings, so they may be single special tokens or several ordinary tokens. The
  block may be opened by the prompt (R1-distill chat templates end the generation prompt with "<think>\\n") or by a
  generated token. Every character of a cue must have been *generated* inside the block: prompt tokens never
  produce events, the marker tokens themselves are never cues, and nothing fires after "</think>". (Only a cue
  word that is itself part of a think-end marker spelled with several tokens, e.g. a cue "think" in
  "</" + "think" + ">", can fire before the marker completes, as the marker is not known yet.)
- **Positions.** An event's `position` is the index (in the full, left-padded sequence) of the token that holds
  the cue word's last letter; `start` is the index of the token holding its first letter, because the forced exit
  drops the whole cue word. If one token completes several cue words, the first one wins.

Differences from the reference implementation (farukakgul/LYNX): it matches cue substrings in decoded text with no
word-boundary check, so "await", "waiting" or "Hmmm" fire there, and it keeps matching after "</think>". Both are
fixed here; event positions otherwise follow the reference (the token completing the cue word).

Implementation notes. Each token's text is obtained once by decoding it behind a fixed prefix token (the trick
`StopStringCriteria.clean_tokenizer_vocab` uses, here through `batch_decode`, which also works for word-level
tokenizers and added tokens). Byte-level fragments of a multi-byte character decode to U+FFFD and count as non-
letters. A pattern can end only in the last M characters of a token (M is measured when the detector is built: 3
for SmolLM2, because of tokens like ">'," that could end "</think>"), so only each token's last `M + longest
pattern` characters matter, as one-byte codes: 0 for a non-letter, 1 for a letter no pattern uses, 2.. for each
character a cue or marker uses. The rules above are then compiled into one token automaton (`cue_table.py`): every
state the text can be in between two tokens (thinking or not, partial cue words and markers, the cue the last
token completed), every token's class (tokens that move every state alike: 98 classes for QwQ's 151,669 tokens with
the defaults) and a `[classes, states]` transition table. A decoding step is then `transition[class[token],
state]`: two lookups whatever the batch size, the cues or the markers, and nothing to wait for on the host
([`CueDetector.advance`]); states holding a completed cue are numbered last, so `state.max()` says whether any row
needs a decision. The tables take about 1 MiB at 151k tokens and are built once per tokenizer
(`CueDetector.for_tokenizer`, which `attach` uses). `tests/test_cue_table.py` checks the automaton against the
character-buffer matcher it replaced (`tests/reference_cues.py`) step by step on random streams. Token ids at or
beyond `len(tokenizer)` (models often pad their embedding matrix) and negative ids are treated as empty strings.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .cue_table import char_automaton, feed, pattern_reach, token_table
from .token_ids import id_batch, id_rows
from .token_texts import fold, fold_all, id_space, token_strings

logger = logging.getLogger(__name__)

DEFAULT_CUES: tuple[str, ...] = ("hmm", "wait", "alternatively")
MAX_TOKEN_CHARS = 128

__all__ = ["DEFAULT_CUES", "CueDetector", "CueEvent", "CueState"]

_TABLES = ("_token_class", "_transition", "_state_cue", "_state_end", "_state_pending", "_state_confirm", "_state_think",
           "_lengths", "continues_word", "_continues_ext", "_cue_lengths")
# Detectors built per tokenizer (see `CueDetector.for_tokenizer`); dropped with the tokenizer.
_DETECTORS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CueEvent:
    """One reflection cue found in a sequence.

    Attributes:
        position: index in the full sequence of the token that completes the cue word (holds its last letter).
        start: index of the token that holds the cue word's first letter (equal to `position` for one-token cues).
        cue: canonical cue name, e.g. `"wait"`.

    Example:
        >>> CueEvent(position=12, start=11, cue="wait")
        CueEvent(position=12, start=11, cue='wait')
    """

    position: int
    start: int
    cue: str


@dataclass
class CueState:
    """Per-row detector state for one `generate` call; created by [`CueDetector.start`], advanced by `step`.

    Attributes:
        ids: `[B]` int32, each row's state in the detector's token automaton (see `cue_table.py`).
        length: absolute position of the next token to be consumed (the prompt length at start).
        think_of: `[states]` bool, the detector's table of which states are inside the thinking block.
        pending: `[B]` bool, the event reported by the last `step` ended at the token's last character, so the
            next token may still continue the word.
        retracted: `[B]` bool, set by `step`: the event reported by the *previous* step is void because this
            step's token continued the word ("wait" + "ing").
        recent_pos, recent_len: `[B, K]` long, positions and stored character counts of each row's last `K` tokens
            with text (what `step` finds a cue's first token in; -1 and 0 where none).

    Example:
        >>> import torch
        >>> state = CueState(ids=torch.zeros(1, dtype=torch.int32), length=3, think_of=torch.tensor([True]))
        >>> state.batch_size, state.in_think
        (1, tensor([True]))
    """

    ids: torch.Tensor
    length: int
    think_of: torch.Tensor
    pending: torch.Tensor = field(default=None)  # type: ignore[assignment]
    retracted: torch.Tensor = field(default=None)  # type: ignore[assignment]
    recent_pos: torch.Tensor = field(default=None)  # type: ignore[assignment]
    recent_len: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        rows = self.ids.shape[0]
        if self.pending is None:
            self.pending = torch.zeros(rows, dtype=torch.bool, device=self.ids.device)
        if self.retracted is None:
            self.retracted = torch.zeros_like(self.pending)
        if self.recent_pos is None:
            self.recent_pos = torch.full((rows, 1), -1, dtype=torch.long, device=self.ids.device)
        if self.recent_len is None:
            self.recent_len = torch.zeros_like(self.recent_pos)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.ids.shape[0]

    @property
    def in_think(self) -> torch.Tensor:
        """`[B]` bool, whether the row is inside the thinking block after the last consumed token."""
        return self.think_of[self.ids]


def _example_tokenizer():
    """A tiny byte-level word tokenizer (one token per word) used by the docstring examples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<think>", "</think>", "Hmm", ",", "Ġwait", "Ġawait", "Ġso", "Ġwa", "it", "ing", "Ċ"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


class CueDetector:
    r"""Finds reflection cues ("Hmm", "Wait", "Alternatively", ...) in generated thinking, per row, on device.

    The tokenizer's vocabulary and the matching rules are compiled once into a token automaton; [`CueDetector.advance`]
    then consumes one token per row per decoding step with three tensor ops (no decoding, no Python loop over rows),
    [`CueDetector.step`] does the same and reports the cues, and [`CueDetector.find_events`] gives exactly the same
    events for a finished sequence. See the module docstring for
    the matching rules (word boundaries, thinking block, positions).

    Args:
        tokenizer: any Hugging Face tokenizer of the model.
        cues: cue words, matched case-insensitively as whole words; must start and end with a letter.
        think_start: text that opens the thinking block, or `None` if generation starts inside it.
        think_end: text that closes the thinking block, or `None` if it never closes.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers, decoders
        >>> from transformers import PreTrainedTokenizerFast
        >>> words = ["[UNK]", "<think>", "</think>", "Hmm", ",", "Ġwait", "Ġawait", "Ġso", "Ġwa", "it", "ing"]
        >>> backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        >>> backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> backend.decoder = decoders.ByteLevel()
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
        >>> det = CueDetector(tok)
        >>> ids = tok.convert_tokens_to_ids(["<think>", "Hmm", ",", "Ġawait", "Ġwa", "it", "Ġso", "Ġwait", "ing"])
        >>> det.find_events(ids, prompt_length=1)
        [CueEvent(position=1, start=1, cue='hmm'), CueEvent(position=5, start=4, cue='wait')]
    """

    def __init__(
        self,
        tokenizer,
        cues: Sequence[str] = DEFAULT_CUES,
        think_start: str | None = "<think>",
        think_end: str | None = "</think>",
    ) -> None:
        if isinstance(cues, str):
            raise TypeError(f"cues must be a sequence of words, got the string {cues!r}; pass ({cues!r},) instead.")
        canonical = []
        for cue in cues:
            word = fold(str(cue).strip())
            if not word or not (word[0].isalpha() and word[-1].isalpha()):
                raise ValueError(
                    f"Cue {cue!r} must be a word that starts and ends with a letter (word boundaries are checked "
                    "around it); strip punctuation and spaces from it."
                )
            if word not in canonical:
                canonical.append(word)
        if not canonical:
            raise ValueError("cues is empty; pass at least one cue word, e.g. DEFAULT_CUES.")
        for name, marker in (("think_start", think_start), ("think_end", think_end)):
            if marker is not None and not marker:
                raise ValueError(f"{name} is an empty string; pass the marker text, or None to disable it.")

        self.tokenizer = tokenizer
        self.cues: tuple[str, ...] = tuple(canonical)
        self.think_start = think_start
        self.think_end = think_end
        self._start_text = fold(think_start) if think_start else None
        self._end_text = fold(think_end) if think_end else None

        vocab_size = id_space(tokenizer)
        self.vocab_size = vocab_size
        raw = token_strings(tokenizer, vocab_size)
        self._strings: list[str] = fold_all(raw)

        # Patterns: cues first, then the markers (matched without word boundaries).
        patterns = list(self.cues) + [m for m in (self._start_text, self._end_text) if m]
        longest = max(len(p) for p in patterns)
        cap = max(1, min(MAX_TOKEN_CHARS, max(len(s) for s in self._strings)))
        tails = [s[-cap:] for s in self._strings]
        # A pattern can end only in the last M characters of a token, so no token state depends on more than the
        # last M + longest characters of each token: the automaton reads only those.
        self.buffer_chars = pattern_reach(tails, patterns, len(self.cues)) + 1 + longest
        width = max(1, min(cap, self.buffer_chars))
        self.max_token_chars = width

        # Compact character codes: 0 = no character or a non-letter, 1 = a letter no pattern uses, 2.. = each
        # character some pattern uses. Matching only ever compares with pattern characters and asks "letter?".
        pattern_chars = sorted({c for p in patterns for c in p})
        self._codes = {c: i + 2 for i, c in enumerate(pattern_chars)}
        self._is_letter = [False, True] + [c.isalpha() for c in pattern_chars]
        codes = self._char_codes(tails, width)
        self._host_lengths = [min(len(t), width) for t in tails] + [0]
        lengths = np.array(self._host_lengths, dtype=np.uint8)
        self._lengths = torch.from_numpy(lengths)
        self.continues_word: torch.Tensor = torch.tensor([s[:1].isalpha() for s in raw], dtype=torch.bool)
        self._continues_ext = torch.cat([self.continues_word, torch.zeros(1, dtype=torch.bool)])
        self._cue_lengths = torch.tensor([len(c) for c in self.cues], dtype=torch.long)

        # The token automaton (cue_table.py), from every state a prompt can leave: inside the block or not, after a
        # letter or not, with any proper prefix of a marker pending.
        self._cue_codes = [tuple(self._codes[c] for c in cue) for cue in self.cues]
        self._marker_codes = [tuple(self._codes[c] for c in m) if m else None for m in (self._start_text, self._end_text)]
        prefixes = {""} | {m[:k] for m in (self._start_text, self._end_text) if m for k in range(1, len(m))}
        seeds = {self._prompt_state(p, opened, letter) for p in prefixes for opened in (True, False)
                 for letter in (True, False)}
        self._automaton = char_automaton(self._cue_codes, self._marker_codes, self._is_letter, sorted(seeds, key=repr))
        table = token_table(self._automaton, codes, lengths, [self._automaton.index[s] for s in seeds],
                            self._cue_codes, self._marker_codes, len(self._end_text or ""))
        self._state_of = table.state_of
        self.first_completed = table.first_completed
        self._token_class = torch.from_numpy(table.token_class)
        self._transition = torch.from_numpy(table.transition)
        self._state_cue = torch.from_numpy(table.cue)
        self._state_end = torch.from_numpy(table.end)
        self._state_pending = (self._state_cue >= 0) & (self._state_end == 0)
        # [state, next token continues a word]: the cue that stands (one ending at its token's end is void if so).
        self._state_confirm = torch.stack([self._state_cue, self._state_cue.masked_fill(self._state_pending, -1)], 1)
        self._state_think = torch.from_numpy(table.in_think)
        self.device = torch.device("cpu")
        logger.debug("CueDetector: %d tokens in %d classes, %d states, reading the last %d chars of each token",
                     vocab_size, table.transition.shape[0], table.transition.shape[1], width)

    def _prompt_state(self, text: str, opened: bool, after_letter: bool = False) -> tuple:
        """The character state a prompt ending with `text` leaves (its thinking state decided by the whole prompt):
        markers matched across the prompt's end, no cue begun (prompt characters are never cue characters)."""
        state = (opened, after_letter, frozenset(), frozenset(), -1)
        for ch in text:
            state = feed(state, self._char_code(ch), self._cue_codes, self._marker_codes, self._is_letter, prompt=True)[0]
        return (opened,) + state[1:]

    def _char_codes(self, tails: list[str], width: int) -> np.ndarray:
        """Character codes `[V + 1, width]` of each token's last `width` characters, right-aligned; row V is the empty
        string (ids out of range)."""
        padded = "".join(t[-width:].rjust(width, "\0") for t in tails) + "\0" * width
        points = np.frombuffer(padded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        present = np.zeros(0x110000, dtype=bool)
        present[points] = True
        lookup = np.zeros(0x110000, dtype=np.uint8)
        distinct = np.flatnonzero(present)
        lookup[distinct] = [self._char_code(chr(c)) for c in distinct.tolist()]
        return lookup[points].reshape(len(tails) + 1, width)

    def _char_code(self, ch: str) -> int:
        """The compact code of one (case-folded) character."""
        code = self._codes.get(ch)
        if code is not None:
            return code
        return 1 if ch.isalpha() else 0

    @property
    def table_bytes(self) -> int:
        """Bytes of the precomputed tables (what `to(device)` puts on the model's device)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _TABLES)

    # ------------------------------------------------------------------ setup

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer,
        cues: Sequence[str] = DEFAULT_CUES,
        think_start: str | None = "<think>",
        think_end: str | None = "</think>",
        device: str | torch.device | None = None,
    ) -> CueDetector:
        """A detector for `tokenizer`, built once per tokenizer, cue set and markers and reused (bundles attached to
        one model share it); `device` gives a copy whose tables live there (also reused).

        Example:
            >>> tok = _example_tokenizer()
            >>> CueDetector.for_tokenizer(tok) is CueDetector.for_tokenizer(tok)
            True
        """
        if isinstance(cues, str):
            raise TypeError(f"cues must be a sequence of words, got the string {cues!r}; pass ({cues!r},) instead.")
        per_tokenizer = _DETECTORS.setdefault(tokenizer, {})
        key = (tuple(cues), think_start, think_end, len(tokenizer))
        built = per_tokenizer.get((key, None))
        if built is None:
            built = cls(tokenizer, cues=cues, think_start=think_start, think_end=think_end)
            built.tokenizer = weakref.proxy(tokenizer)  # a strong reference would keep the cache entry alive
            per_tokenizer[(key, None)] = built
        if device is None:
            return built
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        placed = per_tokenizer.get((key, device))
        if placed is None or placed.device != device:  # (moved elsewhere in place by a caller: place it again)
            placed = per_tokenizer[(key, device)] = copy.copy(built).to(device)
        return placed

    def to(self, device: str | torch.device) -> CueDetector:
        """Move the precomputed tables to `device` (in place) and return the detector.

        Example:
            >>> det = CueDetector(_example_tokenizer()).to("cpu")
            >>> det.continues_word.device
            device(type='cpu')
        """
        device = torch.device(device)
        for name in _TABLES:
            setattr(self, name, getattr(self, name).to(device))
        self.device = device
        return self

    def missing_cues(self) -> list[str]:
        """Cues this tokenizer cannot spell, so they could never be detected.

        A cue is spelled if the token strings of `tokenizer.encode(" " + cue)` or of `tokenizer.encode(cue)` contain
        the word (unknown tokens, byte fallbacks that lose letters, or normalisers that change the text all fail).

        Example:
            >>> CueDetector(_example_tokenizer(), cues=("wait", "alternatively")).missing_cues()
            ['alternatively']
        """
        missing = []
        for cue in self.cues:
            spelled = False
            for text in (" " + cue, cue, " " + cue.capitalize(), cue.capitalize()):
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                joined = "".join(self._strings[i] if 0 <= i < self.vocab_size else "" for i in ids)
                if cue in joined:
                    spelled = True
                    break
            if not spelled:
                missing.append(cue)
        return missing

    def continues(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`continues_word[token_ids]`, treating ids at or beyond `len(tokenizer)` as empty strings (False).

        Example:
            >>> tok = _example_tokenizer()
            >>> CueDetector(tok).continues(torch.tensor([tok.convert_tokens_to_ids("ing"), 10**6]))
            tensor([ True, False])
        """
        inside = (token_ids >= 0) & (token_ids < self.vocab_size)
        return self.continues_word[token_ids.clamp(0, self.vocab_size - 1)] & inside

    # ------------------------------------------------------------------ online

    def start(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CueState:
        """Start a `generate` call: read the (left-padded) prompt once and return the per-row state.

        Whether each row is already inside the thinking block is decided from the prompt text (the last marker
        wins), so chat templates that end with "<think>\\n" work. The prompt's last characters give the left
        context (a cue's left boundary, a marker begun in the prompt) but never count as cue characters.
        Generated tokens get absolute positions from `prompt_ids.shape[1]` on.

        Example:
            >>> tok = _example_tokenizer()
            >>> rows = [["Ġso", "<think>"], ["Ġso", "Ġso"]]
            >>> prompts = torch.tensor([tok.convert_tokens_to_ids(row) for row in rows])
            >>> CueDetector(tok).start(prompts).in_think
            tensor([ True, False])
        """
        if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [batch, length], got shape {tuple(prompt_ids.shape)}; "
                             "add a batch dimension with prompt_ids[None].")
        prompt_ids = id_batch(prompt_ids, "prompt_ids")
        if attention_mask is not None:
            attention_mask = id_batch(attention_mask, "attention_mask")
        batch, length = prompt_ids.shape
        rows = prompt_ids.tolist()
        masks = attention_mask.bool().tolist() if attention_mask is not None else None
        ids = []
        for b, row in enumerate(rows):
            text = "".join(self._strings[token] if 0 <= token < self.vocab_size else ""
                           for t, token in enumerate(row) if masks is None or masks[b][t])
            if self._start_text is None:
                opened = self._end_text is None or self._end_text not in text
            else:
                opened = text.rfind(self._start_text) >= 0 and (
                    self._end_text is None or text.rfind(self._start_text) > text.rfind(self._end_text)
                )
            char_state = self._prompt_state(text[-self.buffer_chars:], opened)
            ids.append(self._state_of[(self._automaton.index[char_state], -1, -1)])
        keep = self._cue_lengths.max().item() + 1  # a cue spans at most that many tokens with text
        return CueState(
            ids=torch.tensor(ids, dtype=torch.int32, device=self.device), length=length, think_of=self._state_think,
            recent_pos=torch.full((batch, keep), -1, dtype=torch.long, device=self.device),
            recent_len=torch.zeros(batch, keep, dtype=torch.long, device=self.device),
        )

    def advance(self, state: CueState, tokens: torch.Tensor) -> None:
        """Consume one new token per row (`[B]`), updating `state.ids` and `state.length` only: three tensor ops and no
        host sync, what `generate`'s plug-ins run every step. `state.ids.max() >= first_completed` says whether some
        row's token completed a cue; [`CueDetector.confirmed`] reads the events one token later.

        Example:
            >>> tok = _example_tokenizer()
            >>> det = CueDetector(tok)
            >>> state = det.start(torch.tensor([tok.convert_tokens_to_ids(["<think>"])]))
            >>> det.advance(state, torch.tensor(tok.convert_tokens_to_ids(["Hmm"])))
            >>> bool(state.ids.max() >= det.first_completed)
            True
        """
        ids = tokens.clamp(-1, self.vocab_size)  # -1 and V are both the empty row of the table
        state.ids = self._transition[self._token_class[ids], state.ids]
        state.length += 1

    def confirmed(self, before: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cue events that `tokens` confirm, for rows whose state was `before` (`state.ids` before the `advance`
        that consumed `tokens`): `(cue index or -1, characters between the cue's end and its token's end)`, both
        `[B]`. A cue that ended at its token's last character stands unless the next token continues the word.

        Example:
            >>> tok = _example_tokenizer()
            >>> det = CueDetector(tok)
            >>> state = det.start(torch.tensor([tok.convert_tokens_to_ids(["<think>"])] * 2))
            >>> det.advance(state, torch.tensor(tok.convert_tokens_to_ids(["Ġwait", "Ġwait"])))
            >>> det.confirmed(state.ids, torch.tensor(tok.convert_tokens_to_ids(["ing", ","])))
            (tensor([-1,  1]), tensor([0, 0]))
        """
        ids = tokens.clamp(-1, self.vocab_size)
        return self._state_confirm[before, self._continues_ext[ids].long()], self._state_end[before]

    def cue_start(self, row: Sequence[int], position: int, cue: int, end: int) -> int:
        """Index of the token holding the first letter of cue `cue`, which ended `end` characters before the end of
        token `position` of `row` (host-side: what the records of an exit report as `start`).

        Example:
            >>> tok = _example_tokenizer()
            >>> CueDetector(tok).cue_start(tok.convert_tokens_to_ids(["<think>", "Ġwa", "it", ","]), 2, 1, 0)
            1
        """
        back = end + int(self._cue_lengths[cue]) - 1  # characters from the token's end to the cue's first letter
        while position > 0:
            token = row[position]
            n = self._host_lengths[token] if 0 <= token < self.vocab_size else 0
            if back < n:
                return position
            back -= n
            position -= 1
        return position

    def step(self, state: CueState, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume one new token per row (at absolute position `state.length`) and report cues it completes.

        Updates `state` in place: the automaton state, `pending` and `retracted` (see [`CueState`]), the recent
        tokens, and `length`. ([`CueDetector.advance`] is the same step without the outputs.)

        Returns:
            `(cue_index, cue_start)`, both `[B]` long: the index into `self.cues` of the cue completed by this token
            and the absolute position of the token holding its first letter, or -1 where no cue completed.

        Example:
            >>> tok = _example_tokenizer()
            >>> det = CueDetector(tok)
            >>> state = det.start(torch.tensor([tok.convert_tokens_to_ids(["<think>"])] * 2))
            >>> det.step(state, torch.tensor(tok.convert_tokens_to_ids(["Hmm", "Ġwa"])))
            (tensor([ 0, -1]), tensor([ 1, -1]))
            >>> det.step(state, torch.tensor(tok.convert_tokens_to_ids([",", "it"])))
            (tensor([-1,  1]), tensor([-1,  1]))
            >>> state.pending  # row 1's "wait" ended at its token's end: the next token may still continue it
            tensor([False,  True])
        """
        tokens = new_tokens.reshape(-1)
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"step got {tokens.shape[0]} tokens for a state of {state.batch_size} rows; pass "
                             "exactly one new token per row (input_ids[:, -1]).")
        ids = tokens.clamp(-1, self.vocab_size)
        state.retracted = state.pending & self._continues_ext[ids]
        position = state.length
        self.advance(state, tokens)
        # The recent tokens with text: the cue's first letter lies in one of them.
        n = self._lengths[ids].long()
        has_text = (n > 0)[:, None]
        here = torch.full_like(state.recent_pos[:, :1], position)
        state.recent_pos = torch.where(has_text, torch.cat([state.recent_pos[:, 1:], here], 1), state.recent_pos)
        state.recent_len = torch.where(has_text, torch.cat([state.recent_len[:, 1:], n[:, None]], 1), state.recent_len)
        cue, end = self._state_cue[state.ids], self._state_end[state.ids]
        found = cue >= 0
        state.pending = self._state_pending[state.ids]
        # Characters from the token's end back to the cue's first letter, against the recent tokens' lengths.
        back = end + self._cue_lengths[cue.clamp(min=0)] - 1
        before_first = (state.recent_len.flip(1).cumsum(1) <= back[:, None]).sum(1, keepdim=True)
        last = state.recent_pos.shape[1] - 1
        start = state.recent_pos.gather(1, (last - before_first).clamp(min=0)).squeeze(1)
        return cue.masked_fill(~found, -1), start.masked_fill(~found, -1)

    # ------------------------------------------------------------------ offline

    def find_events(self, token_ids: Sequence[int] | torch.Tensor, prompt_length: int) -> list[CueEvent]:
        """All cue events of one finished sequence (prompt + generation), exactly as the online loop finds them.

        Runs [`CueDetector.start`] on the first `prompt_length` tokens and [`CueDetector.step`] on the rest, and
        drops events whose word the next token continues; an event at the very last token is kept.

        Example:
            >>> tok = _example_tokenizer()
            >>> ids = tok.convert_tokens_to_ids(["<think>", "Ċ", "Hmm", ",", "Ġwait", "</think>", "Ġwait"])
            >>> CueDetector(tok).find_events(ids, prompt_length=2)
            [CueEvent(position=2, start=2, cue='hmm'), CueEvent(position=4, start=4, cue='wait')]
        """
        return self.find_events_batch([token_ids], [prompt_length])[0]

    def find_events_batch(
        self, sequences: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor, prompt_lengths: Sequence[int]
    ) -> list[list[CueEvent]]:
        """[`CueDetector.find_events`] for several sequences at once (one batched `step` per position).

        `sequences` is a batch in any form transformers hands out: a `[batch, length]` tensor (what `generate`
        returns), a list of lists (`tokenizer([...]).input_ids`), or a list of 1-D tensors of different lengths.

        Rows are aligned at their prompt end (prompts left-padded, generations right-padded), and each row's
        positions are reported in its own, unpadded sequence.

        Example:
            >>> tok = _example_tokenizer()
            >>> a = tok.convert_tokens_to_ids(["<think>", "Ġwa", "it", "Ġso"])
            >>> b = tok.convert_tokens_to_ids(["Ġso", "<think>", "Ġawait", "Ġwait", "ing"])
            >>> CueDetector(tok).find_events_batch([a, b], [1, 1])
            [[CueEvent(position=2, start=1, cue='wait')], []]
        """
        seqs = id_rows(sequences)
        prompt_lengths = [int(p) for p in (prompt_lengths.reshape(-1).tolist() if isinstance(prompt_lengths, torch.Tensor)
                                           else prompt_lengths)]
        if len(seqs) != len(prompt_lengths):
            raise ValueError(f"got {len(seqs)} sequences but {len(prompt_lengths)} prompt lengths; pass one "
                             "prompt length per sequence.")
        if not seqs:
            return []
        for s, p in zip(seqs, prompt_lengths):
            if not 0 <= p <= len(s):
                raise ValueError(f"prompt_length {p} is outside a sequence of {len(s)} tokens.")
        pad = max(prompt_lengths)
        gen = max(len(s) - p for s, p in zip(seqs, prompt_lengths))
        batch = len(seqs)
        prompt = torch.zeros(batch, pad, dtype=torch.long)
        mask = torch.zeros(batch, pad, dtype=torch.long)
        generated = torch.full((batch, max(gen, 1)), self.vocab_size, dtype=torch.long)  # empty-string filler
        for b, (s, p) in enumerate(zip(seqs, prompt_lengths)):
            if p:
                prompt[b, pad - p:] = torch.tensor(s[:p])
                mask[b, pad - p:] = 1
            if len(s) > p:
                generated[b, : len(s) - p] = torch.tensor(s[p:])
        state = self.start(prompt, mask)
        generated = generated.to(self.device)
        cues, starts, retracted = [], [], []
        for t in range(gen):
            cue, start = self.step(state, generated[:, t])
            cues.append(cue)
            starts.append(start)
            retracted.append(state.retracted)
        if not gen:
            return [[] for _ in seqs]
        cue_t = torch.stack(cues, 1).tolist()
        start_t = torch.stack(starts, 1).tolist()
        # Retraction at step t + 1 voids the event at step t.
        void = torch.cat([torch.stack(retracted, 1)[:, 1:], torch.zeros(batch, 1, dtype=torch.bool,
                                                                       device=self.device)], 1).tolist()
        out: list[list[CueEvent]] = []
        for b, (s, p) in enumerate(zip(seqs, prompt_lengths)):
            shift = pad - p
            events = []
            for t in range(len(s) - p):
                if cue_t[b][t] >= 0 and not (void[b][t] and t + 1 < len(s) - p):
                    events.append(CueEvent(position=p + t, start=start_t[b][t] - shift, cue=self.cues[cue_t[b][t]]))
            out.append(events)
        return out
