"""The cue detector's transition table: the matching rules of `cues.py` compiled, once per tokenizer, into one
token-level automaton, so that a decoding step costs two table lookups whatever the cues, markers and batch size.

A *character state* holds what the rules need to know about the text so far: whether the thinking block is open,
whether the last character was a letter (a cue's left boundary), which cue words and markers are partly matched
(a cue only from characters generated inside the block, after a non-letter), and a cue just completed whose right
neighbour is not known yet. [`char_automaton`] enumerates every character state reachable from the states a prompt
can leave, over the detector's compact character codes (0 a non-letter, 1 a letter no pattern uses, 2.. each
pattern character).

A *token state* is a character state at a token boundary plus what the token that led there completed: the first
cue word ending inside it (earliest end, then cue order, as `cues.py` specifies) and how many characters before the
token's end that word ended (0: at its last character, so the next token decides whether the word goes on). A cue
ending inside a token is voided when a think-end marker completing later in the same token covers it (the marker's
own characters are never cue characters). [`token_table`] runs every distinct token text from every reachable
character state (vectorised over the vocabulary), groups tokens with the same transitions into classes, and returns
`transition[class, state]`; states with a completed cue are numbered last, so one `max` over a batch of states says
whether any row completed a cue.

Example:
    >>> automaton = char_automaton(cues=[(2, 3, 3)], markers=[None, None], is_letter=[False, True, True, True],
    ...                            seeds=[(True, False, frozenset(), frozenset(), -1)])
    >>> len(automaton.states) > 1
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# (in_think, prev_letter, cue partials {(cue, matched)}, marker partials {(marker, matched)}, candidate cue or -1)
CharState = tuple

__all__ = ["CharAutomaton", "TokenTable", "char_automaton", "feed", "pattern_reach", "token_table"]


def pattern_reach(tails: list[str], patterns: list[str], n_cues: int) -> int:
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


def feed(state: CharState, code: int, cues: Sequence[tuple[int, ...]], markers: Sequence[tuple[int, ...] | None],
         is_letter: Sequence[bool], prompt: bool = False) -> tuple[CharState, int, bool]:
    """One character: `(next state, cue confirmed ending at the previous character or -1, think-end completed here)`.

    `markers` is `[think_start codes or None, think_end codes or None]`. In `prompt` mode no cue can start (prompt
    characters are never cue characters) but markers are matched, as the detector seeds its state from the prompt.
    """
    in_think, _, cue_parts, marker_parts, candidate = state
    letter = bool(is_letter[code])
    confirmed = candidate if candidate >= 0 and not letter else -1
    opened = closed = False
    new_markers = set()
    for m, codes in enumerate(markers):
        if codes is None:
            continue
        for k in [0] + [k for mm, k in marker_parts if mm == m]:
            if codes[k] == code:
                if k + 1 == len(codes):
                    opened, closed = opened or m == 0, closed or m == 1
                else:
                    new_markers.add((m, k + 1))
    if closed:  # both ending here: the think-end marker wins
        in_think = False
    elif opened:
        in_think = True
    new_cues, hit = set(), -1
    if in_think and not prompt:
        starts = [] if state[1] else [(c, 0) for c in range(len(cues))]
        for c, k in list(cue_parts) + starts:
            if cues[c][k] == code:
                if k + 1 == len(cues[c]):
                    hit = c if hit < 0 else min(hit, c)
                else:
                    new_cues.add((c, k + 1))
    return (in_think, letter, frozenset(new_cues), frozenset(new_markers), hit), confirmed, closed


@dataclass
class CharAutomaton:
    """Every reachable character state and, per state and character code, the next state, the cue a character
    confirms (-1 none) and whether it completes the think-end marker."""

    states: list[CharState]
    index: dict[CharState, int]
    next: np.ndarray  # [S, A] int32
    confirm: np.ndarray  # [S, A] int32
    closes: np.ndarray  # [S, A] bool
    candidate: np.ndarray  # [S] int32: the cue completed at the last character, awaiting its right neighbour
    cleared: np.ndarray  # [S] int32: the same state with no candidate (what a token boundary leaves)


def char_automaton(cues: Sequence[tuple[int, ...]], markers: Sequence[tuple[int, ...] | None],
                   is_letter: Sequence[bool], seeds: Sequence[CharState]) -> CharAutomaton:
    """The character automaton reachable from `seeds` (breadth first over every character code)."""
    alphabet = len(is_letter)
    states: list[CharState] = []
    index: dict[CharState, int] = {}

    def add(state: CharState) -> int:
        if state not in index:
            index[state] = len(states)
            states.append(state)
        return index[state]

    for seed in seeds:
        add(seed)
    rows_next, rows_confirm, rows_closes = [], [], []
    i = 0
    while i < len(states):
        state = states[i]
        add(state[:4] + (-1,))
        nxt, conf, clo = [], [], []
        for code in range(alphabet):
            after, confirmed, closed = feed(state, code, cues, markers, is_letter)
            nxt.append(add(after))
            conf.append(confirmed)
            clo.append(closed)
        rows_next.append(nxt)
        rows_confirm.append(conf)
        rows_closes.append(clo)
        i += 1
    return CharAutomaton(
        states=states, index=index,
        next=np.array(rows_next, dtype=np.int32).reshape(len(states), alphabet),
        confirm=np.array(rows_confirm, dtype=np.int32).reshape(len(states), alphabet),
        closes=np.array(rows_closes, dtype=bool).reshape(len(states), alphabet),
        candidate=np.array([s[4] for s in states], dtype=np.int32),
        cleared=np.array([index[s[:4] + (-1,)] for s in states], dtype=np.int32),
    )


@dataclass
class TokenTable:
    """The token-level automaton.

    Attributes:
        token_class: `[V + 1]` int32, each token's class (row V: the empty string, for ids outside the tokenizer).
        transition: `[classes, states]` int32, the state after a token of that class.
        cue: `[states]` int64, the cue word the last token completed (-1 none).
        end: `[states]` int64, characters between that word's end and the token's end (0: at its last character).
        in_think: `[states]` bool, whether the thinking block is open.
        first_completed: states numbered from here on hold a completed cue.
        state_of: token state id of each `(char state, cue, end)` key.
    """

    token_class: np.ndarray
    transition: np.ndarray
    cue: np.ndarray
    end: np.ndarray
    in_think: np.ndarray
    first_completed: int
    state_of: dict[tuple[int, int, int], int]


def token_table(automaton: CharAutomaton, codes: np.ndarray, lengths: np.ndarray, seeds: Sequence[int],
                cues: Sequence[tuple[int, ...]], markers: Sequence[tuple[int, ...] | None],
                close_length: int) -> TokenTable:
    """Run every token (`codes` `[V + 1, W]` right-aligned character codes, `lengths` `[V + 1]`) from every character
    state reachable at token boundaries from `seeds` (character state ids without a candidate)."""
    width = codes.shape[1]
    rows, inverse = _unique_rows(np.concatenate([codes, lengths[:, None].astype(codes.dtype)], 1))
    row_codes = rows[:, :width].astype(np.int64)
    row_lengths = rows[:, width].astype(np.int64)
    first_col = width - row_lengths  # where each text starts (right-aligned)

    first_code = row_codes[np.arange(len(rows)), np.minimum(first_col, width - 1)]

    def run(start: int, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(subset)
        codes_, first_ = row_codes[subset], first_col[subset]
        cur = np.full(n, start, dtype=np.int64)
        first_cue = np.full(n, -1, dtype=np.int64)
        first_end = np.full(n, -1, dtype=np.int64)
        for col in range(int(first_.min()) if n else width, width):
            active = first_ <= col
            code = codes_[:, col]
            confirmed = automaton.confirm[cur, code]
            record = active & (confirmed >= 0) & (first_cue < 0)
            first_cue[record] = confirmed[record]
            first_end[record] = col - 1
            if close_length:
                void = active & automaton.closes[cur, code] & (first_cue >= 0) & (first_end >= col - close_length + 1)
                first_cue[void] = -1
            cur = np.where(active, automaton.next[cur, code], cur)
        candidate = automaton.candidate[cur]
        pending = (first_cue < 0) & (candidate >= 0)
        end = np.where(pending, 0, np.where(first_cue >= 0, width - 1 - first_end, -1))
        first_cue = np.where(pending, candidate, first_cue)
        return automaton.cleared[cur].astype(np.int64), first_cue, end

    everything = np.arange(len(rows))
    results: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def result(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # From a state with partial matches, a token whose first character continues none of them (and that has a
        # character) leaves what it leaves from the same state without them: only the others are run.
        in_think, after_letter, cue_parts, marker_parts, _ = automaton.states[start]
        clean = automaton.index.get((in_think, after_letter, frozenset(), frozenset(), -1), start)
        if clean == start:
            return run(start, everything)
        base = results[clean] if clean in results else result(clean)
        results.setdefault(clean, base)
        continuing = [cues[c][k] for c, k in cue_parts] + [markers[m][k] for m, k in marker_parts]
        subset = np.flatnonzero((row_lengths == 0) | np.isin(first_code, continuing))
        out = tuple(part.copy() for part in base)
        for part, values in zip(out, run(start, subset)):
            part[subset] = values
        return out

    queue = list(dict.fromkeys(int(s) for s in seeds))
    while queue:
        start = queue.pop()
        if start in results:
            continue
        results[start] = result(start)
        queue.extend(int(s) for s in np.unique(results[start][0]) if int(s) not in results)

    # Token states: (char state, cue, end); those without a completed cue first.
    span = (len(cues) + 1) * (width + 1)  # (char state, cue, end) packed into one integer
    packed = np.unique(np.concatenate([np.array([s * span for s in results], dtype=np.int64)] + [
        nxt * span + (cue + 1) * (width + 1) + end + 1 for nxt, cue, end in results.values()]))
    keys = zip((packed // span).tolist(), (packed % span // (width + 1) - 1).tolist(), (packed % (width + 1) - 1).tolist())
    ordered = sorted(keys, key=lambda k: (k[1] >= 0, k))
    state_of = {k: i for i, k in enumerate(ordered)}
    char_states = sorted(results)
    column = {s: i for i, s in enumerate(char_states)}
    per_row = np.empty((len(rows), len(char_states)), dtype=np.int32)
    lookup = np.full((automaton.next.shape[0], len(cues) + 1, width + 1), -1, dtype=np.int64)
    for (s, c, e), i in state_of.items():
        lookup[s, c + 1, e + 1] = i
    for s, (nxt, cue, end) in results.items():
        per_row[:, column[s]] = lookup[nxt, cue + 1, end + 1]
    classes, row_class = _unique_rows(per_row)
    by_state = np.array([column[k[0]] for k in ordered], dtype=np.int64)
    return TokenTable(
        token_class=row_class[inverse].astype(np.int32),
        transition=np.ascontiguousarray(classes[:, by_state]).astype(np.int32),
        cue=np.array([k[1] for k in ordered], dtype=np.int64),
        end=np.array([k[2] for k in ordered], dtype=np.int64),
        in_think=np.array([automaton.states[k[0]][0] for k in ordered], dtype=bool),
        first_completed=sum(1 for k in ordered if k[1] < 0),
        state_of=state_of,
    )


def _unique_rows(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(array, axis=0, return_inverse=True)`, sorting each row as one opaque value (several times faster)."""
    array = np.ascontiguousarray(array)
    as_void = array.view(np.dtype((np.void, array.dtype.itemsize * array.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(as_void, return_index=True, return_inverse=True)
    return array[first], inverse.reshape(-1)
