"""Specification of reflection-cue detection (`lynx_hf.runtime.cues`): whole words, inside thinking, online == offline."""

from __future__ import annotations

import random
import re

import pytest
import torch

from lynx_hf.runtime.cues import DEFAULT_CUES, CueDetector, CueEvent

# ----------------------------------------------------------------------------- fixtures and helpers

TINY_WORDS = [
    "[UNK]", "<pad>", "<think>", "</think>",
    "Wait", "ĠWait", "wait", "Ġwait", "WAIT", "ĠWAIT", "Wait,", "wait.",
    "Hmm", "ĠHmm", "Hmm,", "Ġhmm", "Hmmm", "ĠHmmm",
    "Ġalternatively", "ĠAlternatively", "Ġawait", "await", "Ġwaiting", "Ġwa", "it", "ing", "Ġh", "mm", "m",
    ",", ".", "Ċ", "Ġso", "Ġthe", "Ġanswer", "Ġis", "Ġ4", "4", "think", ">", "</",
]


def make_word_tokenizer(words: list[str] = TINY_WORDS):
    """A hand-made byte-level word tokenizer: every entry is one token, so cues can be single tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [w for w in ("<pad>", "<think>", "</think>") if w in words]
    backend.add_special_tokens([AddedToken(w, special=True) for w in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny():
    tok = make_word_tokenizer()
    return tok, CueDetector(tok)


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer):
    return smollm2_tokenizer, CueDetector(smollm2_tokenizer)


def toks(tok, pieces: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in ids, pieces
    return ids


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def events(det: CueDetector, prompt: list[int], generated: list[int]) -> list[tuple[str, int, int]]:
    """(cue, start, position) of the offline events of prompt + generated."""
    return [(e.cue, e.start, e.position) for e in det.find_events(prompt + generated, prompt_length=len(prompt))]


def online(det: CueDetector, prompt: torch.Tensor, mask: torch.Tensor | None, generated: torch.Tensor):
    """The online loop as a `generate` plug-in runs it: start, then one step per token, honouring retractions."""
    state = det.start(prompt, mask)
    out: list[list[CueEvent]] = [[] for _ in range(prompt.shape[0])]
    for t in range(generated.shape[1]):
        cue, start = det.step(state, generated[:, t])
        for b in range(prompt.shape[0]):
            if state.retracted[b]:
                out[b].pop()
            if cue[b] >= 0:
                out[b].append(CueEvent(position=prompt.shape[1] + t, start=int(start[b]), cue=det.cues[int(cue[b])]))
    return out


def reference_events(strings: list[str], ids: list[int], prompt_length: int, cues, start="<think>", end="</think>"):
    """A slow, obviously-correct text implementation of the rules: regex on the lower-cased stream."""
    text, owner = "", []
    for position, token in enumerate(ids):
        piece = strings[token].lower()
        text += piece
        owner += [position] * len(piece)
    inside, state = [], False
    for j in range(len(text)):
        if text.endswith(start, 0, j + 1):
            state = True
        if text.endswith(end, 0, j + 1):
            state = False
        inside.append(state and owner[j] >= prompt_length)
        if end and text.endswith(end, 0, j + 1):  # the think-end marker's own characters are not cue characters
            inside[j + 1 - len(end): j + 1] = [False] * len(end)
    found: dict[int, tuple[int, str]] = {}
    for cue in cues:
        for m in re.finditer(rf"(?<![^\W\d_]){re.escape(cue)}(?![^\W\d_])", text):
            if all(inside[m.start(): m.end()]):
                position = owner[m.end() - 1]
                if position not in found or m.end() < found[position][0]:
                    found[position] = (m.end(), cue)
    return [(cue, owner[stop - len(cue)], position) for position, (stop, cue) in sorted(found.items())]


# ----------------------------------------------------------------------------- word matching


def test_wait_fires_in_any_case_with_or_without_leading_space(tiny):
    tok, det = tiny
    for word in ["Wait", "ĠWait", "wait", "Ġwait", "WAIT", "ĠWAIT"]:
        assert events(det, toks(tok, ["<think>"]), toks(tok, ["Ċ", word, "."])) == [("wait", 2, 2)], word


def test_hmm_with_comma_in_the_same_token_fires_and_is_confirmed_at_once(tiny):
    tok, det = tiny
    state = det.start(torch.tensor([toks(tok, ["<think>"])]))
    cue, start = det.step(state, torch.tensor(toks(tok, ["Hmm,"])))
    assert det.cues[int(cue)] == "hmm" and int(start) == 1
    assert not state.pending.item()  # the comma already closes the word
    det.step(state, torch.tensor(toks(tok, ["ing"])))
    assert not state.retracted.item()


def test_alternatively_fires(tiny, smol):
    tok, det = tiny
    assert events(det, toks(tok, ["<think>"]), toks(tok, ["Ġalternatively", ","])) == [("alternatively", 1, 1)]
    stok, sdet = smol
    prompt = encode(stok, "<think>\n")
    gen = encode(stok, "So 4. Alternatively, we")
    assert [e[0] for e in events(sdet, prompt, gen)] == ["alternatively"]


def test_smollm2_cases_and_spaces_all_fire(smol):
    tok, det = smol
    prompt = encode(tok, "Question?<think>\n")
    gen = encode(tok, "So 4. Wait, no. wait! WAIT. Hmm, hmm... HMM\nalternatively Alternatively")
    assert [e[0] for e in events(det, prompt, gen)] == ["wait", "wait", "wait", "hmm", "hmm", "hmm",
                                                       "alternatively", "alternatively"]


def test_multi_token_cue_is_reported_at_its_last_token_with_start_at_its_first(smol):
    tok, det = smol
    prompt = encode(tok, "<think>\n")
    for text in [" WAIT", " hmm"]:
        pieces = encode(tok, text)
        assert len(pieces) == 2, (text, tok.convert_ids_to_tokens(pieces))  # "ĠWA"+"IT", "Ġh"+"mm"
        gen = encode(tok, "So") + pieces + encode(tok, ",")
        first = len(prompt) + 1
        assert events(det, prompt, gen) == [(text.strip().lower(), first, first + 1)]


def test_cue_split_across_word_tokens_has_the_right_start(tiny):
    tok, det = tiny
    gen = toks(tok, ["Ġso", "Ġwa", "it", ",", "Ġh", "mm", "."])
    assert events(det, toks(tok, ["<think>"]), gen) == [("wait", 2, 3), ("hmm", 5, 6)]


def test_await_and_waiting_never_fire(tiny, smol):
    tok, det = tiny
    cases = (["Ġawait", "."], ["await"], ["Ġwaiting"], ["Ġwait", "ing"], ["Ġwa", "it", "ing"], ["Ġso", "await"])
    for gen in cases:
        assert events(det, toks(tok, ["<think>"]), toks(tok, gen)) == [], gen
    stok, sdet = smol
    gen = encode(stok, "We await the result, waiting and awaiting; unwait, waited, Waits.")
    assert events(sdet, encode(stok, "<think>\n"), gen) == []


def test_hmmm_with_extra_letters_does_not_match_hmm(tiny, smol):
    tok, det = tiny
    for gen in (["Hmmm"], ["ĠHmmm", ","], ["ĠHmm", "m"], ["Ġh", "mm", "m"]):
        assert events(det, toks(tok, ["<think>"]), toks(tok, gen)) == [], gen
    stok, sdet = smol
    assert events(sdet, encode(stok, "<think>\n"), encode(stok, "Hmmm, hmmm.")) == []
    custom = CueDetector(stok, cues=("hmmm",))
    assert [e[0] for e in events(custom, encode(stok, "<think>\n"), encode(stok, "Hmmm, hmm."))] == ["hmmm"]


def test_cue_at_token_end_is_pending_and_retracted_when_the_next_token_continues_the_word(tiny):
    tok, det = tiny
    state = det.start(torch.tensor([toks(tok, ["<think>"])] * 2))
    cue, _ = det.step(state, torch.tensor(toks(tok, ["Ġwait", "Ġwait"])))
    assert cue.tolist() == [1, 1] and state.pending.tolist() == [True, True]
    det.step(state, torch.tensor(toks(tok, ["ing", ","])))
    assert state.retracted.tolist() == [True, False]
    nxt = torch.tensor(toks(tok, ["ing", ","]))
    assert det.continues_word[nxt].tolist() == [True, False]


def test_event_at_the_very_last_token_is_kept(tiny):
    tok, det = tiny
    assert events(det, toks(tok, ["<think>"]), toks(tok, ["Ġso", "Ġwait"])) == [("wait", 2, 2)]


def test_custom_multi_word_cue(smol):
    tok, det = smol
    custom = CueDetector(tok, cues=("let me check",))
    gen = encode(tok, "So 4. Let me check: 2+2=4. let me checking")
    assert [e[0] for e in events(custom, encode(tok, "<think>\n"), gen)] == ["let me check"]


# ----------------------------------------------------------------------------- thinking block


def test_prompt_tokens_never_fire(tiny, smol):
    tok, det = tiny
    prompt = toks(tok, ["<think>", "ĠWait", ",", "Hmm,", "Ġalternatively"])
    assert events(det, prompt, toks(tok, ["Ġso"])) == []
    stok, sdet = smol
    assert events(sdet, encode(stok, "Wait, hmm: alternatively?<think>\nWait, "), encode(stok, "so 4")) == []


def test_cue_started_in_the_prompt_and_finished_in_generation_does_not_fire(tiny):
    tok, det = tiny
    assert events(det, toks(tok, ["<think>", "Ġwa"]), toks(tok, ["it", ","])) == []


def test_nothing_fires_after_think_end(tiny, smol):
    tok, det = tiny
    gen = toks(tok, ["Ġwait", "</think>", "ĠWait", ",", "Hmm,", "Ġalternatively"])
    assert events(det, toks(tok, ["<think>"]), gen) == [("wait", 1, 1)]
    stok, sdet = smol
    think_end = encode(stok, "</think>")
    assert len(think_end) > 1  # SmolLM2 spells the marker with several ordinary tokens
    gen = encode(stok, "So 4. Wait.") + think_end + encode(stok, " Wait, hmm, the answer is 4.")
    assert [e[0] for e in events(sdet, encode(stok, "<think>\n"), gen)] == ["wait"]


def test_think_end_marker_itself_is_not_a_cue(tiny):
    tok, det = tiny
    custom = CueDetector(tok, cues=("think",))
    assert events(custom, toks(tok, ["<think>"]), toks(tok, ["Ġso", "</think>", "Ġso"])) == []


def test_thinking_opened_by_a_generated_think_token(tiny, smol):
    tok, det = tiny
    gen = toks(tok, ["ĠWait", "<think>", "Ċ", "ĠWait", ","])
    assert events(det, toks(tok, ["Ġso"]), gen) == [("wait", 4, 4)]
    stok, sdet = smol
    gen = encode(stok, "Hmm, sure.") + encode(stok, "<think>") + encode(stok, "\nHmm, so 4.")
    found = events(sdet, encode(stok, "Question?"), gen)
    assert [e[0] for e in found] == ["hmm"] and found[0][2] > len(encode(stok, "Question?Hmm, sure.<think>"))


def test_no_events_without_a_thinking_block(tiny):
    tok, det = tiny
    assert events(det, toks(tok, ["Ġso"]), toks(tok, ["ĠWait", ",", "Hmm,", "Ġalternatively"])) == []


def test_think_start_none_means_generation_starts_inside_thinking(tiny):
    tok, _ = tiny
    det = CueDetector(tok, think_start=None)
    assert events(det, toks(tok, ["Ġso"]), toks(tok, ["ĠWait", "</think>", "ĠWait"])) == [("wait", 1, 1)]


# ----------------------------------------------------------------------------- batching and online == offline


def test_left_padding_and_batch_rows_are_independent(tiny):
    tok, det = tiny
    pad = tok.pad_token_id
    rows = [
        (["<think>"], ["ĠWait", ",", "Ġh", "mm", "."]),
        (["Ġso", "Ġthe", "<think>", "Ċ"], ["Ġwa", "it", "ing", "ĠHmm", ","]),
        (["Ġso"], ["ĠWait", "<think>", "Ġalternatively", "</think>", "ĠWait"]),
    ]
    length = max(len(p) for p, _ in rows)
    prompt = torch.tensor([[pad] * (length - len(p)) + toks(tok, p) for p, _ in rows])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p, _ in rows])
    generated = torch.tensor([toks(tok, g) for _, g in rows])
    batched = online(det, prompt, mask, generated)
    for b, (p, g) in enumerate(rows):
        alone = det.find_events(toks(tok, p) + toks(tok, g), prompt_length=len(p))
        shift = length - len(p)
        assert [(e.cue, e.start - shift, e.position - shift) for e in batched[b]] == \
            [(e.cue, e.start, e.position) for e in alone]
    assert [[e.cue for e in row] for row in batched] == [["wait", "hmm"], ["hmm"], ["alternatively"]]


def test_online_equals_offline_equals_text_reference_on_random_smollm2_streams(smol):
    tok, det = smol
    texts = [
        " Wait", "Wait", " wait", "wait", " WAIT", " Hmm", "Hmm", " hmm", "Hmmm", " alternatively", " Alternatively",
        " await", " waiting", "ing", "ed", ",", ".", "!", "\n", "\n\n", " so", " the", " 4", "<think>", "</think>",
        " Wa", "it", " H", "mm", " alter", "natively", "s", " un", "think", ">", " ok", "<", "</",
    ]
    units = [encode(tok, text) for text in texts]  # whole markers and cues, and loose pieces of them
    rng = random.Random(0)
    strings = det._strings  # the detector's own token texts, already lower-cased
    batch, prompt_len, gen_len = 8, 6, 80

    def stream(length: int) -> list[int]:
        out: list[int] = []
        while len(out) < length:
            out += rng.choice(units)
        return out[:length]

    prompts = [stream(prompt_len) for _ in range(batch)]
    for b in range(0, batch, 2):  # half the rows open thinking in the prompt
        prompts[b][-3:] = encode(tok, "<think>")
    gens = [stream(gen_len) for _ in range(batch)]
    got_online = online(det, torch.tensor(prompts), None, torch.tensor(gens))
    got_batch = det.find_events_batch([p + g for p, g in zip(prompts, gens)], [prompt_len] * batch)
    total = 0
    for b in range(batch):
        offline = det.find_events(prompts[b] + gens[b], prompt_length=prompt_len)
        assert got_online[b] == offline == got_batch[b]
        expected = reference_events(strings, prompts[b] + gens[b], prompt_len, det.cues)
        assert [(e.cue, e.start, e.position) for e in offline] == expected
        total += len(offline)
    assert total >= 20  # the streams really contain cues


def test_online_confirmation_with_continues_word_matches_offline(tiny):
    tok, det = tiny
    gen = toks(tok, ["Ġwait", "ing", "Ġwa", "it", ",", "Ġh", "mm", "m", "ĠWait"])
    state = det.start(torch.tensor([toks(tok, ["<think>"])]))
    kept, pending = [], None
    for t, token in enumerate(gen):
        if pending is not None and not det.continues_word[token]:
            kept.append(pending)
        pending = None
        cue, start = det.step(state, torch.tensor([token]))
        if cue.item() >= 0:
            event = CueEvent(position=1 + t, start=int(start), cue=det.cues[int(cue)])
            if state.pending.item():
                pending = event
            else:
                kept.append(event)
    kept += [pending] if pending is not None else []
    assert kept == det.find_events(toks(tok, ["<think>"]) + gen, prompt_length=1)
    assert [e.cue for e in kept] == ["wait", "wait"]


def test_out_of_range_token_ids_count_as_empty_text(tiny):
    tok, det = tiny
    state = det.start(torch.tensor([toks(tok, ["<think>"])]))
    cue, _ = det.step(state, torch.tensor([len(tok) + 5]))
    assert cue.item() == -1
    assert det.continues(torch.tensor([len(tok) + 5])).tolist() == [False]


# ----------------------------------------------------------------------------- vocabulary preprocessing


def test_continues_word_marks_tokens_whose_text_starts_with_a_letter(tiny, smol):
    tok, det = tiny
    assert det.continues_word.shape == (len(tok),) and det.continues_word.dtype == torch.bool
    expect = {"ing": True, "it": True, "m": True, "Wait": True, "ĠWait": False, ",": False, "<think>": False,
              "Ġ4": False, "4": False, "Ċ": False}
    assert {w: bool(det.continues_word[tok.convert_tokens_to_ids(w)]) for w in expect} == expect
    stok, sdet = smol
    assert sdet.continues_word.shape == (len(stok),)
    for text, starts_with_letter in [("ing", True), ("IT", True), (" wait", False), (",", False), ("4", False)]:
        (token,) = encode(stok, text)
        assert bool(sdet.continues_word[token]) is starts_with_letter, text


def test_missing_cues_names_cues_the_tokenizer_cannot_spell(tiny, smol):
    tok, det = tiny
    assert det.missing_cues() == []
    no_alt = make_word_tokenizer([w for w in TINY_WORDS if "lternatively" not in w])
    assert CueDetector(no_alt).missing_cues() == ["alternatively"]
    assert smol[1].missing_cues() == []


def test_default_cues_are_hmm_wait_alternatively(tiny):
    assert DEFAULT_CUES == ("hmm", "wait", "alternatively")
    assert tiny[1].cues == DEFAULT_CUES


@pytest.mark.parametrize("bad", [(" ",), (", wait",), ("wait!",), "wait", ()])
def test_cues_must_be_words_and_errors_say_how_to_fix(tiny, bad):
    with pytest.raises((ValueError, TypeError), match="(?i)cue"):
        CueDetector(tiny[0], cues=bad)


def test_cues_are_canonicalised_to_lower_case_stripped_words(tiny):
    det = CueDetector(tiny[0], cues=(" Wait", "HMM", "wait"))
    assert det.cues == ("wait", "hmm")


def test_detector_moves_to_a_device_and_keeps_matching(tiny):
    tok, det = tiny
    moved = CueDetector(tok).to("cpu")
    assert moved.continues_word.device.type == "cpu"
    assert events(moved, toks(tok, ["<think>"]), toks(tok, ["ĠWait"])) == [("wait", 1, 1)]


def test_prompt_decides_whether_generation_starts_inside_thinking(tiny):
    tok, det = tiny
    prompts = [["<think>", "Ċ"], ["<think>", "Ġso", "</think>"], ["Ġso", "Ġthe"], ["</think>", "<think>"]]
    state = det.start(torch.tensor([toks(tok, p) for p in [p + ["Ġso"] * (3 - len(p)) for p in prompts]]))
    assert state.in_think.tolist() == [True, False, False, True]


def test_tokens_longer_than_the_table_keep_their_last_characters():
    from lynx_hf.runtime.cues import MAX_TOKEN_CHARS

    long_word = "-" * (MAX_TOKEN_CHARS + 40) + "Ġwait"
    tok = make_word_tokenizer(TINY_WORDS + [long_word])
    det = CueDetector(tok)
    assert det.max_token_chars == det.buffer_chars < MAX_TOKEN_CHARS  # the table holds only what the buffer can
    found = events(det, toks(tok, ["<think>"]), toks(tok, ["Ġso", long_word, "."]))
    assert found == [("wait", 2, 2)]
