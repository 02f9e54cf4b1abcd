"""Reflection-cue detection in a generated token stream, for any Hugging Face tokenizer.

LYNX decides whether to exit at *reflection cues*: words such as "Hmm", "Wait" or "Alternatively" that a
reasoning model emits inside its thinking block. [`CueDetector`] finds them incrementally while `generate`
runs, per batch row and on the model's device, in the style of transformers' `StopStringCriteria`: the
vocabulary is turned into a padded table of characters once, and every step only gathers the new token's
characters into a short per-row tail buffer and compares it with the cue words using tensor ops. Nothing is
decoded inside the per-token loop.

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
letters. When the table is built, the detector also measures how far from a token's end any cue or marker can end
inside that token (M; 3 for SmolLM2, because of tokens like ">'," that could end "</think>"); only those last M
characters of each new token are matched, so the tail buffer holds `M + longest pattern` characters (16 for SmolLM2
with the defaults) and every step costs the same few dozen tensor ops whatever the sequence length. The table keeps
only the last `M + longest` characters of each token (all the buffer can ever hold), as one-byte codes: 0 for a
non-letter, 1 for a letter no pattern uses, 2.. for each character a cue or marker uses (4 MiB for QwQ's 151,669
tokens instead of 155 MB of int64 code points). It is built once per tokenizer (`CueDetector.for_tokenizer`, which
`attach` uses) in well under a second of CPU at 151k tokens. The table also marks the tokens in which some cue or
marker could end (0.2% of QwQ's tokens: "wait", "it", "mm", ">", ...): on a CPU, where asking the host is free, a
step where no row's token is marked only shifts the buffer and skips the matching (`CueState.quiet`); on
accelerators every step runs the same branchless ops. Token ids at or beyond `len(tokenizer)` (models often pad their embedding matrix) and negative ids
are treated as empty strings.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_CUES: tuple[str, ...] = ("hmm", "wait", "alternatively")
MAX_TOKEN_CHARS = 128

__all__ = ["DEFAULT_CUES", "CueDetector", "CueEvent", "CueState"]

_TABLES = ("_table", "_lengths", "_is_letter", "continues_word", "_continues_ext", "_patterns", "_pattern_mask",
           "_cue_lengths", "_pattern_free", "_boundary", "_shift_index", "_new_in_buffer", "_new_in_region", "_region",
           "_may_end")
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
        in_think: `[B]` bool, whether the row is inside the thinking block after the last consumed token.
        chars: `[B, W]` long, the last `W` characters of the row (lower-cased code points, 0 where empty).
        char_pos: `[B, W]` long, absolute position of the token each character came from (-1 where empty).
        char_think: `[B, W]` bool, whether each character was generated inside the thinking block.
        length: absolute position of the next token to be consumed (the prompt length at start).
        pending: `[B]` bool, the event reported by the last `step` ended at the token's last character, so the
            next token may still continue the word.
        retracted: `[B]` bool, set by `step`: the event reported by the *previous* step is void because this
            step's token continued the word ("wait" + "ing").
        quiet: set by `step` (a Python bool): no row's new token could end a cue or a marker, so the step found no
            cue and left `in_think` as it was (the step then skips the matching; on a CPU only, where asking the
            host costs nothing).

    Example:
        >>> import torch
        >>> state = CueState(in_think=torch.zeros(1, dtype=torch.bool), chars=torch.zeros(1, 4, dtype=torch.long),
        ...                  char_pos=torch.full((1, 4), -1), char_think=torch.zeros(1, 4, dtype=torch.bool), length=3)
        >>> state.batch_size
        1
    """

    in_think: torch.Tensor
    chars: torch.Tensor
    char_pos: torch.Tensor
    char_think: torch.Tensor
    length: int
    pending: torch.Tensor = field(default=None)  # type: ignore[assignment]
    retracted: torch.Tensor = field(default=None)  # type: ignore[assignment]
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.pending is None:
            self.pending = torch.zeros_like(self.in_think)
        if self.retracted is None:
            self.retracted = torch.zeros_like(self.in_think)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.in_think.shape[0]


def asks_host(device: torch.device) -> bool:
    """Whether a step may branch on its tensors' values (a host sync): on a CPU, where that costs nothing.

    Example:
        >>> asks_host(torch.device("cpu"))
        True
    """
    return device.type == "cpu"


def _fold(text: str) -> str:
    """Lower-case character by character, keeping one character per character (so positions line up)."""
    low = text.lower()
    if len(low) == len(text) and "ς" not in low:  # no character grew, no context-dependent final sigma
        return low
    out = []
    for ch in text:
        low = ch.lower()
        out.append(low if len(low) == 1 else ch)
    return "".join(out)


def _token_strings(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id stands for, decoded behind a fixed prefix so leading spaces survive."""
    prefix = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    kwargs = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    prefix_text = tokenizer.decode(prefix, **kwargs) if prefix else ""
    sequences = [prefix + [i] for i in range(vocab_size)]
    decoded = _decode_batch(tokenizer, sequences, kwargs)
    strings = []
    for i, text in enumerate(decoded):
        if text.startswith(prefix_text):
            strings.append(text[len(prefix_text):])
        else:
            strings.append(tokenizer.decode([i], **kwargs))
    return strings


def _decode_batch(tokenizer, sequences: list[list[int]], kwargs: dict) -> list[str]:
    """`tokenizer.batch_decode(sequences)`, straight through the Rust backend of a fast tokenizer when that gives the
    same text (checked on a sample): transformers' per-sequence Python conversions cost seconds at 150k tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            fast = backend.decode_batch(sequences, skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - any backend refusal: take the general path
            fast = None
        if fast is not None:
            step = max(1, len(sequences) // 200)
            sample = list(range(0, len(sequences), step))[:200] + list(range(max(0, len(sequences) - 50), len(sequences)))
            reference = tokenizer.batch_decode([sequences[i] for i in sample], **kwargs)
            if all(fast[i] == text for i, text in zip(sample, reference)):
                return fast
    return tokenizer.batch_decode(sequences, **kwargs)


def _id_space(tokenizer) -> int:
    """One more than the largest token id (added tokens may leave holes above the base vocabulary)."""
    size = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if backend is not None and added is not None:
        return max([size, backend.get_vocab_size(with_added_tokens=False)] + [int(i) + 1 for i in added])
    vocab = tokenizer.get_vocab()
    return max(size, max(vocab.values()) + 1) if vocab else size


def _fold_all(strings: list[str]) -> list[str]:
    """`[_fold(s) for s in strings]`, lower-casing them all at once where that gives the same characters."""
    joined = "".join(strings)
    low = joined.lower()
    if len(low) != len(joined) or "ς" in low:
        return [_fold(s) for s in strings]
    out, at = [], 0
    for s in strings:
        out.append(low[at: at + len(s)])
        at += len(s)
    return out


def _cue_reach(tails: list[str], patterns: list[str], n_cues: int) -> int:
    """How far from a token's end a pattern can end inside that token (a cue end followed by a letter in the same
    token can never match, so it does not count). Searches all tokens at once in one joined string."""
    import bisect

    joined = "".join(tails)
    starts, at = [], 0
    for t in tails:
        starts.append(at)
        at += len(t)

    def token_of(pos: int) -> tuple[str, int]:
        index = bisect.bisect_right(starts, pos) - 1
        return tails[index], pos - starts[index]

    def count(s: str, end: int, is_cue: bool) -> int:
        return -1 if is_cue and end + 1 < len(s) and s[end + 1].isalpha() else len(s) - 1 - end

    by_first: dict[str, list[str]] = {}
    for t in tails:
        if t:
            by_first.setdefault(t[0], []).append(t)
    reach = 0
    for index, p in enumerate(patterns):
        is_cue = index < n_cues
        pos = joined.find(p)
        while pos >= 0:  # whole occurrences (they never span two tokens unless a token boundary splits them)
            s, at = token_of(pos)
            if at + len(p) <= len(s) and not (is_cue and at > 0 and s[at - 1].isalpha()):
                reach = max(reach, count(s, at + len(p) - 1, is_cue))
            pos = joined.find(p, pos + 1)
        for k in range(1, len(p)):  # tokens that start with the rest of a pattern begun before them
            suffix = p[-k:]
            for s in by_first.get(suffix[0], ()):
                if s.startswith(suffix):
                    reach = max(reach, count(s, k - 1, is_cue))
    return reach


def _may_end(stored: list[str], patterns: list[str], n_cues: int) -> list[bool]:
    """Per token (its stored characters, as the table holds them): whether some pattern could end at one of its
    characters, the rest of the pattern lying before it in the token or in earlier tokens. A cue end followed by a
    letter in the same token never matches, so it does not count. Tokens where this is False can never complete a
    cue or a marker, whatever came before them."""
    import bisect

    flags = [False] * len(stored)
    by_first: dict[str, list[int]] = {}
    for i, t in enumerate(stored):
        if t:
            by_first.setdefault(t[0], []).append(i)
    joined = "\0".join(stored)  # NUL is never a pattern character: no occurrence spans two tokens
    starts, at = [], 0
    for t in stored:
        starts.append(at)
        at += len(t) + 1
    for index, p in enumerate(patterns):
        is_cue = index < n_cues
        for k in range(1, len(p) + 1):  # the token starts with the pattern's last k characters
            suffix = p[-k:]
            for i in by_first.get(suffix[0], ()):
                t = stored[i]
                if not flags[i] and t.startswith(suffix) and not (is_cue and len(t) > k and t[k].isalpha()):
                    flags[i] = True
        pos = joined.find(p)
        while pos >= 0:  # the whole pattern inside one token
            i = bisect.bisect_right(starts, pos) - 1
            t, end = stored[i], pos - starts[i] + len(p)
            if not (is_cue and end < len(t) and t[end].isalpha()):
                flags[i] = True
            pos = joined.find(p, pos + 1)
    return flags


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

    The tokenizer's vocabulary is preprocessed once into a character table; [`CueDetector.step`] then consumes one
    token per row per decoding step with a fixed number of tensor ops (no decoding, no Python loop over rows), and
    [`CueDetector.find_events`] gives exactly the same events for a finished sequence. See the module docstring for
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
            word = _fold(str(cue).strip())
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
        self._start_text = _fold(think_start) if think_start else None
        self._end_text = _fold(think_end) if think_end else None

        vocab_size = _id_space(tokenizer)
        self.vocab_size = vocab_size
        raw = _token_strings(tokenizer, vocab_size)
        self._strings: list[str] = _fold_all(raw)

        # Patterns: cues first, then the markers (matched without word boundaries).
        patterns = list(self.cues)
        self._open_index = self._close_index = -1
        if self._start_text:
            self._open_index = len(patterns)
            patterns.append(self._start_text)
        if self._end_text:
            self._close_index = len(patterns)
            patterns.append(self._end_text)
        longest = max(len(p) for p in patterns)
        cap = max(1, min(MAX_TOKEN_CHARS, max(len(s) for s in self._strings)))
        tails = [s[-cap:] for s in self._strings]
        # Only the last M characters of each new token are matched, so the buffer holds M + longest characters and
        # the table stores only the characters the buffer can ever hold.
        self._match_slots = _cue_reach(tails, patterns, len(self.cues)) + 1
        self.buffer_chars = self._match_slots + longest
        width = max(1, min(cap, self.buffer_chars))
        self.max_token_chars = width
        self._longest = longest
        window = longest + 2  # left neighbour + pattern + right neighbour

        # Compact character codes: 0 = no character or a non-letter, 1 = a letter no pattern uses, 2.. = each
        # character some pattern uses. Matching only ever compares with pattern characters and asks "letter?".
        pattern_chars = sorted({c for p in patterns for c in p})
        self._codes = {c: i + 2 for i, c in enumerate(pattern_chars)}
        self._is_letter = torch.tensor([False, True] + [c.isalpha() for c in pattern_chars], dtype=torch.bool)
        # Character table [V + 1, width] of codes, right-aligned; row V is the empty string (ids out of range).
        padded = "".join(t[-width:].rjust(width, "\0") for t in tails) + "\0" * width
        points = np.frombuffer(padded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        present = np.zeros(0x110000, dtype=bool)
        present[points] = True
        lookup = np.zeros(0x110000, dtype=np.uint8)
        distinct = np.flatnonzero(present)
        lookup[distinct] = [self._char_code(chr(c)) for c in distinct.tolist()]
        self._table = torch.from_numpy(lookup[points].reshape(vocab_size + 1, width))
        self._lengths = torch.tensor([min(len(t), width) for t in tails] + [0], dtype=torch.uint8)
        self.continues_word: torch.Tensor = torch.tensor([s[:1].isalpha() for s in raw], dtype=torch.bool)
        self._continues_ext = torch.cat([self.continues_word, torch.zeros(1, dtype=torch.bool)])
        self._may_end = torch.tensor(_may_end([t[-width:] for t in tails], patterns, len(self.cues)) + [False])

        # Pattern table [P, window], right-aligned before the right-neighbour slot.
        pat = torch.zeros(len(patterns), window, dtype=torch.long)
        mask = torch.zeros(len(patterns), window, dtype=torch.bool)
        for p, text in enumerate(patterns):
            pat[p, window - 1 - len(text): window - 1] = torch.tensor([self._codes[c] for c in text])
            mask[p, window - 1 - len(text): window - 1] = True
        self._patterns = pat
        self._pattern_mask = mask
        self._cue_lengths = torch.tensor([len(c) for c in self.cues], dtype=torch.long)
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
        self.device = torch.device("cpu")
        logger.debug("CueDetector: %d tokens, %d table chars, matching the last %d chars of a %d-char buffer",
                     vocab_size, width, slots, buf)

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
        wins), so chat templates that end with "<think>\\n" work. The prompt's last characters seed the buffer
        (as left context for word boundaries) but never count as cue characters. Generated tokens get absolute
        positions from `prompt_ids.shape[1]` on.

        Example:
            >>> tok = _example_tokenizer()
            >>> rows = [["Ġso", "<think>"], ["Ġso", "Ġso"]]
            >>> prompts = torch.tensor([tok.convert_tokens_to_ids(row) for row in rows])
            >>> CueDetector(tok).start(prompts).in_think
            tensor([ True, False])
        """
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
        return CueState(
            in_think=torch.tensor(in_think, dtype=torch.bool, device=self.device),
            chars=chars.to(self.device),
            char_pos=char_pos.to(self.device),
            char_think=torch.zeros(batch, width, dtype=torch.bool, device=self.device),
            length=length,
        )

    def step(self, state: CueState, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume one new token per row (at absolute position `state.length`) and report cues it completes.

        Updates `state` in place: the character buffer, `in_think` (the think-end marker closes, the think-start
        marker opens), `pending` and `retracted` (see [`CueState`]), and `length`.

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
        # No row's token can end a cue or a marker: nothing to match, the thinking state carries over. Asked on a
        # CPU only (free there); on accelerators the step stays branchless so that decoding never waits for the host.
        state.quiet = asks_host(self.device) and not bool(self._may_end[ids].any())
        if state.quiet:
            state.pending = torch.zeros_like(state.pending)
            state.chars, state.char_pos, state.char_think = chars, char_pos, think | (new_slot & state.in_think[:, None])
            state.length += 1
            none = torch.full(tokens.shape, -1, dtype=torch.long, device=tokens.device)
            return none, none.clone()

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
        self, sequences: Sequence[Sequence[int] | torch.Tensor], prompt_lengths: Sequence[int]
    ) -> list[list[CueEvent]]:
        """[`CueDetector.find_events`] for several sequences at once (one batched `step` per position).

        Rows are aligned at their prompt end (prompts left-padded, generations right-padded), and each row's
        positions are reported in its own, unpadded sequence.

        Example:
            >>> tok = _example_tokenizer()
            >>> a = tok.convert_tokens_to_ids(["<think>", "Ġwa", "it", "Ġso"])
            >>> b = tok.convert_tokens_to_ids(["Ġso", "<think>", "Ġawait", "Ġwait", "ing"])
            >>> CueDetector(tok).find_events_batch([a, b], [1, 1])
            [[CueEvent(position=2, start=1, cue='wait')], []]
        """
        if len(sequences) != len(prompt_lengths):
            raise ValueError(f"got {len(sequences)} sequences but {len(prompt_lengths)} prompt lengths; pass one "
                             "prompt length per sequence.")
        if not sequences:
            return []
        seqs = [s.reshape(-1).tolist() if isinstance(s, torch.Tensor) else list(s) for s in sequences]
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
